"""Scenes larger than the memory budget: the out-of-core path (fers_jax.plan,
fers_jax.tiling.LazyImage / SpillCube) gives the in-memory maps.

Small scenes with a tiny --memory-budget, through evaluate.py in-process:
RX, FERD and FERS (sum and the 50-band product fusion), LRX and CRD (in
blocks of rows, each border) out of core against the same run in memory,
from .npz, .npy and ENVI BIL; --export out of core; the refusal of a
budget too small for one tile (with the smallest budget that works, which
then works); and Ctrl-C mid-scene leaving no partial outputs.
"""

import json

import numpy as np
import pytest
import spectral.io.envi as envi

import evaluate
from conftest import CHECKPOINTS, GOLDEN
from fers_jax import cli, plan, plots, tiling
from test_bad_inputs import assert_error

TEACHER = CHECKPOINTS / "50bands"
STUDENT = GOLDEN / "spa_fen_random_50bands.pt"
SHAPE = (70, 66, 50)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ooc")
    rng = np.random.default_rng(11)
    cube = (rng.random(SHAPE) * 1000).astype(np.int16)
    gt = np.zeros(SHAPE[:2], np.uint8)
    gt[20:23, 30:32] = 1
    cube[20:23, 30:32] += 250
    np.savez(root / "s.npz", data=cube, map=gt)
    np.save(root / "s.npy", cube)
    envi.save_image(str(root / "e.hdr"), cube, interleave="bil", byteorder=1)
    np.save(root / "e_mask.npy", gt)
    return root


def run(capsys, out, scene, method, budget, *extra):
    argv = ["--scenes", scene, "--method", method, "--out", out, "--quiet",
            "--no-plots", "--memory-budget", str(budget), *extra]
    if method in ("ferd", "fers"):
        argv += ["--teacher", TEACHER, "--bands", "50"]
    if method == "fers":
        argv += ["--student", STUDENT]
    code = cli.run(evaluate.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    name = results["scenes"][0]["name"]
    return results, np.load(out / "maps" / f"{name}.npy")


CASES = [("rx", [], 0.004), ("ferd", [], 0.03), ("fers", ["--fusion", "sum"], 0.05),
         ("fers", [], 0.05)]


@pytest.mark.parametrize("method,extra,budget", CASES)
def test_out_of_core_maps_equal_in_memory(tmp_path, capsys, scenes, method, extra, budget):
    whole, whole_map = run(capsys, tmp_path / "mem", scenes / "s.npz", method, 8, *extra)
    ooc, ooc_map = run(capsys, tmp_path / "ooc", scenes / "s.npz", method, budget, *extra)
    assert whole["paths"] == ["whole"] and ooc["paths"] == ["out-of-core"]
    assert ooc["scenes"][0]["plan"]["tile"][0] < SHAPE[0]  # really tiled
    assert ooc["scenes"][0]["auc"] == pytest.approx(whole["scenes"][0]["auc"], abs=1e-6)
    # float32 rounding; the product path's float32 RX sums in another order
    tol = 1e-4 if ooc["scenes"][0]["plan"]["rx_precision"] == "float32" else 1e-5
    assert np.abs(ooc_map - whole_map).max() <= tol * np.abs(whole_map).max()
    assert not list((tmp_path / "ooc").rglob(".spill")) and not list(
        (tmp_path / "ooc").glob(".staging-*"))


@pytest.mark.parametrize("name", ["s.npy", "e.hdr"])
def test_npy_and_envi_bil_out_of_core(tmp_path, capsys, scenes, name):
    ref, ref_map = run(capsys, tmp_path / "ref", scenes / "s.npz", "ferd", 8)
    got, got_map = run(capsys, tmp_path / "got", scenes / name, "ferd", 0.03)
    assert got["paths"] == ["out-of-core"]
    np.testing.assert_allclose(got_map, ref_map, rtol=1e-5,
                               atol=1e-6 * np.abs(ref_map).max())
    if name == "e.hdr":
        assert got["scenes"][0]["auc"] == pytest.approx(ref["scenes"][0]["auc"], abs=1e-6)


def test_export_out_of_core_equals_in_memory(tmp_path, capsys, scenes):
    run(capsys, tmp_path / "mem", scenes / "s.npz", "fers", 8, "--fusion", "sum",
        "--export")
    ooc, _ = run(capsys, tmp_path / "ooc", scenes / "s.npz", "fers", 0.05,
                 "--fusion", "sum", "--export")
    assert ooc["paths"] == ["out-of-core"]
    whole = np.load(tmp_path / "mem" / "features" / "s.npz")
    got = np.load(tmp_path / "ooc" / "features" / "s.npz")
    assert sorted(got.files) == sorted(whole.files) == ["spa_f", "spe_f"]
    for k in whole.files:
        assert got[k].shape == (SHAPE[:2] + (50,)) and got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], whole[k], rtol=1e-5,
                                   atol=1e-6 * np.abs(whole[k]).max())
    assert not list((tmp_path / "ooc").rglob(".spill"))


