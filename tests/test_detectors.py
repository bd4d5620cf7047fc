"""Detectors: RX against the reference goldens, LRX and CRD against plain
per-pixel NumPy loops, batching, chunking, fusion and argument checks."""

import functools
import json

import jax
import numpy as np
import pytest
import scipy.stats

from conftest import GOLDEN, SCENES
from fers_jax import data, detectors, metrics
from fers_jax.errors import InputError

SCENE_NAMES = ("abu-airport-2", "abu-beach-2", "abu-urban-3", "pavia-car",
               "sandiego-2")


# Plain per-pixel NumPy references: the method as written, loops and all.

def _padded(cube, r):
    x = np.asarray(cube, np.float64)
    x = (x - x.min()) / (x.max() - x.min())
    return np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")


def _local_loop(cube, inner, outer, score):
    """score(X (K, B) background rows, y (B,)) at every pixel."""
    h, w, b = cube.shape
    r, g = outer // 2, (outer - inner) // 2
    xp = _padded(cube, r)
    guard = np.zeros((outer, outer), bool)
    guard[g:g + inner, g:g + inner] = True
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            win = xp[i:i + outer, j:j + outer]
            out[i, j] = score(win[~guard], xp[i + r, j + r])
    return out


def lrx_loop(cube, inner, outer, rtol=detectors.LRX_RTOL):
    def score(x, y):
        d = y - x.mean(axis=0)
        return d @ np.linalg.pinv(np.cov(x, rowvar=False), rcond=rtol) @ d
    return _local_loop(cube, inner, outer, score)


def crd_loop(cube, inner, outer, lam=1e-6):
    def score(x, y):
        x = x.T
        g = np.diag(np.linalg.norm(y[:, None] - x, axis=0))
        try:
            a = np.linalg.solve(x.T @ x + lam * g.T @ g, x.T @ y)
        except np.linalg.LinAlgError:
            return np.nan  # singular: y repeated in its background (below)
        return np.linalg.norm(y - x @ a)
    return _local_loop(cube, inner, outer, score)


def in_own_background(cube, inner, outer):
    """Pixels whose spectrum recurs in their background: through the
    reflection at borders, or duplicated pixels in the scene itself."""
    return _local_loop(cube, inner, outer,
                       lambda x, y: np.any(np.all(x == y, axis=1))) > 0


@pytest.fixture(scope="module")
def crops():
    """Two normalised 12 x 14 x 20 crops of a real scene."""
    cube = data.normalise(data.load_scene(SCENES / "abu-urban-3.mat").cube[..., 40:60])
    return np.stack([cube[30:42, 50:64], cube[70:82, 10:24]])


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want) / np.abs(want)))


# RX ------------------------------------------------------------------------

def test_rx_equals_reference_golden(golden):
    g = golden("rx.npz")
    cube = g["x"][0].transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    assert rel_err(detectors.rx(cube), g["rx_numpy"]) < 1e-4
    assert rel_err(detectors.rx(cube, "float32"), g["rx_batched"][0, 0]) < 1e-4


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_rx_batch_equals_one_by_one(golden, precision):
    cube = golden("rx.npz")["x"][0].transpose(1, 2, 0)
    batch = np.stack([cube, cube[::-1] * 3 + 1, cube[:, ::-1] ** 2])
    got = np.asarray(detectors.rx(batch, precision))
    for i, one in enumerate(batch):
        np.testing.assert_allclose(got[i], detectors.rx(one, precision), rtol=1e-5)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_rx_plans_agree(golden, monkeypatch, precision):
    # The CPU plan (one image at a time, pixels in chunks, here 7 rows: a
    # remainder chunk too) and the accelerator plan (the batch vmapped,
    # each image whole) compute the same maps.
    cube = golden("rx.npz")["x"][0].transpose(1, 2, 0)
    batch = np.stack([cube * (i + 1) + i for i in range(3)] + [cube[::-1]])
    n, h, w, _ = batch.shape
    assert (h * w) % 7
    monkeypatch.setattr(detectors, "_rx_plan", lambda shape: (1, 7))
    jax.clear_caches()  # _rx_batch reads the plan when traced
    chunked = np.asarray(detectors.rx(batch, precision))
    monkeypatch.setattr(detectors, "_rx_plan", lambda shape: (n, h * w))
    jax.clear_caches()
    whole = np.asarray(detectors.rx(batch, precision))
    jax.clear_caches()
    np.testing.assert_allclose(chunked, whole, rtol=1e-9 if precision == "float64" else 1e-4)


