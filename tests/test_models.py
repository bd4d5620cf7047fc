"""Behaviour of the Flax models at tiny sizes: shapes, modes, PyTorch rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fake_variables
from fers_jax import configs, convert
from fers_jax.errors import InputError
from fers_jax.models import (FeatureRestorationNet, FerdNet, PixelClassifier,
                             SpatialStudent, SpectralTeacher, layers,
                             teacher_variables)

KEY = jax.random.key(0)
# model.init compiles slowly with the default threefry PRNG on CPU; the
# tests that really initialise use this one (same initialisers).
FAST_KEY = jax.random.key(0, impl="rbg")


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def cube(n, h, w, b, seed=0):
    x = np.random.default_rng(seed).uniform(-0.1, 0.1, (n, h, w, b))
    return jnp.asarray(x, jnp.float32)


# --- Configs ------------------------------------------------------------------

def test_head_width_rule():
    assert configs.head_width(128) == 128
    assert configs.head_width(129) == 256
    assert configs.ferd(50).head_width == 128
    assert configs.ferd(200).head_width == 256


def test_config_round_trip_and_validation():
    for cfg in (configs.ferd_tiny(), configs.student(50), configs.frn_tiny()):
        assert configs.from_dict(type(cfg).__name__, configs.to_dict(cfg)) == cfg
    with pytest.raises(InputError):
        configs.student(4)  # fewer bands than the SE reduction
    with pytest.raises(InputError):
        configs.from_dict("FerdConfig", {"bands": 20, "depth": 3})


# --- PyTorch-compatible layers -----------------------------------------------

def test_bilinear_matches_pytorch_rule():
    # F.interpolate([0, 1], size=4, bilinear, align_corners=False): half-pixel
    # centres with clamped edges give 0, 0.25, 0.75, 1.
    np.testing.assert_allclose(layers.bilinear_matrix(2, 4) @ [0.0, 1.0],
                               [0, 0.25, 0.75, 1], atol=1e-7)
    np.testing.assert_allclose(layers.bilinear_matrix(1, 3), np.ones((3, 1)))
    # Shrinking: plain two-tap interpolation, no antialiasing
    # (jax.image.resize would average over a wider window here).
    np.testing.assert_allclose(layers.bilinear_matrix(4, 2) @ [0, 1, 2, 3.0],
                               [0.5, 2.5], atol=1e-6)
    x = cube(2, 2, 3, 4)
    y = layers.resize_bilinear(x, (5, 7))
    assert y.shape == (2, 5, 7, 4)
    np.testing.assert_allclose(y[:, 0, 0], x[:, 0, 0], atol=1e-7)
    np.testing.assert_allclose(y[:, -1, -1], x[:, -1, -1], atol=1e-7)


def test_adaptive_pool_bin_edges():
    # 5 -> 4: start floor(i*5/4), end ceil((i+1)*5/4): overlapping bins.
    m = layers.adaptive_pool_matrix(5, 4)
    np.testing.assert_allclose(m @ np.arange(5.0), [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(layers.adaptive_pool_matrix(5, 2) @ np.arange(5.0),
                               [1.0, 3.0])
    # Output larger than input repeats pixels, as PyTorch allows.
    np.testing.assert_allclose(layers.adaptive_pool_matrix(2, 4) @ [1.0, 3.0],
                               [1, 1, 3, 3])
    x = cube(1, 5, 6, 3)
    np.testing.assert_allclose(layers.adaptive_avg_pool(x, 1)[0, 0, 0],
                               x[0].mean(axis=(0, 1)), rtol=1e-6)


def test_batchnorm_is_pytorch_batchnorm():
    x = cube(3, 4, 5, 2) * 20 + 1
    bn = layers.BatchNorm(use_running_average=False)
    variables = bn.init(FAST_KEY, x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    xs = np.asarray(x).reshape(-1, 2)
    mean, var = xs.mean(0), xs.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    # Running variance from the unbiased estimate, momentum 0.1.
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * xs.var(0, ddof=1),
                               rtol=1e-5)
    # Eval mode: running statistics, nothing to update.
    eval_y = layers.BatchNorm().apply(variables, x)
    np.testing.assert_allclose(eval_y, x / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_reflect_pad_and_crop():
    x = jnp.arange(5.0).reshape(1, 1, 5, 1)
    padded = layers.reflect_pad(jnp.tile(x, (1, 5, 1, 1)), 2)
    np.testing.assert_array_equal(padded[0, 2, :, 0], [2, 1, 0, 1, 2, 3, 4, 3, 2])
    assert layers.crop(padded, 2).shape == (1, 5, 5, 1)


def test_deconv_doubles_size_without_overlap():
    x = cube(1, 3, 4, 2)
    m = layers.deconv2x2(5)
    variables = fake_variables(m, x)
    y = m.apply(variables, x)
    assert y.shape == (1, 6, 8, 5)
    # Each output pixel depends on one input pixel only (PyTorch, padding 0):
    # out[2i + a, 2j + b] = x[i, j] @ W[:, :, a, b] with the torch weight.
    k = np.asarray(variables["params"]["kernel"])  # (kh, kw, out, in)
    np.testing.assert_allclose(y[0, 3, 5], k[1, 1] @ x[0, 1, 2], rtol=1e-5)


def test_deconv_equals_flax_conv_transpose():
    """Deconv2x2 (a matmul and a depth-to-space) is flax's transposed conv:
    the same variables and init, outputs and both gradients to float32
    rounding."""
    import flax.linen as nn
    x = cube(2, 5, 3, 24)
    ref = nn.ConvTranspose(16, (2, 2), strides=(2, 2), padding="VALID",
                           use_bias=False, transpose_kernel=True,
                           kernel_init=layers.torch_default_init)
    ours = layers.deconv2x2(16)
    v_ref, v = ref.init(FAST_KEY, x), ours.init(FAST_KEY, x)
    np.testing.assert_array_equal(v["params"]["kernel"], v_ref["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v_ref, x), rtol=1e-5,
                               atol=1e-6)
    def loss(m):
        return lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
    got = jax.grad(loss(ours), (0, 1))(v, x)
    want = jax.grad(loss(ref), (0, 1))(v_ref, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())



@pytest.mark.parametrize("shape, kernel, stride, block_bytes", [
    ((2, 3, 2, 16), 3, 1, None),    # 3x2 output: one im2col matmul
    ((2, 6, 5, 16), 3, 2, None),    # strided, small output
    ((2, 12, 9, 8), 3, 1, None),    # 108 pixels: lax conv, im2col weight grad
    ((2, 12, 9, 8), 3, 1, 1024),    # ... over blocks of a few rows (scan)
    ((2, 13, 11, 8), 7, 2, None),   # the stem's 7x7 stride 2
    ((2, 9, 9, 8), 1, 2, None),     # 1x1 strided: a matmul
])
def test_conv2d_equals_lax_conv(shape, kernel, stride, block_bytes, monkeypatch):
    """Every path of layers.conv2d (the primitive of every nn.Conv here) is
    lax.conv_general_dilated: outputs, input and kernel gradients to float32
    rounding."""
    if block_bytes is not None:
        monkeypatch.setattr(layers, "KERNEL_GRAD_BLOCK_BYTES", block_bytes)
    x = cube(*shape)
    k = jnp.asarray(np.random.default_rng(1).uniform(
        -0.3, 0.3, (kernel, kernel, shape[-1], 12)), jnp.float32)
    pad = ((kernel // 2,) * 2,) * 2
    ref = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride,) * 2,
                            padding=pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            precision=jax.lax.Precision.HIGHEST)
    ours = functools.partial(layers.conv2d, window_strides=(stride,) * 2, padding=pad,
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(jax.jit(ours)(x, k), ref(x, k), rtol=1e-5, atol=1e-6)

    def loss(f):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(3 * f(x, k))), (0, 1)))
    for got, want in zip(loss(ours)(x, k), loss(ref)(x, k)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

def test_spec_initialisation():
    from fers_jax.models.student import Conv2RGB
    x = cube(1, 4, 4, 16)
    rgb = Conv2RGB(32).init(FAST_KEY, x)["params"]["conv"]
    assert 0.05 < np.abs(rgb["kernel"]).max() <= 0.1  # SPEC 3.4
    assert np.abs(rgb["bias"]).max() <= 1 / np.sqrt(16)
    se = layers.SqueezeExcitation(8).init(FAST_KEY, x)["params"]
    assert np.abs(se["fc1"]["kernel"]).max() <= 0.1
    bn = layers.BatchNorm().init(FAST_KEY, x)
    np.testing.assert_array_equal(bn["params"]["scale"], 1)
    np.testing.assert_array_equal(bn["params"]["bias"], 0)
    np.testing.assert_array_equal(bn["batch_stats"]["var"], 1)
    # PyTorch's default for ConvH / de_ConvH / head: uniform(+-1/sqrt(fan_in)).
    k = layers.conv1x1(64, kernel_init=layers.torch_default_init).init(
        FAST_KEY, x)["params"]["kernel"]
    assert 0.2 < np.abs(k).max() <= 1 / np.sqrt(16)


# --- Models -------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(13, 21), (64, 64)])
def test_teacher_any_size(h, w):
    cfg = configs.ferd_tiny(20)
    model = SpectralTeacher(cfg)
    x = cube(2, h, w, 20)
    variables = fake_variables(model, x)
    out = jax.jit(model.apply)(variables, x)
    assert out["spe_f"].shape == (2, h, w, 20)
    assert out["enc_f1_cut"].shape == (2, h, w, 64)
    assert float(out["spe_f"].min()) >= 0  # ReLU output
    assert set(variables["params"]) == {"convh", "encoder", "head"}


@pytest.mark.parametrize("h,w", [(37, 50), (75, 90)])
def test_student_any_size(h, w):
    cfg = configs.student_tiny(16)
    model = SpatialStudent(cfg)
    x = cube(1, h, w, 16)
    variables = fake_variables(model, x)
    out = jax.jit(model.apply)(variables, x)
    assert out["spa_f"].shape == (1, h, w, 16)
    assert out["false_rgb"].shape == (1, h, w, 3)
    assert 0 <= float(out["false_rgb"].min()) <= float(out["false_rgb"].max()) <= 1


def test_student_train_mode_updates_trunk_statistics():
    cfg = configs.student_tiny(16)
    model = SpatialStudent(cfg)
    x = cube(2, 32, 32, 16)
    variables = fake_variables(model, x)
    _, updates = jit_apply(model)(variables, x, train=True,
                                  mutable=("batch_stats",))
    before = variables["batch_stats"]["trunk"]["bn1"]["mean"]
    after = updates["batch_stats"]["trunk"]["bn1"]["mean"]
    assert not np.allclose(before, after)


def test_frn_shapes():
    cfg = configs.frn_tiny(16)
    model = FeatureRestorationNet(cfg)
    x = cube(2, 9, 11, 16)
    variables = fake_variables(model, x)
    assert jit_apply(model)(variables, x).shape == (2, 9, 11, 16)
    assert set(variables["params"]) == {"body_0", "body_1", "final_conv"}


@pytest.fixture(scope="module")
def tiny_stage1():
    cfg = configs.ferd_tiny(20)
    model = FerdNet(cfg)
    x = cube(2, 24, 40, 20)
    variables = fake_variables(model, x)
    out, updates = jit_apply(model)(variables, x, train=True,
                                    mutable=("batch_stats",))
    return model, variables, x, out, updates


def test_stage1_shapes_and_pairing(tiny_stage1):
    _, variables, x, out, _ = tiny_stage1
    assert out["enc_f1"].shape == (2, 32, 48, 64)
    assert out["enc_f1_cut"].shape == (2, 24, 40, 64)
    assert out["ocbe"].shape == (2, 4, 6, 512)
    for i in (1, 2, 3):
        assert out[f"enc_f{i}"].shape == out[f"dec_f{i}"].shape
    assert out["recon"].shape == x.shape
    assert out["prob"].shape == out["logits"].shape == (2, 24, 40, 1)
    assert out["mixf"].shape == x.shape
    assert "conv4" not in variables["params"]["ocbe"]  # never runs


def test_stage1_encoder_statistics_frozen(tiny_stage1):
    _, variables, _, _, updates = tiny_stage1
    old, new = variables["batch_stats"], updates["batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, old["encoder"], new["encoder"])
    assert not np.allclose(old["ocbe"]["bn1"]["var"], new["ocbe"]["bn1"]["var"])


def test_stage1_refuses_undecodable_size(tiny_stage1):
    model, variables = tiny_stage1[:2]
    with pytest.raises(InputError, match="divisible by 8"):
        model.apply(variables, cube(1, 30, 40, 20))


def test_teacher_variables_cover_the_teacher(tiny_stage1):
    model, variables, x, out, _ = tiny_stage1
    teacher = SpectralTeacher(model.config)
    tv = teacher_variables(variables, model.config)
    want = jax.eval_shape(teacher.init, KEY, x)
    assert jax.tree.structure(tv) == jax.tree.structure(want)
    # mixf does not depend on the OCBE / decoder mode.
    np.testing.assert_allclose(jit_apply(teacher)(tv, x)["spe_f"], out["mixf"],
                               atol=1e-6)


def test_classifier_branch_is_jit_safe():
    clf = PixelClassifier(hidden=8, bands=4)
    a, b = cube(1, 5, 5, 6, seed=1), cube(1, 5, 5, 6, seed=2)
    variables = fake_variables(clf, a, b)
    apply = jax.jit(clf.apply)
    same = apply(variables, a, a)
    np.testing.assert_array_equal(same["prob"], 0)  # inputs equal: output 0
    differ = apply(variables, a, b)
    np.testing.assert_allclose(differ["prob"], jax.nn.sigmoid(differ["logits"]))
    np.testing.assert_array_equal(same["mixf"], differ["mixf"])  # head(a)


def test_band_count_checked_at_call():
    model = SpectralTeacher(configs.ferd_tiny(20))
    with pytest.raises(InputError, match="has 30 bands"):
        model.init(KEY, cube(1, 8, 8, 30))


def test_full_size_shapes():
    """The published sizes, abstractly (no computation)."""
    cfg = configs.ferd(100)
    x = jax.ShapeDtypeStruct((1, 64, 64, 100), jnp.float32)
    out, variables = jax.eval_shape(FerdNet(cfg).init_with_output, KEY, x)
    assert out["enc_f1"].shape == (1, 72, 72, 256)
    assert out["enc_f2"].shape == (1, 36, 36, 512)
    assert out["enc_f3"].shape == (1, 18, 18, 1024)
    assert out["ocbe"].shape == (1, 9, 9, 2048)
    assert out["dec_f3"].shape == (1, 18, 18, 1024)
    assert out["recon"].shape == (1, 64, 64, 100)
    shapes = variables["params"]
    assert len(shapes["encoder"]) == 3 + 4 + 23
    assert shapes["ocbe"]["bn_layer_0"]["downsample_conv"]["kernel"].shape == \
        (1, 1, 3072, 2048)
    assert shapes["decoder"]["layer1_0"]["upsample_conv"]["kernel"].shape == \
        (2, 2, 1024, 2048)
    assert len(shapes["decoder"]) == 3 + 4 + 6
    student = convert.abstract_variables("student", configs.student(50))
    assert student["params"]["trunk"]["layer3_5"]["conv2"]["kernel"].shape == \
        (3, 3, 256, 256)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_batch_norm_gradients_equal_autodiff(dtype):
    """Train-mode BatchNorm's closed-form backward against autodiff of the
    same forward: the gradients of x, scale and bias through the output and
    through the batch mean and variance (what the running statistics use),
    on data with a large mean. Same forward bit for bit."""
    with jax.enable_x64(dtype == np.float64):
        _check_train_batch_norm(dtype)


def _check_train_batch_norm(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + rng.standard_normal((2, 5, 4, 6)), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2, 6), dtype)
    bias = jnp.asarray(rng.standard_normal(6), dtype)
    w = [jnp.asarray(rng.standard_normal(s), dtype) for s in ((2, 5, 4, 6), (6,), (6,))]

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, 1e-5)
            return jnp.sum(w[0] * y ** 2) + jnp.sum(w[1] * mean) + jnp.sum(w[2] * var)
        return f

    got = jax.grad(loss(layers._batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(layers._bn_forward), argnums=(0, 1, 2))(x, scale, bias)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(r))))
    for a, b in zip(layers._batch_norm_train(x, scale, bias, 1e-5),
                    layers._bn_forward(x, scale, bias, 1e-5)):
        np.testing.assert_array_equal(a, b)
