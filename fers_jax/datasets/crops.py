"""Square crops of scenes: the one place that decides where patches go.

Pure NumPy (no TFDS): the HAD100-layout writer, the patch dataset builder and
the in-memory training source all cut their patches here, so a patch at a
given origin is the same array whichever way it was made.
"""

import logging
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from fers_jax import data
from fers_jax.errors import InputError

log = logging.getLogger(__name__)


def check_size_stride(size: int, stride: Optional[int]) -> tuple:
    """Returns (size, stride) as ints; stride None means size (no overlap)."""
    stride = size if stride is None else stride
    for what, v in (("patch size", size), ("stride", stride)):
        if int(v) != v or v <= 0:
            raise InputError(f"the {what} must be a positive integer, "
                             f"got {v!r}")
    return int(size), int(stride)


def patch_origins(length: int, size: int, stride: int) -> list:
    """Start offsets along one axis: every `stride`, plus one flush with the end.

    The extra last offset makes the patches cover the whole axis (a 100-pixel
    side with size 64 and stride 64 gives [0, 36]); an axis shorter than
    `size` gives none.
    """
    if length < size:
        return []
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def grid(shape_hw, size: int, stride: int) -> list:
    """(y, x) origins of every size x size patch of an (H, W) image."""
    return [(y, x) for y in patch_origins(shape_hw[0], size, stride)
            for x in patch_origins(shape_hw[1], size, stride)]


def touches_anomaly(gt: Optional[np.ndarray], y: int, x: int,
                    size: int) -> bool:
    return gt is not None and bool(gt[y:y + size, x:x + size].any())


def clean_origins(scene: data.Scene, size: int, stride: int) -> list:
    """Origins of the patches that contain no anomaly pixel.

    A patch that touches an anomaly is skipped whole, rather than having its
    anomaly pixels painted over, so that a background patch holds only
    measured background spectra. A scene without a mask counts as background.
    Logs a warning when a scene gives no patch at all.
    """
    origins = grid(scene.cube.shape[:2], size, stride)
    clean = _clean(scene, origins, size)
    if not origins:
        log.warning("%s: %dx%d pixels, smaller than a %dx%d patch; it "
                        "gives no patches", scene.path, *scene.cube.shape[:2],
                        size, size)
    elif not clean:
        log.warning("%s: every %dx%d patch (stride %d) touches one of its "
                        "%d anomaly pixels; it gives no background patches",
                        scene.path, size, size, stride, int(scene.gt.sum()))
    return clean


def _clean(scene: data.Scene, origins, size: int) -> list:
    return [(y, x) for y, x in origins
            if not touches_anomaly(scene.gt, y, x, size)]


def count_patches(scenes: Iterable, size: int, stride: Optional[int]) -> int:
    """How many background patches `PatchSource(scenes, size, stride)` holds."""
    size, stride = check_size_stride(size, stride)
    return sum(len(_clean(s, grid(s.cube.shape[:2], size, stride), size))
               for s in scenes)


def batch_advice(scenes: Sequence, size: int, stride: Optional[int],
                 batch_size: int, multiple: int = 1,
                 size_ok: Callable[[int], bool] = lambda size: True) -> str:
    """Why `scenes` give no batch of `batch_size` patches, and what would.

    Counts the patches at this size and stride, then finds (by counting,
    as `PatchSource` would cut them) the largest batch size (a multiple of
    `multiple`, the devices a batch is split over), the largest smaller
    stride at this size, and the largest smaller patch size (one that
    `size_ok` accepts; at `stride`, or at its own size when `stride` is
    None) that give at least one batch.
    """
    size_, stride_ = check_size_stride(size, stride)
    n = count_patches(scenes, size_, stride_)
    shown = ", ".join(f"{s.path} {s.shape[0]}x{s.shape[1]}" for s in scenes[:3])
    more = f" and {len(scenes) - 3} more" if len(scenes) > 3 else ""
    options = []
    if n >= multiple:
        options.append(f"--batch-size {n - n % multiple}")
    stride_fix = next((t for t in range(stride_ - 1, 0, -1)
                       if count_patches(scenes, size_, t) >= batch_size), None)
    if stride_fix is not None:
        options.append(f"--stride {stride_fix} "
                       f"({count_patches(scenes, size_, stride_fix)} patches)")
    size_fix = next((p for p in range(size_ - 1, 0, -1) if size_ok(p)
                     and count_patches(scenes, p, stride) >= batch_size), None)
    if size_fix is not None:
        options.append(f"--patch-size {size_fix} "
                       f"({count_patches(scenes, size_fix, stride)} patches)")
    joined = " or ".join(options[-2:]) if len(options) < 3 else \
        f"{options[0]}, {options[1]} or {options[2]}"
    advice = f"; use {joined}" if options else \
        "; no smaller --batch-size, --stride or --patch-size helps: add scenes"
    return (f"{shown}{more} give {n} background patches of {size_}x{size_} "
            f"at stride {stride_}: not one batch of {batch_size}{advice}")


class PatchSource:
    """Background patches of scenes, held in memory, as a random-access source.

    `len(source)` patches; `source[i]` is {'image': (size, size, B) float32
    as stored (not normalised), 'name': '<scene>_y<y>_x<x>', 'path': the
    scene file, for messages}. Patches are
    views of the scene cubes, so memory stays at the size of the scenes.

    Args:
      scenes: loaded `data.Scene`s.
      size, stride: patch side and step (stride None: size).
      bands, band_start: keep `bands` bands from `band_start`
        (`data.select_bands`); None keeps all from `band_start`.
    """

    def __init__(self, scenes: Iterable, size: int = 64,
                 stride: Optional[int] = None, bands: Optional[int] = None,
                 band_start: int = 0):
        self.size, self.stride = check_size_stride(size, stride)
        self.scenes = list(scenes)
        self.cubes = [data.select_bands(s.cube, bands, band_start, s.path)
                      for s in self.scenes]
        self.index = [(k, y, x) for k, s in enumerate(self.scenes)
                      for y, x in clean_origins(s, self.size, self.stride)]
        if not self.index:
            raise InputError(
                "no background patches: none of "
                + ", ".join(s.path for s in self.scenes)
                + f" has a {self.size}x{self.size} patch free of anomaly pixels")

    @classmethod
    def from_paths(cls, paths: Iterable, size: int = 64,
                   stride: Optional[int] = None, bands: Optional[int] = None,
                   band_start: int = 0, sensor: str = "aviris_ng",
                   split: str = "train") -> "PatchSource":
        """Loads scene files, folders or HAD100 roots (`<split>/<sensor>`)."""
        return cls(data.load_scenes(paths, sensor=sensor, split=split),
                   size, stride, bands, band_start)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        k, y, x = self.index[i]
        s = self.size
        return {"image": self.cubes[k][y:y + s, x:x + s],
                "name": f"{self.scenes[k].name}_y{y:04d}_x{x:04d}",
                "path": self.scenes[k].path}