@pytest.mark.parametrize("definite", [True, False])
def test_pinv_hermitian_equals_numpy(definite):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 12)) @ rng.normal(size=(12, 12))
    a = x.T @ x if definite else x.T @ np.diag(rng.normal(size=30)) @ x
    a[:, -1] = a[-1, :] = 0  # singular: one value must be dropped
    with jax.enable_x64(True):
        got = np.asarray(detectors.pinv(a, 1e-12, hermitian=True))
        svd = np.asarray(detectors.pinv(a, 1e-12))
    want = np.linalg.pinv(a, rcond=1e-12, hermitian=True)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-10 * scale
    assert np.abs(svd - want).max() < 1e-10 * scale


@pytest.mark.parametrize("name", SCENE_NAMES)
def test_rx_on_scenes_matches_reference_maps(name):
    scene = data.load_scene(SCENES / f"{name}.mat")
    got = np.asarray(detectors.rx(data.normalise(scene.cube)))
    with open(GOLDEN / "scene_maps" / "auc.json") as f:
        want_auc = json.load(f)[name]["grx_allbands"]
    with np.load(GOLDEN / "scene_maps" / f"{name}.npz") as f:
        want_map = f["grx_allbands"]
    assert metrics.roc_auc(got, scene.gt) == pytest.approx(want_auc, abs=1e-4)
    assert scipy.stats.spearmanr(got.ravel(), want_map.ravel())[0] > 0.9999


def test_rx_with_a_constant_band_is_finite():
    rng = np.random.default_rng(0)
    cube = rng.random((16, 18, 6))
    with_constant = np.concatenate([cube, np.full((16, 18, 1), 0.5)], -1)
    got = np.asarray(detectors.rx(with_constant))
    assert np.all(np.isfinite(got))
    # The constant band adds a zero row and column, which pinv drops.
    np.testing.assert_allclose(got, detectors.rx(cube), rtol=1e-8)


# LRX and CRD ---------------------------------------------------------------
# (3, 5): K = 16 background pixels < 20 bands (LRX through the K x K Gram);
# (3, 7): K = 40 > 20 (LRX through the B x B covariance); (1, 3): K = 8.
# CRD needs K < B: with K >= B every y is exactly represented.

@pytest.mark.parametrize("window", [(3, 5), (1, 3)])
def test_crd_in_small_groups_equals_numpy_loop(crops, window, monkeypatch):
    # The K x K systems are solved a group of pixels at a time; a budget of
    # 3 systems makes groups of 2 of the 16 (4 x 4 tile, (3, 5)) or 4 (2 x 2
    # tile, (1, 3)) tile pixels.
    k = window[1] ** 2 - window[0] ** 2
    monkeypatch.setattr(detectors, "_CRD_GROUP_BYTES", 3 * k * k * 8)
    jax.clear_caches()  # the group size is read when traced
    got = np.asarray(detectors.crd(crops, *window))
    jax.clear_caches()
    for i, cube in enumerate(crops):
        check_crd(got[i], cube, *window)


def check_crd(got, cube, inner, outer):
    want = crd_loop(cube, inner, outer)
    own = in_own_background(cube, inner, outer)
    assert own.any() and (~own).sum() > own.size / 3
    # Elsewhere NumPy's solve is reliable. There the exact residual is 0 (y
    # itself is in X) and the solve is singular or garbage (seen: 2.6e14);
    # ours is 0 to rounding (a few sqrt(eps * y'y) from the Gram form).
    assert rel_err(got[~own], want[~own]) < 1e-4
    assert np.max(got[own]) < 1e-4 * np.max(got)


