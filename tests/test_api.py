"""The Python API (fers_jax.load_scene / detect / detector / score): the
README's example as written, and the same maps and numbers as evaluate.py."""

import contextlib
import io
import json
import re

import numpy as np
import pytest

import fers_jax
from conftest import CHECKPOINTS, GOLDEN, REPO, SCENES, SHARED
from fers_jax import evaluation, metrics
from fers_jax.errors import CheckpointError, InputError

STUDENT_PT = GOLDEN / "spa_fen_random_50bands.pt"
REFERENCE = json.loads((GOLDEN / "scene_maps" / "auc.json").read_text())


def readme_example() -> str:
    """The ```python block of README.md's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_prints_the_reference_aucs(monkeypatch):
    code = readme_example().replace("../shared", str(SHARED))
    monkeypatch.chdir(REPO)
    printed, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), namespace)
    lines = dict(line.split() for line in printed.getvalue().splitlines())
    ref = REFERENCE["pavia-car"]
    assert float(lines["rx"]) == pytest.approx(ref["grx_allbands"], abs=1e-4)
    assert float(lines["ferd"]) == pytest.approx(ref["ferd_100bands"], abs=1e-4)
    assert namespace["rx"].shape == namespace["ferd"].shape == (80, 100)


def test_detect_is_the_map_evaluate_writes(tmp_path):
    full = fers_jax.load_scene(SCENES / "pavia-car.mat")
    ys, xs = np.nonzero(full.gt)
    y0, x0 = max(int(ys[0]) - 8, 0), max(int(xs[0]) - 8, 0)
    np.savez(tmp_path / "crop.npz", data=full.cube[y0:y0 + 32, x0:x0 + 32],
             map=full.gt[y0:y0 + 32, x0:x0 + 32])
    scene = fers_jax.load_scene(tmp_path / "crop.npz")
    assert 0 < scene.gt.sum() < scene.gt.size
    for method, options in (("rx", {}), ("lrx", {"inner": 3, "outer": 7})):
        cfg = evaluation.EvalConfig(method=method, plots=False, **options)
        results = evaluation.evaluate([tmp_path / "crop.npz"],
                                      tmp_path / method, cfg, progress=False)
        written = np.load(tmp_path / method / "maps" / "crop.npy")
        ours = fers_jax.detect(scene, method, **options)
        np.testing.assert_array_equal(ours.astype(np.float32), written)
        # an array works as the Scene does; the score is evaluate.py's
        np.testing.assert_array_equal(fers_jax.detect(scene.cube, method,
                                                      **options), ours)
        assert fers_jax.score(ours, scene.gt)["auc"] == \
            results["scenes"][0]["auc"]


def test_detector_loads_once_and_takes_batches():
    scene = fers_jax.load_scene(SCENES / "pavia-car.mat")
    crops = np.stack([scene.cube[:40, :48], scene.cube[40:, 52:]])
    run = fers_jax.detector("fers", teacher=CHECKPOINTS / "50bands",
                            student=STUDENT_PT, bands=50)
    maps = run(crops)
    assert maps.shape == (2, 40, 48)
    # alone or in a batch: the same map to float32 RX's rounding
    np.testing.assert_allclose(run(crops[1]), maps[1], rtol=0, atol=2e-4)
    # the product fusion of two min-max scaled maps lies in [0, 1]
    assert 0 <= maps.min() and maps.max() <= 1 + 1e-6


def test_score_takes_any_positive_mask():
    rng = np.random.default_rng(0)
    score_map = rng.random((6, 7))
    gt = np.zeros((6, 7), np.uint8)
    gt[1, 2] = gt[4, 5] = 255  # a 0/255 image mask
    got = fers_jax.score(score_map, gt)
    assert got["auc"] == metrics.roc_auc(score_map, gt > 0)
    assert fers_jax.score(score_map, None)["auc"] is None


def test_api_refusals():
    scene = fers_jax.load_scene(SCENES / "pavia-car.mat")
    with pytest.raises(InputError, match=r"unknown detector option\(s\) \['window'\]"):
        fers_jax.detect(scene, "rx", window=3)
    with pytest.raises(InputError, match="--method ferd needs --teacher"):
        fers_jax.detector("ferd")
    with pytest.raises(CheckpointError, match="does not exist"):
        fers_jax.detector("ferd", teacher=SHARED / "absent")
    with pytest.raises(InputError, match=r"cube: expected a cube \(H, W, B\)"):
        fers_jax.detect(np.zeros((4, 5)), "rx")
    with pytest.raises(InputError, match=r"the mask is \(3, 3\)"):
        fers_jax.score(np.zeros((4, 5)), np.zeros((3, 3)))
    with pytest.raises(AttributeError):
        fers_jax.no_such_function  # noqa: B018
