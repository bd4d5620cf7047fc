"""The Python face of fers_jax: load a scene, run a detector, score a map.

Each function is a thin layer over the modules that evaluate.py uses
(data, evaluation's detectors, inference, checkpoints, metrics), so a map
made here is the map evaluate.py writes for the same scene and options.

    import fers_jax

    scene = fers_jax.load_scene("../shared/data/scenes/pavia-car.mat")
    rx_map = fers_jax.detect(scene, "rx")      # (H, W)
    fers_map = fers_jax.detect(scene, "fers", teacher=TEACHER, student=STUDENT,
                               bands=50)
    fers_jax.score(rx_map, scene.gt)["auc"]

`detect` loads a model's checkpoints on every call; `detector(...)` loads
them once and returns a function to call on many cubes.
"""

import argparse
import dataclasses
from typing import Callable, Optional, Union

import numpy as np

from fers_jax import data, evaluation, metrics
from fers_jax.data import Scene
from fers_jax.errors import InputError

METHODS = evaluation.METHODS
# EvalConfig fields that are about files and reports, not about a detector.
_NOT_OPTIONS = ("method", "batch_size", "sensor", "cube_key", "gt_key",
                "export", "plots")
OPTIONS = tuple(f.name for f in dataclasses.fields(evaluation.EvalConfig)
                if f.name not in _NOT_OPTIONS)


def load_scene(path, cube_key: Optional[str] = None,
               gt_key: Optional[str] = None) -> Scene:
    """One scene file (.mat, .npz, .npy, HAD100 image): `data.load_scene`.

    Returns a Scene: `cube` (H, W, B) float32 as stored, `gt` (H, W) uint8
    or None, `name`, `path`.
    """
    return data.load_scene(path, cube_key, gt_key)


def load_scenes(paths, **kwargs) -> list:
    """Files, folders and HAD100 roots: `data.load_scenes`."""
    return data.load_scenes([paths] if isinstance(paths, (str, bytes)) or
                            not hasattr(paths, "__iter__") else paths, **kwargs)


def detector(method: str = "rx", **options) -> Callable:
    """A detector function, its checkpoints loaded and compiled once.

    Args:
      method: one of METHODS ('rx', 'lrx', 'crd', 'ferd', 'fers').
      **options: evaluate.py's options by their EvalConfig names (OPTIONS):
        teacher / student (checkpoint files, folders or train.py run
        folders), bands, start_band, precision, inner, outer, lam,
        convention, border, lrx_form, crd_form, delta, fusion, tile, dtype,
        shard.

    Returns:
      f(cube) -> map: a Scene or an array (H, W, B), or a batch
      (N, H, W, B) of one shape, as stored (the reference's band selection
      and normalisation are applied, as evaluate.py does); the map is
      (H, W), or (N, H, W) for a batch, in the detector's arithmetic
      (float64 for float64 RX, LRX, CRD): what evaluate.py scores, and
      writes to maps/ as float32.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown detector option(s) {unknown}; options are "
                         f"{', '.join(OPTIONS)}")
    args = {"method": method, **{k: v for k, v in options.items()
                                 if k not in ("teacher", "student") or v is None}}
    for k in ("teacher", "student"):
        if options.get(k) is not None:
            args[k] = str(options[k])
    defaults = dataclasses.asdict(evaluation.EvalConfig())
    cfg = evaluation.config_from_args(argparse.Namespace(**{**defaults, **args}))
    run, cfg = evaluation.build_detector(cfg)

    def detect_one(cube: Union[Scene, np.ndarray]) -> np.ndarray:
        where = cube.path if isinstance(cube, Scene) else "cube"
        x = np.asarray(cube.cube if isinstance(cube, Scene) else cube)
        single = x.ndim == 3
        batch = x[None] if single else x
        if batch.ndim != 4:
            raise InputError(f"{where}: expected a cube (H, W, B) or a batch "
                             f"(N, H, W, B); got shape {x.shape}")
        inputs = np.stack([evaluation.prepare_input(data.check_cube(c, where),
                                                    cfg, where) for c in batch])
        maps = np.asarray(run(inputs)[0])  # as scored by evaluate.py
        return maps[0] if single else maps
    return detect_one


def detect(cube: Union[Scene, np.ndarray], method: str = "rx",
           **options) -> np.ndarray:
    """The detection map of `cube` by `method`: `detector(method, **options)(cube)`."""
    return detector(method, **options)(cube)


def score(score_map, gt, where: str = "map") -> dict:
    """A map against its mask (gt == 1 anomaly): `metrics.scene_metrics`.

    Returns {'auc', 'auc_pd_tau', 'auc_pf_tau', 'best_f1', 'score_stats'};
    with a mask that cannot give an AUC (none, no anomaly pixel) `auc` is
    None and 'not_scored' says why.
    """
    if gt is not None and np.ndim(score_map) == 2:
        gt = data.check_mask(gt, np.shape(score_map)[:2], where)
    return metrics.scene_metrics(score_map, gt, where)