@pytest.mark.parametrize("window", [(3, 5), (3, 7)])
def test_lrx_equals_numpy_loop(crops, window):
    got = np.asarray(detectors.lrx(crops, *window))
    for i, cube in enumerate(crops):
        assert rel_err(got[i], lrx_loop(cube, *window)) < 1e-4


@pytest.mark.parametrize("window", [(3, 5), (1, 3)])
def test_crd_equals_numpy_loop(crops, window):
    got = np.asarray(detectors.crd(crops, *window))
    for i, cube in enumerate(crops):
        check_crd(got[i], cube, *window)


@pytest.mark.parametrize("detector", [detectors.lrx, detectors.crd])
def test_batched_chunked_and_eager_agree(crops, detector):
    # Different batch and chunk shapes round differently; atol covers CRD's
    # zero residuals, known only to sqrt(eps * y'y) ~ 3e-8.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-8, atol=1e-7)
    batched = np.asarray(detector(crops, 3, 5))
    for i, cube in enumerate(crops):
        one = np.asarray(detector(cube, 3, 5))
        close(one, batched[i])
        # 7 pixels (LRX) or one 4 x 4 tile (CRD) per step, the last padded.
        close(np.asarray(detector(cube, 3, 5, chunk=7)), one)
    with jax.disable_jit():
        close(np.asarray(detector(crops[1], 3, 5)), batched[1])


def test_crd_without_regularisation_is_least_squares(crops):
    cube = crops[0]
    got = np.asarray(detectors.crd(cube, 1, 3, lam=0.0))
    own = in_own_background(cube, 1, 3)

    def lstsq(x, y):
        return np.linalg.norm(y - x.T @ np.linalg.lstsq(x.T, y, rcond=None)[0])
    want = _local_loop(cube, 1, 3, lstsq)
    assert rel_err(got[~own], want[~own]) < 1e-4


# Fusion and argument checks -------------------------------------------------

def test_fuse_sum_and_product():
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 5, 6)) * [[[3.0]], [[7.0]]], rng.random((2, 5, 6)) + 2
    np.testing.assert_allclose(detectors.fuse([a, b]), a + b, rtol=1e-6)

    def scaled(m):  # min-max per image of the batch
        lo = m.min(axis=(1, 2), keepdims=True)
        return (m - lo) / (m.max(axis=(1, 2), keepdims=True) - lo)
    np.testing.assert_allclose(detectors.fuse([a, b], "product"),
                               scaled(a) * scaled(b), rtol=1e-5, atol=1e-7)
    single = detectors.fuse([a[0], b[0]], "product")
    np.testing.assert_allclose(single, scaled(a[:1] * 1)[0] * scaled(b[:1])[0],
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError):
        detectors.fuse([a], "mean")
    with pytest.raises(InputError):
        detectors.fuse([])


@pytest.mark.parametrize("detector", [detectors.lrx, detectors.crd])
@pytest.mark.parametrize("kwargs", [
    dict(inner=3, outer=4), dict(inner=2, outer=5), dict(inner=5, outer=5),
    dict(inner=7, outer=5), dict(inner=0, outer=5), dict(inner=3, outer=13),
    dict(inner=3.0, outer=5), dict(chunk=0)])
def test_invalid_windows_raise(detector, kwargs):
    with pytest.raises(InputError):
        detector(np.zeros((12, 14, 4)), **kwargs)


def test_invalid_shapes_and_parameters_raise():
    with pytest.raises(InputError):
        detectors.lrx(np.zeros((12, 14)))
    with pytest.raises(InputError):
        detectors.crd(np.zeros((12, 14, 4)), lam=-1.0)
    with pytest.raises(InputError):
        detectors.lrx(np.zeros((12, 14, 4)), rtol=0.0)
