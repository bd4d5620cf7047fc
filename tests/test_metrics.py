"""Metrics against sklearn and against brute-force definitions."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fers_jax import metrics
from fers_jax.errors import InputError


@pytest.mark.parametrize("levels", [3, 50, None])
def test_roc_auc_equals_sklearn_with_ties(levels):
    rng = np.random.default_rng(levels or 0)
    gt = (rng.random((40, 30)) < 0.05).astype(np.uint8)
    scores = rng.random((40, 30)) + gt * 0.3
    if levels:
        scores = np.round(scores * levels)  # many ties
    assert metrics.roc_auc(scores, gt) == pytest.approx(
        roc_auc_score(gt.ravel(), scores.ravel()), abs=1e-12)


def test_roc_curve_equals_sklearn():
    rng = np.random.default_rng(3)
    gt = rng.random(500) < 0.1
    scores = np.round(rng.random(500) * 20)
    fpr, tpr, thr = metrics.roc_curve(scores, gt)
    ref_fpr, ref_tpr, _ = roc_curve(gt, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert thr[0] == np.inf and np.all(np.diff(thr[1:]) < 0)


def test_auc_3d_equals_integral_over_tau():
    rng = np.random.default_rng(4)
    gt = rng.random(300) < 0.2
    scores = rng.random(300) ** 2 + gt
    got = metrics.auc_3d(scores, gt)
    scaled = (scores - scores.min()) / np.ptp(scores)
    taus = np.linspace(0, 1, 20001)
    pd = [(scaled[gt] >= t).mean() for t in taus]
    pf = [(scaled[~gt] >= t).mean() for t in taus]
    assert got["auc_pd_tau"] == pytest.approx(np.trapezoid(pd, taus), abs=1e-3)
    assert got["auc_pf_tau"] == pytest.approx(np.trapezoid(pf, taus), abs=1e-3)


def test_best_f1_is_the_brute_force_maximum():
    rng = np.random.default_rng(5)
    gt = rng.random(200) < 0.15
    scores = np.round(rng.random(200) * 30) + 10 * gt * rng.random(200)
    best = metrics.best_f1(scores, gt)
    def f1(t):
        pred = scores >= t
        tp = np.sum(pred & gt)
        return 2 * tp / (2 * tp + np.sum(pred & ~gt) + np.sum(~pred & gt))
    assert best["f1"] == pytest.approx(max(f1(t) for t in np.unique(scores)))
    assert f1(best["threshold"]) == pytest.approx(best["f1"])


def test_unscorable_masks_are_reported_not_raised():
    out = metrics.scene_metrics(np.random.rand(4, 4), np.zeros((4, 4)))
    assert out["auc"] is None and "no anomaly" in out["not_scored"]
    out = metrics.scene_metrics(np.random.rand(4, 4), np.ones((4, 4)))
    assert out["auc"] is None and "every pixel" in out["not_scored"]
    with pytest.raises(InputError, match="cannot compute an AUC"):
        metrics.roc_auc(np.random.rand(4, 4), np.zeros((4, 4)))


def test_score_stats_separate_classes():
    gt = np.zeros(100, bool)
    gt[:10] = True
    scores = np.where(gt, 0.9, 0.1) + np.linspace(0, 0.05, 100)
    stats = metrics.score_stats(scores, gt)
    assert stats["anomaly"]["median"] > stats["background"]["q3"]
    assert stats["anomaly"]["count"] == 10 and stats["background"]["count"] == 90