@pytest.mark.parametrize("method,scene,extra", [
    ("lrx", "s.npz", ["--outer", "7"]),
    ("crd", "e.hdr", ["--outer", "7", "--border", "reflect"]),
    ("crd", "s.npz", ["--outer", "7", "--border", "inside", "--convention", "matlab"])])
def test_lrx_and_crd_out_of_core_equal_in_memory(tmp_path, capsys, scenes, method,
                                                 scene, extra):
    # A budget that fits blocks of 16 rows but not the whole scene.
    shape = (1,) + SHAPE
    budget = (plan.out_of_core_bytes(shape, method, (16, SHAPE[1])) + 1e5) / 1e9
    assert budget * 1e9 < plan.in_memory_bytes(shape, method, "whole")
    whole, whole_map = run(capsys, tmp_path / "mem", scenes / scene, method, 8, *extra)
    ooc, ooc_map = run(capsys, tmp_path / "ooc", scenes / scene, method, budget, *extra)
    assert whole["paths"] == ["whole"] and ooc["paths"] == ["out-of-core"]
    assert ooc["scenes"][0]["plan"]["tile"] == [16, SHAPE[1]]  # 5 blocks, the last shifted
    assert ooc["scenes"][0]["auc"] == pytest.approx(whole["scenes"][0]["auc"], abs=1e-6)
    np.testing.assert_allclose(ooc_map, whole_map, rtol=1e-6,
                               atol=1e-6 * np.abs(whole_map).max())


def test_budget_too_small_names_the_smallest_that_works(tmp_path, capsys, scenes):
    argv = ["--scenes", scenes / "s.npz", "--method", "ferd", "--teacher", TEACHER,
            "--out", tmp_path / "o", "--quiet", "--no-plots", "--memory-budget", "0.001"]
    code = cli.run(evaluate.main, [str(a) for a in argv])
    line = assert_error(code, capsys.readouterr().err, scenes / "s.npz",
                        "too small for even one tile", "smallest budget that works")
    least = float(line.rsplit("--memory-budget ", 1)[1])
    results, _ = run(capsys, tmp_path / "o", scenes / "s.npz", "ferd", least)
    assert results["paths"] == ["out-of-core"]
    with pytest.raises(Exception, match="smallest budget"):
        plan.plan_scene((1,) + SHAPE, "ferd", budget=int(least * 1e9) // 3)


def test_ctrl_c_mid_scene_leaves_no_partial_outputs(tmp_path, capsys, scenes, monkeypatch):
    out = tmp_path / "o"
    writes = []
    real = tiling.SpillCube.write

    def interrupted(self, *args):
        writes.append(1)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return real(self, *args)
    monkeypatch.setattr(tiling.SpillCube, "write", interrupted)
    argv = ["--scenes", scenes / "s.npz", "--method", "ferd", "--teacher", TEACHER,
            "--out", out, "--quiet", "--memory-budget", "0.03"]
    assert cli.run(evaluate.main, [str(a) for a in argv]) == 130
    assert len(writes) == 3
    left = [p for p in out.rglob("*") if p.is_file()]
    assert left == [], left


def test_preview_png_is_downsampled(tmp_path):
    from PIL import Image
    score = np.zeros((3000, 500), np.float32)
    score[1234, 321] = 1.0
    gt = (score > 0).astype(np.uint8)
    plots.save_map(tmp_path / "big.png", score, gt, "big", max_side=300)
    plots.save_map(tmp_path / "small.png", score[:300, :300], None, "small",
                   max_side=300)
    assert Image.open(tmp_path / "big.png").size[0] > 0
    assert plots._block_max(score, 10).shape == (300, 50)
    assert plots._block_max(score, 10).max() == 1.0  # one pixel survives
