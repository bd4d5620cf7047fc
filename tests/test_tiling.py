"""Tiled features and streaming RX equal the whole-image path.

On a 256x256 crop (abu-airport-2 mirrored to that size) with small tiles,
so that every kind of seam (image border, interior, shifted last tile) is
crossed: features to 1e-5 relative, AUCs to 1e-6.
"""

import json

import jax
import numpy as np
import pytest

from conftest import CHECKPOINTS, GOLDEN, SCENES, fake_variables

import evaluate
from fers_jax import cli, configs, convert, data, detectors, inference, metrics, plan, tiling
from fers_jax.errors import InputError
from fers_jax.models import tiled

STUDENT_50 = GOLDEN / "spa_fen_random_50bands.pt"
TILE = (96, 80)  # 3 x 4 tiles of 256 x 256, the last ones shifted back


def crop_256(bands):
    scene = data.load_scene(SCENES / "abu-airport-2.mat")
    x = data.prepare(scene, bands)
    pad = ((0, 156), (0, 156))
    return (np.pad(x, pad + ((0, 0),), mode="symmetric")[None],
            np.pad(scene.gt, pad, mode="symmetric"))


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def auc(score_map, gt):
    return metrics.scene_metrics(np.asarray(score_map)[0], gt)["auc"]


# --- Grids and receptive fields ---------------------------------------------

@pytest.mark.parametrize("size,tile", [(256, 96), (256, 256), (100, 256), (7, 3),
                                       (1000, 64)])
def test_spans_partition_the_axis_with_one_tile_shape(size, tile):
    spans = tiling.spans(size, tile)
    owned = np.concatenate([np.arange(o0, o1) for _, _, o0, o1 in spans])
    np.testing.assert_array_equal(owned, np.arange(size))
    assert {stop - start for start, stop, _, _ in spans} == {min(tile, size)}
    assert all(start <= o0 < o1 <= stop for start, stop, o0, o1 in spans)


