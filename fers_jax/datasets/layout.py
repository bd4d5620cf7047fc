"""Writes a HAD100-layout folder from any scenes.

    python -m fers_jax.datasets.layout --scenes SCENES... --out DIR \
        [--size 64] [--stride 64] [--sensor aviris_ng] [--bands N] \
        [--split auto|train|test]

The result reads like the real HAD100Dataset (SPEC section 1):
`train/<sensor>/<name>.npy` and `test/<sensor>/<name>.npy`, each (size, size,
B) float32 as stored, and `ground_truth/<sensor>/<name>.png` for every test
crop: an RGB PNG with the anomaly mask in the green channel (255 = anomaly,
red and blue 0). It is how the tests, and users without HAD100, get that
layout; crops are named `<scene>_y<y>_x<x>`.

Which crop goes where (`split`):
  auto: crops that touch an anomaly pixel go to test, the others to train.
    A scene without a mask goes to train whole. Test crops and train crops
    of the same scene may overlap; this is a stand-in for HAD100, not a
    held-out benchmark.
  train: only the crops free of anomalies, all to train.
  test: every crop to test, with its mask (which may be empty).
"""

import argparse
import pathlib
import sys
from typing import Iterable, Optional

import numpy as np

from fers_jax import data
from fers_jax.datasets import crops
from fers_jax.errors import FersError, InputError

SPLIT_RULES = ("auto", "train", "test")


def write_mask_png(mask: np.ndarray, path) -> None:
    """HAD100's mask format, the inverse of `data.read_png_mask`."""
    from PIL import Image
    rgb = np.zeros(mask.shape + (3,), np.uint8)
    rgb[..., 1] = np.where(mask > 0, 255, 0)
    Image.fromarray(rgb).save(path)  # (H, W, 3) uint8 is RGB


def write_layout(scenes: Iterable, out, size: int = 64,
                 stride: Optional[int] = None, sensor: str = "aviris_ng",
                 bands: Optional[int] = None, band_start: int = 0,
                 split: str = "auto") -> dict:
    """Cuts scenes into crops and writes them as a HAD100 folder.

    Args:
      scenes: scene files, folders or HAD100 roots (`data.find_scene_files`,
        which reads `test/<sensor>` of a HAD100 root).
      out: the folder to write; it may exist, files of the same name are
        overwritten.
      size, stride: crop side and step (stride None: size, no overlap).
      sensor: the sensor folder name.
      bands, band_start: keep `bands` bands from `band_start`; None keeps all.
        Give it when the scenes differ in band count, as HAD100's images of
        one sensor do not.
      split: 'auto', 'train' or 'test'; see the module docstring.

    Returns:
      {'train': [names], 'test': [names]}.
    """
    if split not in SPLIT_RULES:
        raise InputError(f"split must be one of {SPLIT_RULES}, got {split!r}")
    size, stride = crops.check_size_stride(size, stride)
    if (not sensor or sensor in (".", "..") or "/" in sensor or "\\" in sensor
            or "\0" in sensor):
        # It becomes a folder under `out`: no way out of it.
        raise InputError(f"sensor {sensor!r} must be a plain folder name")
    out = pathlib.Path(out)
    try:
        return _write(scenes, out, size, stride, sensor, bands, band_start,
                      split)
    except OSError as e:
        raise InputError(f"{e.filename or out}: cannot write the layout "
                         f"({e.strerror})") from None


def _write(scenes, out, size, stride, sensor, bands, band_start, split):
    dirs = {s: out / s / sensor for s in ("train", "test")}
    dirs["gt"] = out / "ground_truth" / sensor
    written = {"train": [], "test": []}
    for path in data.find_scene_files(scenes, sensor=sensor):
        scene = data.load_scene(path)
        cube = data.select_bands(scene.cube, bands, band_start, scene.path)
        for y, x in crops.grid(cube.shape[:2], size, stride):
            anomalous = crops.touches_anomaly(scene.gt, y, x, size)
            to = split if split != "auto" else ("test" if anomalous else "train")
            if to == "train" and anomalous:
                continue
            name = f"{scene.name}_y{y:04d}_x{x:04d}"
            dirs[to].mkdir(parents=True, exist_ok=True)
            np.save(dirs[to] / f"{name}.npy",
                    np.ascontiguousarray(cube[y:y + size, x:x + size]))
            if to == "test":
                mask = (np.zeros((size, size), np.uint8) if scene.gt is None
                        else scene.gt[y:y + size, x:x + size])
                dirs["gt"].mkdir(parents=True, exist_ok=True)
                write_mask_png(mask, dirs["gt"] / f"{name}.png")
            written[to].append(name)
    if not written["train"] and not written["test"]:
        raise InputError(f"no {size}x{size} crops in {list(map(str, scenes))}: "
                         f"every scene is smaller or, for --split train, "
                         f"every crop touches an anomaly")
    # data.is_had100_root looks for ground_truth/, even with no test crops.
    dirs["gt"].mkdir(parents=True, exist_ok=True)
    return written


def main(argv=None) -> int:
    from fers_jax.cli import HelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m fers_jax.datasets.layout",
        description="Write a HAD100-layout folder of crops from scenes.",
        formatter_class=HelpFormatter)
    p.add_argument("--scenes", nargs="+", required=True,
                   help="scene files (.mat/.npz/.npy), folders or HAD100 roots")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--size", type=int, default=64, help="crop side")
    p.add_argument("--stride", type=int, default=None,
                   help="step between crops (default: --size, no overlap)")
    p.add_argument("--sensor", default="aviris_ng",
                   help="sensor folder name, read from HAD100 roots and written "
                        "under --out")
    p.add_argument("--bands", type=int, default=None,
                   help="keep N bands from --band-start (default: all)")
    p.add_argument("--band-start", type=int, default=0, help="first band kept")
    p.add_argument("--split", choices=SPLIT_RULES, default="auto",
                   help="auto: crops touching anomalies to test, others to "
                        "train")
    args = p.parse_args(argv)
    try:
        written = write_layout(args.scenes, args.out, args.size, args.stride,
                               args.sensor, args.bands, args.band_start,
                               args.split)
    except FersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(written['train'])} train and "
          f"{len(written['test'])} test crops ({args.sensor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
