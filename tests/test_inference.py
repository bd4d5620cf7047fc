"""FERD and FERS maps on the shared scenes against the reference's."""

import json

import numpy as np
import pytest

from conftest import CHECKPOINTS, GOLDEN, SCENES

import evaluate
from fers_jax import cli, inference, plan

REFERENCE_AUC = json.loads((GOLDEN / "scene_maps" / "auc.json").read_text())


def run(tmp_path, *args):
    out = tmp_path / "out"
    assert cli.run(evaluate.main, ["--scenes", str(SCENES), "--out", str(out),
                                   "--quiet", "--no-plots", *args]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_ferd_100_bands_matches_reference(tmp_path):
    out, results = run(tmp_path, "--method", "ferd", "--bands", "100", "--export",
                       "--teacher", str(CHECKPOINTS / "100bands"))
    assert results["bands"] == 100
    for row in results["scenes"]:
        assert row["auc"] == pytest.approx(
            REFERENCE_AUC[row["name"]]["ferd_100bands"], abs=1e-4), row["name"]
        with np.load(out / "features" / f"{row['name']}.npz") as f:
            assert f["spe_f"].shape == tuple(row["shape"][:2]) + (100,)


def test_fers_50_bands_product_matches_reference(tmp_path):
    _, results = run(tmp_path, "--method", "fers", "--bands", "50",
                     "--teacher", str(CHECKPOINTS / "50bands"),
                     "--student", str(GOLDEN / "spa_fen_random_50bands.pt"))
    for row in results["scenes"]:
        # float32 RX with torch's pinv cutoff: 1e-4 is out of reach (SPEC 6).
        assert row["auc"] == pytest.approx(
            REFERENCE_AUC[row["name"]]["fers_50bands_random_student"], abs=1e-3)


def test_fusion_rules():
    assert plan.resolve_fusion("auto", 50) == "product"
    assert plan.resolve_fusion("auto", 51) == "sum"
    assert plan.resolve_precision("auto", "product") == "float32"
    x = np.random.default_rng(0).random((1, 12, 10, 6)).astype(np.float32) * 0.1
    zero = np.zeros_like(x)
    # sum fusion with zero features is plain RX of x
    np.testing.assert_allclose(inference.fers_map(x, zero, zero, "sum"),
                               inference.ferd_map(x, zero), rtol=1e-12)


def test_teacher_with_wrong_band_count_is_refused(tmp_path):
    out = tmp_path / "out"
    code = cli.run(evaluate.main, ["--scenes", str(SCENES / "pavia-car.mat"),
                                   "--method", "ferd", "--bands", "50", "--out", str(out),
                                   "--teacher", str(CHECKPOINTS / "100bands"), "--quiet"])
    assert code == 2 and not (out / "results.json").exists()
