"""Figures of the evaluation: a map beside its mask, several methods' maps
side by side, ROC curves, box plots."""

import pathlib
from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_map(path, score_map: np.ndarray, gt: Optional[np.ndarray],
             title: str = "", max_side: Optional[int] = None) -> None:
    """Writes the detection map (and the ground truth beside it) as a PNG.

    A map larger than `max_side` pixels on a side is shown as a preview
    downsampled by block maxima (so that small anomalies and high scores
    stay visible); the full map is the .npy.
    """
    score_map, gt, title = preview(score_map, gt, title, max_side)
    panels = 2 if gt is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    axes[0, 0].imshow(score_map, cmap="magma")
    axes[0, 0].set_title(title or "detection map", fontsize=9)
    if gt is not None:
        axes[0, 1].imshow(gt, cmap="gray", vmin=0, vmax=1)
        axes[0, 1].set_title("ground truth", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(pathlib.Path(path), dpi=100)
    plt.close(fig)


def save_maps(path, maps: Dict[str, np.ndarray], gt: Optional[np.ndarray],
              title: str = "", max_side: Optional[int] = None) -> None:
    """Writes several methods' maps of one scene side by side (and its mask).

    The methods' scores live on different scales (Mahalanobis distances, a
    product of scaled maps): each map is min-max scaled to [0, 1] so that
    one colour bar reads them all.
    """
    if max_side is not None:  # large scenes: previews (see `preview`)
        maps = {k: preview(v, None, "", max_side)[0] for k, v in maps.items()}
        gt = None if gt is None else preview(gt, None, "", max_side)[0]
    first = int(gt is not None)  # the mask leads, the maps and their bar follow
    fig, axes = plt.subplots(1, len(maps) + first,
                             figsize=(2.8 * (len(maps) + first) + 0.8, 3.2),
                             squeeze=False)
    if gt is not None:
        axes[0, 0].imshow(gt, cmap="gray", vmin=0, vmax=1)
        axes[0, 0].set_title("ground truth", fontsize=9)
    image = None
    for ax, (name, m) in zip(axes[0, first:], maps.items()):
        m = np.asarray(m, np.float64)
        span = m.max() - m.min()
        image = ax.imshow((m - m.min()) / span if span > 0 else np.zeros_like(m),
                          cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8,
                 label="score (min-max scaled per map)")
    fig.savefig(pathlib.Path(path), dpi=100)
    plt.close(fig)


def preview(score_map, gt, title: str, max_side: Optional[int]):
    """(map, mask, title) downsampled by block maxima to at most `max_side`
    pixels a side (unchanged when smaller or max_side is None)."""
    step = 1 if max_side is None else -(-max(np.shape(score_map)) // max_side)
    if step <= 1:
        return score_map, gt, title
    gt = None if gt is None else _block_max(gt, step)
    return _block_max(score_map, step), gt, f"{title} (preview 1:{step})"


def _block_max(a: np.ndarray, step: int) -> np.ndarray:
    h, w = a.shape
    hp, wp = -(-h // step) * step, -(-w // step) * step
    padded = np.pad(np.asarray(a, np.float32), ((0, hp - h), (0, wp - w)), mode="edge")
    return padded.reshape(hp // step, step, wp // step, step).max(axis=(1, 3))


def save_roc(path, curves: Dict[str, tuple], title: str = "ROC") -> None:
    """Writes the ROC curves {name: (fpr, tpr, thresholds)}, log-scaled FPR."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (fpr, tpr, _) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=name, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if len(curves) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(pathlib.Path(path), dpi=100)
    plt.close(fig)


def save_boxplots(path, stats: Dict[str, dict], title: str = "") -> None:
    """Background vs anomaly box plots from `metrics.score_stats` per scene."""
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(stats)), 3.5))
    boxes, positions, colours = [], [], []
    for i, (name, s) in enumerate(stats.items()):
        for j, part in enumerate(("background", "anomaly")):
            if part not in s:
                continue
            b = s[part]
            boxes.append({"med": b["median"], "q1": b["q1"], "q3": b["q3"],
                          "whislo": b["whisker_low"], "whishi": b["whisker_high"],
                          "fliers": [], "label": ""})
            positions.append(3 * i + j)
            colours.append("tab:blue" if part == "background" else "tab:red")
    artists = ax.bxp(boxes, positions=positions, patch_artist=True, showfliers=False)
    for patch, colour in zip(artists["boxes"], colours):
        patch.set_facecolor(colour)
    ax.set_xticks([3 * i + 0.5 for i in range(len(stats))])
    ax.set_xticklabels(list(stats), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("scaled score")
    ax.set_title(title or "background (blue) vs anomaly (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(pathlib.Path(path), dpi=100)
    plt.close(fig)
