"""Scores of a detection map against its ground truth.

NumPy on the host: these run once per scene on (H*W,) vectors, and the ROC
AUC must equal sklearn's `roc_auc_score` to the last bits, ties included,
which the rank form below does (it is the Mann-Whitney U statistic, the
same number as the trapezoidal area under the ROC steps).
"""

from typing import Optional

import numpy as np
import scipy.stats

from fers_jax.errors import InputError


def _flat(score_map, gt, where="map"):
    if gt is None:
        raise InputError(f"{where}: no ground-truth mask to score the map "
                         "against")
    scores = np.asarray(score_map)
    labels = np.asarray(gt)
    # Flat vectors of equal size pair up; 2-D arrays must agree in shape (a
    # transposed mask has the right size and the wrong pixels).
    if scores.size != labels.size or (scores.shape != labels.shape
                                      and min(scores.ndim, labels.ndim) > 1):
        raise InputError(f"{where}: the map is {scores.shape} but the mask "
                         f"is {labels.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise InputError(f"{where}: the detection map holds {scores.dtype}, "
                         "not real numbers")
    scores = scores.astype(np.float64).ravel()
    labels = labels.ravel() == 1
    if not np.all(np.isfinite(scores)):
        raise InputError(f"{where}: the detection map has NaN or Inf values")
    return scores, labels


def check_scorable(gt, where="scene") -> Optional[str]:
    """Why a mask cannot give an AUC (None when it can)."""
    if gt is None:
        return "no ground-truth mask"
    n_anomaly = int(np.sum(np.asarray(gt) == 1))
    if n_anomaly == 0:
        return "the mask has no anomaly pixels"
    if n_anomaly == np.size(gt):
        return "every pixel of the mask is an anomaly"
    return None


def roc_auc(score_map, gt, where="map") -> float:
    """ROC AUC of a map against gt == 1; equal to sklearn's roc_auc_score."""
    scores, labels = _flat(score_map, gt, where)
    reason = check_scorable(labels, where)
    if reason:
        raise InputError(f"{where}: cannot compute an AUC: {reason}")
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(score_map, gt):
    """False and true positive rates at every distinct threshold, descending.

    Returns:
      (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf.
    """
    scores, labels = _flat(score_map, gt)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[np.diff(scores) != 0, True]
    tp = np.cumsum(labels)[last_of_run]
    fp = np.cumsum(~labels)[last_of_run]
    tpr = np.r_[0.0, tp / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_run]]


def auc_3d(score_map, gt) -> dict:
    """AUC(Pd, tau) and AUC(Pf, tau) of the 3D ROC (Chang, TGRS 2021).

    With the map min-max scaled to [0, 1] and a pixel detected where its
    score >= tau, the area under Pd(tau) over tau in [0, 1] is exactly the
    mean scaled score of the anomaly pixels (each pixel counts for the
    length of tau it survives), and likewise Pf for the background: the
    closed form of the integral, not a sampled approximation of it.
    """
    scores, labels = _flat(score_map, gt)
    span = scores.max() - scores.min()
    scaled = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
    pd = float(scaled[labels].mean()) if labels.any() else float("nan")
    pf = float(scaled[~labels].mean()) if (~labels).any() else float("nan")
    return {"auc_pd_tau": pd, "auc_pf_tau": pf}


def best_f1(score_map, gt) -> dict:
    """The threshold (pixel detected where score >= it) with the highest F1."""
    scores, labels = _flat(score_map, gt)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    n_pos = labels.sum()
    tp = tpr[1:] * n_pos
    fp = fpr[1:] * (labels.size - n_pos)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1)
    i = int(np.argmax(f1))
    return {"threshold": float(thresholds[1:][i]), "f1": float(f1[i]),
            "precision": float(tp[i] / max(tp[i] + fp[i], 1)),
            "recall": float(tp[i] / max(n_pos, 1))}


def score_stats(score_map, gt) -> dict:
    """Box-plot statistics of the [0, 1]-scaled scores, background vs anomaly."""
    scores, labels = _flat(score_map, gt)
    span = scores.max() - scores.min()
    scaled = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
    stats = {}
    for name, part in (("background", scaled[~labels]), ("anomaly", scaled[labels])):
        if part.size == 0:
            continue
        q1, med, q3 = np.percentile(part, [25, 50, 75])
        iqr = q3 - q1
        inside = part[(part >= q1 - 1.5 * iqr) & (part <= q3 + 1.5 * iqr)]
        stats[name] = {"q1": float(q1), "median": float(med), "q3": float(q3),
                       "whisker_low": float(inside.min()),
                       "whisker_high": float(inside.max()),
                       "mean": float(part.mean()), "count": int(part.size)}
    return stats


def scene_metrics(score_map, gt, where="scene") -> dict:
    """All per-scene numbers: AUC, 3D ROC areas, best F1, box statistics.

    A scene whose mask cannot give an AUC is reported with `auc` None and the
    reason, not an error.
    """
    reason = check_scorable(gt, where)
    if reason:
        return {"auc": None, "auc_pd_tau": None, "auc_pf_tau": None,
                "not_scored": reason}
    out = {"auc": roc_auc(score_map, gt, where)}
    out.update(auc_3d(score_map, gt))
    out["best_f1"] = best_f1(score_map, gt)
    out["score_stats"] = score_stats(score_map, gt)
    return out