@pytest.mark.parametrize("size", [100, 256, 257, 1000, 2048, 2050])
@pytest.mark.parametrize("tile", [16, 64, 1024])
def test_trunk_windows_align_and_cover_the_reach(size, tile):
    cfg = configs.student(50)
    stride, halo = tiled.trunk_stride(cfg), tiled.trunk_halo(cfg)
    reach = tiled.trunk_reach(cfg)
    windows = tiling.trunk_windows(size, tile, stride, halo)
    cells = np.concatenate([np.arange(c0, c1) for _, _, c0, c1 in windows])
    np.testing.assert_array_equal(cells, np.arange(-(-size // stride)))
    for start, stop, c0, c1 in windows:
        assert start % stride == 0
        # every kept cell sees only pixels of the window, or an image border
        assert start == 0 or stride * c0 - reach >= start
        assert stop == size or stride * (c1 - 1) + reach <= stop - 1
    assert len({stop - start for start, stop, _, _ in windows}) <= 2


def test_receptive_fields():
    assert tiled.trunk_reach(configs.student(50)) == 273
    assert tiled.trunk_halo(configs.student(50)) == 18
    assert tiled.trunk_stride(configs.student(50)) == 16
    assert tiled.trunk_reach(configs.student_tiny(50)) == 49
    assert tiled.teacher_radius(configs.teacher(50)) == 3 <= configs.teacher(50).pad
    x = np.arange(7)
    for start, stop in ((0, 15), (3, 9), (10, 15)):
        np.testing.assert_array_equal(tiling._reflect_index(7, 4, start, stop),
                                      np.pad(x, 4, mode="reflect")[start:stop])


# --- Teacher and FERD ---------------------------------------------------------

@pytest.fixture(scope="module")
def ferd_100():
    x, gt = crop_256(100)
    extractor = inference.feature_extractor(CHECKPOINTS / "100bands", None, 100)
    whole = np.asarray(extractor(x)["spe_f"])
    return extractor, x, gt, whole


def test_tiled_teacher_and_ferd_equal_whole(ferd_100):
    extractor, x, gt, whole = ferd_100
    feats = extractor.tiled(TILE)
    whole_map = inference.ferd_map(x, whole)
    maps, f = tiling.detect_tiled(feats, x, plan.plan_scene(
        x.shape, "ferd", TILE, rx="stream"), export=True, chunk_pixels=5000)
    assert rel(f["spe_f"], whole) <= 1e-5
    assert auc(maps, gt) == pytest.approx(auc(whole_map, gt), abs=1e-6)
    assert rel(maps, whole_map) <= 1e-6


# --- Student and FERS ---------------------------------------------------------

def test_trunk_seams_are_exact_and_the_halo_is_tight():
    """A small student, so that windows of 32 + 2 x 64 pixels cut a 256 crop."""
    x, _ = crop_256(50)
    x = x[:, :202, :185]  # sizes that are no multiple of 16
    cfg = configs.student_tiny(50)
    student = convert.build("student", cfg)
    s_vars = fake_variables(student, x[:, :32, :32])
    whole = jax.jit(lambda v, x: student.apply(v, x))(s_vars, x)
    teacher = convert.build("teacher", configs.teacher_tiny(50))
    t_vars = fake_variables(teacher, x[:, :16, :16])
    feats = tiling.TiledFeatures(teacher, t_vars, student, s_vars, (64, 40),
                                 trunk_tile=32)
    state = feats.student_state(x)
    assert rel(state.trunk, whole["trunk"]) <= 1e-6
    spa = np.empty(whole["spa_f"].shape, np.float32)
    for rows in tiling.spans(x.shape[1], 64):
        for cols in tiling.spans(x.shape[2], 40):
            tiling._own(spa, rows, cols)[...] = tiling._own_part(
                np.asarray(feats.spa_tile(state, rows, cols)), rows, cols)
    assert rel(spa, whole["spa_f"]) <= 1e-5
    feats.halo -= 1  # one cell short: the kept cells see zero padding
    assert rel(feats.student_state(x).trunk, whole["trunk"]) > 1e-6


@pytest.fixture(scope="module")
def fers_50():
    x, gt = crop_256(50)
    extractor = inference.feature_extractor(CHECKPOINTS / "50bands", STUDENT_50, 50)
    whole = {k: np.asarray(v) for k, v in extractor(x).items()}
    feats = extractor.tiled(TILE)
    maps, by_tile = tiling.detect_tiled(feats, x, plan.plan_scene(x.shape, "fers", TILE),
                                        export=True)
    return x, gt, whole, by_tile, maps


def test_tiled_fers_features_and_auc_equal_whole(fers_50):
    """The 50-band product path end to end (float32 RX; rx='auto' runs the
    whole-image RX on the small tiled cube).

    spa_f differs by ~1e-6 relative (its SE mean is summed in another
    order), and this float32 RX turns any such difference into AUC noise:
    random 1e-7 relative perturbations of the whole-image spa_f move this
    crop's AUC by 3e-7 to 2.6e-6 (the tiled features by 2.0e-6). So 1e-5
    here; the float64 paths below hold 1e-6.
    """
    x, gt, whole, tiled, maps = fers_50
    assert rel(tiled["spe_f"], whole["spe_f"]) <= 1e-5
    assert rel(tiled["spa_f"], whole["spa_f"]) <= 1e-5
    whole_map = inference.fers_map(x, whole["spe_f"], whole["spa_f"], "product")
    assert auc(maps, gt) == pytest.approx(auc(whole_map, gt), abs=1e-5)


@pytest.mark.parametrize("fusion", ["sum", "product"])
def test_tiled_features_streamed_float64_rx_auc_equals_whole(fers_50, fusion):
    """detect_tiled's RX inputs from the tiled features, RX streamed in
    float64 over 5000-pixel chunks."""
    x, gt, whole, tiled, _ = fers_50
    whole_map = inference.fers_map(x, whole["spe_f"], whole["spa_f"], fusion, "float64")
    if fusion == "sum":
        streamed = detectors.rx_streaming((x + tiled["spe_f"] + tiled["spa_f"])[0],
                                          chunk_pixels=5000)
    else:
        streamed = detectors.fuse([detectors.rx_streaming((x + tiled[k])[0],
                                                          chunk_pixels=5000)
                                   for k in ("spa_f", "spe_f")], "product")
    assert auc(np.asarray(streamed)[None], gt) == pytest.approx(
        auc(whole_map, gt), abs=1e-6)


def test_streamed_float32_rx_is_order_sensitive_not_wrong(fers_50):
    """The product path's float32 RX, streamed: its float32 sums in another
    order move the AUC by ~1e-5 (documented in detect_tiled), not more."""
    x, gt, whole, tiled, _ = fers_50
    whole_map = inference.fers_map(x, whole["spe_f"], whole["spa_f"], "product")
    streamed = detectors.fuse([detectors.rx_streaming(
        (x + tiled[k])[0], "float32", chunk_pixels=5000) for k in ("spa_f", "spe_f")],
        "product")
    assert auc(np.asarray(streamed)[None], gt) == pytest.approx(
        auc(whole_map, gt), abs=1e-4)


# --- Streaming RX -------------------------------------------------------------

def test_rx_streaming_equals_rx():
    scene = data.load_scene(SCENES / "abu-airport-2.mat")
    x = data.prepare(scene)
    whole = np.asarray(detectors.rx(x))
    streamed = detectors.rx_streaming(x, chunk_pixels=999)
    assert rel(streamed, whole) <= 1e-8
    assert metrics.scene_metrics(streamed, scene.gt)["auc"] == pytest.approx(
        metrics.scene_metrics(whole, scene.gt)["auc"], abs=1e-9)
    stats = detectors.rx_stats(x, "float64", 999)
    np.testing.assert_allclose(detectors.rx_score(x[:3], stats), whole[:3], rtol=1e-8)
    f32 = detectors.rx_streaming(x, "float32", chunk_pixels=999)
    assert f32.dtype == np.float32
    assert metrics.scene_metrics(f32, scene.gt)["auc"] == pytest.approx(
        metrics.scene_metrics(np.asarray(detectors.rx(x, "float32")), scene.gt)["auc"],
        abs=1e-4)




@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_rx_accumulator_any_block_order_equals_rx(offset):
    """Blocks added out of order (as tiles are spilled), with the first
    block far from the image's mean (the shift) and, with `offset`, pixels
    far from zero: the one-pass float64 statistics give rx's map."""
    scene = data.load_scene(SCENES / "abu-airport-2.mat")
    x = data.prepare(scene) + np.float32(offset)
    h, w, b = x.shape
    whole = np.asarray(detectors.rx(x))
    acc = detectors.RXAccumulator(b, "float64")
    blocks = [(r, c) for r in range(0, h, 17) for c in range(0, w, 23)]
    order = np.random.default_rng(0).permutation(len(blocks))
    brightest = int(np.argmax([x[r:r + 17, c:c + 23].mean() for r, c in blocks]))
    for i in [brightest] + [i for i in order if i != brightest]:
        r, c = blocks[i]
        acc.add(x[r:r + 17, c:c + 23])
    assert acc.n == h * w
    streamed = detectors.rx_streaming(x, "float64", 999, accumulated=acc)
    assert rel(streamed, whole) <= 1e-8
    # float32 keeps the whole-image float32 arithmetic: the passes over x.
    acc32 = detectors.RXAccumulator(b, "float32")
    acc32.add(x)
    np.testing.assert_array_equal(
        detectors.rx_streaming(x, "float32", 999, accumulated=acc32),
        detectors.rx_streaming(x, "float32", 999))


def test_rx_accumulator_refuses_nan():
    acc = detectors.RXAccumulator(3)
    acc.add(np.ones((2, 3)), first_row=0)
    acc.add(np.array([[1.0, np.nan, 2.0]]), first_row=4)
    with pytest.raises(InputError, match="NaN or Inf values \\(rows from 4\\)"):
        acc.stats()
# --- evaluate.py, the rules, normalisation, bfloat16 ----------------------------

def run(tmp_path, name, *args):
    out = tmp_path / name
    assert cli.run(evaluate.main, ["--scenes", str(SCENES / "pavia-car.mat"),
                                   "--out", str(out), "--quiet", "--no-plots",
                                   *args]) == 0
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.parametrize("method", ["rx", "ferd"])
def test_evaluate_tile_option(tmp_path, method):
    args = ["--method", method]
    if method == "ferd":
        args += ["--bands", "100", "--teacher", str(CHECKPOINTS / "100bands")]
    whole, wout = run(tmp_path, "whole", *args, "--tile", "off")
    tiled, tout = run(tmp_path, "tiled", *args, "--tile", "32,40")
    assert tiled["config"]["tile"] == [32, 40]
    a, b = whole["scenes"][0], tiled["scenes"][0]
    assert b["auc"] == pytest.approx(a["auc"], abs=1e-6)
    ma = np.load(wout / "maps" / "pavia-car.npy")
    mb = np.load(tout / "maps" / "pavia-car.npy")
    assert rel(mb, ma) <= 1e-5


def test_evaluate_rejects_a_bad_tile(tmp_path):
    out = tmp_path / "out"
    assert cli.run(evaluate.main, ["--scenes", str(SCENES / "pavia-car.mat"),
                                   "--out", str(out), "--tile", "0,5"]) == 2


def test_auto_tile_rule():
    gib = 1 << 30
    assert plan.auto_tile((16, 100, 100, 200), "fers", available=16 * gib) is None
    assert plan.auto_tile((1, 2048, 1024, 200), "rx", available=1 << 50) == plan.AUTO_TILE
    # 512 x 512 FERS at 200 bands: ~4.6 GB estimated, tiled on an 8 GiB device only
    assert plan.auto_tile((1, 512, 512, 200), "fers", available=8 * gib) == plan.AUTO_TILE
    assert plan.auto_tile((1, 512, 512, 200), "fers", available=80 * gib) is None
    assert plan.estimate_bytes((1, 100, 100, 200), "rx") < plan.estimate_bytes(
        (1, 100, 100, 200), "ferd") < plan.estimate_bytes((1, 100, 100, 200), "fers")
    assert plan.parse_tile("64") == (64, 64) and plan.parse_tile("off") is None


def test_normalise_tiled_equals_normalise():
    cube = data.load_scene(SCENES / "pavia-car.mat").cube
    np.testing.assert_array_equal(data.normalise_streamed(cube, rows=7),
                                  data.normalise(cube))


def test_bfloat16_features_are_close():
    x, _ = crop_256(50)
    x = x[:, :24, :32]
    ref = inference.feature_extractor(CHECKPOINTS / "50bands", None, 50)
    bf = inference.feature_extractor(CHECKPOINTS / "50bands", None, 50, dtype="bfloat16")
    a, b = np.asarray(ref(x)["spe_f"]), bf(x)["spe_f"]
    assert b.dtype == np.float32
    assert 0 < rel(b, a) < 0.05
