"""Parity of the Flax models with the PyTorch reference's golden outputs.

Weights come from the reference's own files through fers_jax.convert (and
so fers_jax.torch_io): the published teachers, and the seeded random
student, restoration net and tiny stage-1 graph. Golden arrays are NCHW.
Tolerance: max abs error < 1e-4 * max |reference|.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHECKPOINTS, GOLDEN
from fers_jax import checkpoints, convert
from fers_jax.models import FerdNet, SpectralTeacher, teacher_variables

RTOL = 1e-4


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def assert_close(out, ref, what):
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape, what
    err = np.abs(out - ref).max()
    scale = np.abs(ref).max()
    assert err < RTOL * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


@pytest.mark.parametrize("name,folder,bands", [
    ("teacher_had100_50bands.npz", "50bands", 50),
    ("teacher_had100_100bands.npz", "100bands", 100),
    ("teacher_had100_200bands.npz", "200bands", 200),
    ("teacher_aviris_200bands_48x56.npz", "aviris/200bands", 200),
])
def test_published_teacher(golden, name, folder, bands):
    g = golden(name)
    model, variables = checkpoints.load_teacher(CHECKPOINTS / folder, bands)
    out = _apply(model)(variables, nhwc(g["x"]))
    assert_close(out["spe_f"], g["spe_f"], name)


@pytest.fixture(scope="module")
def student():
    return checkpoints.load_student(GOLDEN / "spa_fen_random_50bands.pt", 50)


@pytest.mark.parametrize("size", ["64x64", "75x90"])
def test_student(golden, student, size):
    g = golden(f"student_50bands_{size}.npz")
    model, variables = student
    out = _apply(model)(variables, nhwc(g["x"]))
    assert_close(out["spa_f"], g["spa_f"], f"spa_f {size}")
    assert_close(out["false_rgb"], g["false_rgb"], f"false_rgb {size}")


def test_frn(golden):
    g = golden("frn_50bands.npz")
    model, variables = checkpoints.load_frn(GOLDEN / "frn_random_50bands.pt", 50)
    assert_close(_apply(model)(variables, nhwc(g["x"])), g["out"], "frn out")


@pytest.fixture(scope="module")
def stage1():
    variables, config = convert.convert_file(
        "stage1", GOLDEN / "stage1_tiny_random_20bands.pt", 20)
    return FerdNet(config), variables


STAGE1_KEYS = ("enc_f1", "enc_f2", "enc_f3", "enc_f1_cut", "ocbe", "dec_f1",
               "dec_f2", "dec_f3", "recon", "prob")


def test_stage1_train_forward(golden, stage1):
    # Encoder eval, everything else with batch statistics (README).
    g = golden("stage1_tiny_20bands.npz")
    model, variables = stage1
    out, _ = _apply(model)(variables, nhwc(g["x"]), train=True,
                           mutable=("batch_stats",))
    for key in STAGE1_KEYS:
        assert_close(out[key], g[key], key)
    assert_close(out["mixf"], g["mixf_train"], "mixf_train")


def test_stage1_eval_mixf(golden, stage1):
    g = golden("stage1_tiny_20bands.npz")
    model, variables = stage1
    out = _apply(model)(variables, nhwc(g["x"]))
    assert_close(out["mixf"], g["mixf_eval"], "mixf_eval")


def test_teacher_from_stage1_variables(golden, stage1):
    """The FEN cut out of stage-1 variables is the test-time teacher."""
    g = golden("stage1_tiny_20bands.npz")
    model, variables = stage1
    teacher = SpectralTeacher(model.config)
    out = _apply(teacher)(teacher_variables(variables, model.config),
                          nhwc(g["x"]))
    assert_close(out["spe_f"], g["mixf_eval"], "teacher spe_f")
    # load_teacher accepts the PyTorch stage-1 file directly, too.
    teacher, tv = checkpoints.load_teacher(
        GOLDEN / "stage1_tiny_random_20bands.pt", 20)
    assert_close(_apply(teacher)(tv, nhwc(g["x"]))["spe_f"], g["mixf_eval"],
                 "load_teacher(stage-1 .pt)")
