"""evaluate.py end to end on the shared scenes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from conftest import GOLDEN, REPO, SCENES

import evaluate  # the thin script at the repository root
from fers_jax import cli


@pytest.fixture(scope="module")
def rx_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rx")
    code = cli.run(evaluate.main, ["--scenes", str(SCENES), "--method", "rx",
                                   "--out", str(out), "--quiet"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_rx_matches_reference_aucs_and_maps(rx_run):
    out, results = rx_run
    reference = json.loads((GOLDEN / "scene_maps" / "auc.json").read_text())
    assert len(results["scenes"]) == 5
    for row in results["scenes"]:
        assert row["auc"] == pytest.approx(reference[row["name"]]["grx_allbands"], abs=1e-4)
        ours = np.load(out / "maps" / f"{row['name']}.npy")
        with np.load(GOLDEN / "scene_maps" / f"{row['name']}.npz") as ref:
            rho = scipy.stats.spearmanr(ours.ravel(), ref["grx_allbands"].ravel())[0]
        assert rho > 0.9999, row["name"]
    assert results["mean_auc"] == pytest.approx(
        np.mean([r["auc"] for r in results["scenes"]]))


def test_results_contract(rx_run):
    out, results = rx_run
    assert {"method", "bands", "device", "mean_auc", "scenes"} <= set(results)
    for row in results["scenes"]:
        assert {"name", "shape", "auc", "auc_pd_tau", "auc_pf_tau", "seconds",
                "compile_seconds"} <= set(row)
        assert row["seconds"] > 0 and row["compile_seconds"] >= 0
        assert (out / "maps" / f"{row['name']}.png").stat().st_size > 0
    assert (out / "roc.png").stat().st_size > 0


def test_bands_and_empty_mask(tmp_path):
    cube = np.random.default_rng(0).random((20, 24, 12)).astype(np.float32)
    np.savez(tmp_path / "plain.npz", data=cube, gt=np.zeros((20, 24), np.uint8))
    out = tmp_path / "out"
    assert cli.run(evaluate.main, ["--scenes", str(tmp_path / "plain.npz"),
                                   "--bands", "8", "--start-band", "2",
                                   "--out", str(out), "--quiet", "--no-plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["scenes"][0]
    assert row["shape"] == [20, 24, 12] and row["auc"] is None
    assert results["mean_auc"] is None and results["bands"] == 8
    assert np.load(out / "maps" / "plain.npy").shape == (20, 24)


def test_same_shape_scenes_are_batched(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        gt = np.zeros((16, 16), np.uint8)
        gt[i, i] = 1
        np.savez(tmp_path / f"s{i}.npz", data=rng.random((16, 16, 6)), gt=gt)
    out = tmp_path / "out"
    assert cli.run(evaluate.main, ["--scenes", str(tmp_path), "--out", str(out),
                                   "--quiet", "--no-plots", "--batch-size", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())["scenes"]
    assert [r["compile_seconds"] > 0 for r in rows].count(True) <= 2
    # batched maps equal the maps of each scene alone
    for i in range(3):
        alone = tmp_path / f"alone{i}"
        cli.run(evaluate.main, ["--scenes", str(tmp_path / f"s{i}.npz"), "--out",
                                str(alone), "--quiet", "--no-plots"])
        np.testing.assert_allclose(np.load(out / "maps" / f"s{i}.npy"),
                                   np.load(alone / "maps" / f"s{i}.npy"), rtol=1e-6)


def test_user_errors_are_one_line_with_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--scenes", str(tmp_path / "none"),
         "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
