"""Detectors: RX against the reference goldens, LRX and CRD against plain
per-pixel NumPy loops, batching, chunking, fusion and argument checks."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import GOLDEN, SCENES
from fers_jax import data, detectors, metrics
from fers_jax.errors import InputError

SCENE_NAMES = ("abu-airport-2", "abu-beach-2", "abu-urban-3", "pavia-car",
               "sandiego-2")


# Plain per-pixel NumPy references: the method as written, loops and all.
# The background of each pixel is listed position by position with its
# source pixel: periodic (wrap), mirrored unless the mirror lands in the
# pixel's own guard window (reflect), or inside the image only (inside).

def _unit(cube):
    x = np.asarray(cube, np.float64)
    return (x - x.min()) / (x.max() - x.min())


def background_sources(h, w, i, j, inner, outer, border):
    """[(row, col)] of the pixels in the background of pixel (i, j)."""
    r, gi = outer // 2, inner // 2

    def mirror(s, n):
        return -s if s < 0 else 2 * (n - 1) - s if s >= n else s
    out = []
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            if abs(di) <= gi and abs(dj) <= gi:
                continue  # the guard window
            si, sj = i + di, j + dj
            if border == "wrap":
                out.append((si % h, sj % w))
            elif border == "inside":
                if 0 <= si < h and 0 <= sj < w:
                    out.append((si, sj))
            else:
                si, sj = mirror(si, h), mirror(sj, w)
                if not (abs(si - i) <= gi and abs(sj - j) <= gi):
                    out.append((si, sj))
    return out


def _local_loop(cube, inner, outer, score, border="reflect"):
    """score(X (K, B) background rows, y (B,)) at every pixel."""
    x = _unit(cube)
    h, w, _ = x.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            src = background_sources(h, w, i, j, inner, outer, border)
            rows, cols = zip(*src)
            out[i, j] = score(x[list(rows), list(cols)], x[i, j])
    return out


def lrx_loop(cube, inner, outer, rtol=detectors.LRX_RTOL, border="reflect",
             form="pinv", delta=1e-5):
    def score(x, y):
        d = y - x.mean(axis=0)
        if form == "matlab":
            return d @ np.linalg.inv(x.T @ x + delta * np.eye(len(y))) @ d
        return d @ np.linalg.pinv(np.cov(x, rowvar=False), rcond=rtol) @ d
    return _local_loop(cube, inner, outer, score, border)


def crd_loop(cube, inner, outer, lam=1e-6, border="reflect", form="plain"):
    def score(x, y):
        x = x.T
        g = np.diag(np.linalg.norm(y[:, None] - x, axis=0))
        xs, ys = x, y
        if form == "sum-to-one":
            xs, ys = np.vstack([x, np.ones((1, x.shape[1]))]), np.append(y, 1)
        try:
            a = np.linalg.solve(xs.T @ xs + lam * g.T @ g, xs.T @ ys)
        except np.linalg.LinAlgError:
            return np.nan  # singular: y repeated in its background (below)
        return np.linalg.norm(y - x @ a)
    return _local_loop(cube, inner, outer, score, border)


def in_own_background(cube, inner, outer, border="reflect"):
    """Pixels whose spectrum recurs in their background: duplicated pixels
    in the scene itself (no border mode lets a pixel meet itself)."""
    return _local_loop(cube, inner, outer,
                       lambda x, y: np.any(np.all(x == y, axis=1)), border) > 0


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
    got = np.asarray(detectors.crd(crops, *window, border="inside"))
    jax.clear_caches()
    for i, cube in enumerate(crops):
        check_crd(got[i], cube, *window, "inside", "sum-to-one")


def check_crd(got, cube, inner, outer, border="reflect", form="plain"):
    want = crd_loop(cube, inner, outer, border=border, form=form)
    own = in_own_background(cube, inner, outer, border)
    assert (~own).sum() > own.size / 3
    # Elsewhere NumPy's solve is reliable. There the exact residual is 0 (y
    # itself is in X) and the solve is singular or garbage (seen: 2.6e14);
    # ours is 0 to rounding (a few sqrt(eps * y'y) from the Gram form).
    assert rel_err(got[~own], want[~own]) < 1e-4
    assert np.max(got[own], initial=0) < 1e-4 * np.max(got)


@pytest.mark.parametrize("border", detectors.BORDERS)
@pytest.mark.parametrize("form", detectors.LRX_FORMS)
def test_lrx_equals_numpy_loop(crops, border, form):
    # (3, 5): K = 16 < 20 bands (the K x K forms); the B x B ones below.
    got = np.asarray(detectors.lrx(crops, 3, 5, border=border, form=form))
    for i, cube in enumerate(crops):
        assert rel_err(got[i], lrx_loop(cube, 3, 5, border=border, form=form)) < 1e-4


@pytest.mark.parametrize("form", detectors.LRX_FORMS)
def test_lrx_more_background_than_bands_equals_numpy_loop(crops, form):
    got = np.asarray(detectors.lrx(crops[0], 3, 7, border="inside", form=form))
    assert rel_err(got, lrx_loop(crops[0], 3, 7, border="inside", form=form)) < 1e-4


@pytest.mark.parametrize("border", detectors.BORDERS)
@pytest.mark.parametrize("form", detectors.CRD_FORMS)
def test_crd_equals_numpy_loop(crops, border, form):
    got = np.asarray(detectors.crd(crops, 3, 5, border=border, form=form))
    for i, cube in enumerate(crops):
        check_crd(got[i], cube, 3, 5, border, form)


def test_crd_small_window_equals_numpy_loop(crops):
    got = np.asarray(detectors.crd(crops[1], 1, 3, border="reflect", form="plain"))
    check_crd(got, crops[1], 1, 3, "reflect", "plain")


def planted(h=14, w=14, b=48, seed=5):
    """Cubes of a smooth 3-endmember background with noise, each with one
    anomalous pixel at a corner or an edge (or 1-2 pixels from one, where
    plain mirrored padding put the pixel's own copy in its background)."""
    rng = np.random.default_rng(seed)
    ends = rng.random((3, b))
    spots = [(0, 0), (1, 1), (h - 1, w - 1), (0, 6), (2, w - 1), (h - 2, 5), (7, 1)]
    cubes = []
    for i, j in spots:
        ab = rng.dirichlet(np.ones(3), size=(h, w))
        cube = ab @ ends + 0.01 * rng.normal(size=(h, w, b))
        cube[i, j] = 0.6 * rng.random(b) + 0.2 * ends[0]
        cubes.append(cube)
    return np.stack(cubes), spots


@pytest.mark.parametrize("border", detectors.BORDERS)
def test_planted_anomaly_at_borders_ranks_first(border):
    # Fails with mirrored padding that keeps copies of the guard window
    # (the detectors before the border option): the anomalies at (1, 1),
    # (2, w - 1), (h - 2, 5), (7, 1) had their own mirror images in their
    # background and scored at the bottom.
    cubes, spots = planted()
    for detector, form in ((detectors.lrx, "pinv"), (detectors.crd, "sum-to-one")):
        maps = np.asarray(detector(cubes, 3, 7, border=border, form=form))
        for m, (i, j) in zip(maps, spots):
            others = np.delete(m.ravel(), i * m.shape[1] + j)
            assert m[i, j] > others.max(), (detector.__name__, border, (i, j))


def test_no_pixel_meets_itself_or_its_guard():
    # Distinct random spectra, more bands than background pixels: a pixel
    # is exactly represented (CRD residual ~0) only if its own spectrum is
    # in its background. Plain mirrored padding did that to every pixel 1
    # or 2 rows or columns from an edge (for (3, 7)).
    cube = np.random.default_rng(2).random((12, 13, 60))
    for border in detectors.BORDERS:
        got = np.asarray(detectors.crd(cube, 3, 7, border=border, form="plain"))
        assert got.min() > 0.2 * np.median(got), border
        for i, j in [(0, 0), (1, 1), (1, 6), (11, 12), (10, 2)]:
            src = background_sources(12, 13, i, j, 3, 7, border)
            assert all(max(abs(si - i), abs(sj - j)) > 1 for si, sj in src)


@pytest.mark.parametrize("detector", [detectors.lrx, detectors.crd])
def test_batched_chunked_and_eager_agree(crops, detector):
    # Different batch and chunk shapes round differently; atol covers CRD's
    # zero residuals, known only to sqrt(eps * y'y) ~ 3e-8.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-8, atol=1e-7)
    detector = functools.partial(detector, border="inside")  # with masks
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
    got = np.asarray(detectors.crd(cube, 1, 3, lam=0.0, border="reflect", form="plain"))
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
    for kwargs in (dict(border="mirror"), dict(form="plain"), dict(delta=0.0)):
        with pytest.raises(InputError):
            detectors.lrx(np.zeros((12, 14, 4)), **kwargs)
    for kwargs in (dict(border="zeros"), dict(form="pinv")):
        with pytest.raises(InputError):
            detectors.crd(np.zeros((12, 14, 4)), **kwargs)
    with pytest.raises(InputError):
        detectors.convention("octave")
