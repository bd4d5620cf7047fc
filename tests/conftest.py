"""Shared test fixtures: where ../shared lives, and the golden files."""

import atexit
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FERS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints" / "saved_models"
SCENES = SHARED / "data" / "scenes"
BACKGROUND = SHARED / "data" / "background"

# The scripts keep compiled programs (fers_jax.cli.use_compilation_cache):
# the suite's, scripts run as subprocesses included, go to a folder of its
# own, not the user's cache.
if "FERS_JAX_CACHE" not in os.environ:
    os.environ["FERS_JAX_CACHE"] = tempfile.mkdtemp(prefix="fers-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["FERS_JAX_CACHE"], True)


def pytest_configure(config):
    if not GOLDEN.is_dir():
        raise pytest.UsageError(
            f"shared reference data not found at {SHARED}; set FERS_SHARED")


@pytest.fixture(scope="session")
def golden():
    """Loads a golden .npz by name into a dict of arrays."""
    def load(name):
        with np.load(GOLDEN / name) as f:
            return {k: f[k] for k in f.files}
    return load


def fake_variables(model, *args, seed=0, **kwargs):
    """Variables for `model.apply(v, *args, **kwargs)` without model.init.

    model.init's PRNG-heavy graph takes XLA on CPU tens of seconds to
    compile; tests that need only some well-scaled weights fill the
    abstract shapes with NumPy random numbers instead: kernels
    uniform(+-1/sqrt(fan_in)), BN scale and running variance in [0.5, 1.5],
    biases and running means in [-0.1, 0.1].
    """
    import flax
    import jax

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), *args, **kwargs))
    out = {}
    for path, s in flax.traverse_util.flatten_dict(shapes).items():
        leaf = path[-1]
        if leaf == "kernel":
            bound = 1 / np.sqrt(np.prod(s.shape[:-1]))
            value = rng.uniform(-bound, bound, s.shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:
            value = rng.uniform(-0.1, 0.1, s.shape)
        out[path] = np.asarray(value, s.dtype)
    return flax.traverse_util.unflatten_dict(out)
