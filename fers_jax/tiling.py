"""Whole flight lines with bounded memory: the networks tile by tile.

A 2048 x 1024 x 200 scene does not fit the whole-image path: the teacher
alone needs ~5 KB of activations per pixel (~11 GB). This module computes
the same features tile by tile, and `detect_tiled` the same detection maps
with RX's global statistics streamed over tiles (`detectors.rx_streaming`).
Tiled equals whole-image by construction, not by approximation. Measured
on a 256x256 crop with 96x80 tiles (tests/test_tiling.py): spe_f and the
trunk map bit for bit (the whole-image FeatureExtractor passes the
variables as arguments as the tiles do; as closed-over constants XLA folds
them differently, ~3e-7); spa_f to 5e-7 relative (its squeeze-excitation
mean is summed over tiles, in another order); FERD/FERS AUCs to 1e-6.

Spectral teacher (local). The whole-image teacher reflect-pads the image by
`pad` (4), runs ConvH (1x1) and encoder layer1 (zero-padded 3x3 convs, one
per bottleneck: receptive radius 3) and crops `pad` before the 1x1 head. The
tiled teacher cuts windows out of the same reflect-padded image (virtually:
`_reflect_index`, no padded copy is made) -- a tile of (th, tw) pixels needs
the padded window of (th + 2 pad, tw + 2 pad), which at an image border holds
the reflection and elsewhere the real neighbours -- and runs ConvH, layer1,
the crop and the head on it without re-padding (`WindowTeacher`). The zero
padding of layer1's 3x3 convs at a window's edge reaches 3 pixels in, within
the `pad` that is cropped, as it is at the whole image's padded edge. The
whole-image path is the special case of one window.

Spatial student (not local). Conv2RGB is 1x1: computed per tile into a
(H, W, 3) false-colour image. The ResNet-34 trunk (stride 16) runs on
overlapping windows of it and its output cells are stitched into the trunk
map (H/16 x W/16 x 256, small):

* A window starts at a multiple of 16 pixels, so each stride-2 layer's grid
  of the window is the whole image's grid (output cell c of the window is
  cell c + start/16 of the image), and a window that reaches the image's
  bottom/right edge ends there, so the torch-style zero padding of every
  layer falls where the whole image's falls (an image of any size: each
  stride-2 conv's output is ceil(n/2) and n - start has n's parity).
* Elsewhere a window edge pads with zeros where the image has pixels. Trunk
  output cell c sees input pixels [16c - P, 16c + P] with P the sum over
  layers of padding x input jump (`trunk_reach`: 3 + 2 + 24 + 60 + 184 =
  273 for ResNet-34's three stages); cells whose reach stays inside the
  window are exact. `trunk_halo` = ceil(P / 16) = 18 cells (288 pixels) of
  halo on each interior side is the least that makes every kept cell exact
  (17 cells leave the first kept cell reading one zero-padded row).

LightSPP then pools the stitched trunk map globally (adaptive average pool
to 1, 2, 4, exactly the whole-image op, the map being the whole image's);
the bilinear resize to (H, W) is a separable matrix product whose rows for
a tile are rows of the whole-image matrices, so fuse1/fuse2 run per output
tile. The squeeze-excitation's global mean over (H, W) is accumulated over
the tiles in a first pass, its channel weights computed once, and applied
to each tile in a second (the cheap 1x1 head is recomputed rather than
stored).

Memory: beyond the input, a tiled detection keeps one float32 cube per RX
input (x + features, the size of x; two on the 50-band product path), the
(H, W, 3) false colour, the trunk map and the maps; network activations are
bounded by the tile (teacher ~5 KB per tile pixel) and the trunk window
(`trunk_tile` + 2 x 288 pixels a side, ~80 bytes per pixel).

The network pieces that run on tiles and windows (WindowTeacher, ToRGB,
Trunk, SPPTile) and the models' receptive fields are in
fers_jax.models.tiled; when to tile is decided in fers_jax.plan. The reference
normalisation without a float64 copy of the cube is
fers_jax.data.normalise_streamed. Whole-image batches are sharded over devices by
fers_jax.parallel.
"""

import dataclasses
import functools
import os
import pathlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fers_jax import data, detectors
from fers_jax.errors import InputError
from fers_jax.models import layers
from fers_jax.models.tiled import (SPPTile, ToRGB, Trunk, WindowTeacher,
                                   resize_paths, teacher_radius, trunk_halo,
                                   trunk_stride)
from fers_jax.plan import ScenePlan, parse_tile  # noqa: F401 (parse_tile: API)

Span = Tuple[int, int, int, int]  # start, stop, own_start, own_stop


# --- Grids ------------------------------------------------------------------

def spans(size: int, tile: int) -> List[Span]:
    """Tiles of `tile` along an axis of `size`, all of the same length.

    Returns (start, stop, own_start, own_stop) per tile: [start, stop) is
    computed, [own_start, own_stop) is the part the tile owns (the tiles'
    own parts partition [0, size)). The last tile is shifted back to end at
    `size` rather than shortened, so every tile has one shape (one
    compilation); it owns only what the previous tiles did not.
    """
    if tile < 1:
        raise InputError(f"tile sizes must be positive, got {tile}")
    if size <= tile:
        return [(0, size, 0, size)]
    out = []
    for own in range(0, size, tile):
        start = min(own, size - tile)
        out.append((start, start + tile, own, min(own + tile, size)))
    return out


def _reflect_index(n: int, pad: int, start: int, stop: int) -> np.ndarray:
    """Image indices of rows [start, stop) of the image reflect-padded by pad.

    NumPy/torch 'reflect' (the edge is not repeated): padded row p is image
    row |p - pad| mirrored at 0 and n - 1.
    """
    i = np.abs(np.arange(start, stop) - pad)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def trunk_windows(size: int, tile: int, stride: int, halo: int
                  ) -> List[Tuple[int, int, int, int]]:
    """Windows of the trunk along an axis of `size` pixels.

    Returns (start, stop, cell0, cell1) per window: pixels [start, stop) go
    in (start a multiple of `stride`), trunk cells [cell0, cell1) of the
    image are kept from it. `tile` (a multiple of stride) is the kept part;
    windows are extended at the image borders to the common length
    tile + 2 halo stride where the image allows (two shapes at most).
    """
    cells = -(-size // stride)
    tc = tile // stride
    length = tile + 2 * halo * stride
    out = []
    for c0 in range(0, cells, tc):
        c1 = min(c0 + tc, cells)
        start = stride * max(0, c0 - halo)
        stop = min(size, stride * (c1 + halo))
        if start == 0:
            stop = min(size, max(stop, length))
        if stop == size:
            start = max(0, min(start, stride * ((size - length) // stride)))
        out.append((start, stop, c0, c1))
    return out


# --- Tiled features ---------------------------------------------------------

def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


@dataclasses.dataclass
class StudentState:
    """What the student's tiles share: the global part of its forward."""
    shape: Tuple[int, int]
    trunk: np.ndarray            # (N, ceil(H/16), ceil(W/16), C) stitched
    pooled: List[jax.Array]      # adaptive pools of the trunk map, per level
    se: jax.Array                # (N, 1, 1, B) channel weights
    paths: tuple                 # the whole image's resize contraction orders


class TiledFeatures:
    """The networks of FERD / FERS evaluated tile by tile.

    Args:
      teacher, t_vars: SpectralTeacher and its variables.
      student, s_vars: SpatialStudent and its variables, or None (FERD).
      tile: (th, tw) output tile in pixels (teacher, student head, RX).
      trunk_tile: kept part of a trunk window, pixels (rounded up to a
        multiple of 16); default max(tile, 1024). The window adds 288 pixels
        of halo on each interior side, so larger is cheaper in compute; the
        trunk's activations take ~80 bytes per window pixel (XLA:CPU's
        buffer assignment), ~205 MB for a 1600 x 1600 window.
      dtype: compute dtype of the networks (float32, or bfloat16 on
        accelerators); features come back as float32.
      matmul_precision: as FeatureExtractor ('highest': no TF32 on GPUs).

    `tiles(x)` yields the features tile by tile; calling the object returns
    them stitched (tests, export).
    """

    def __init__(self, teacher, t_vars, student=None, s_vars=None,
                 tile: Sequence[int] = (256, 256),
                 trunk_tile: Optional[Sequence[int]] = None,
                 dtype=jnp.float32, matmul_precision: str = "highest"):
        self.tile = tuple(int(t) for t in tile)
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise InputError(f"tile must be two positive ints, got {tile!r}")
        self.t_config = teacher.config
        self.bands = teacher.config.bands
        if teacher_radius(self.t_config) > self.t_config.pad:
            raise InputError("the teacher's receptive radius exceeds its padding; "
                             "tiling would need the whole-image zero padding")
        self.dtype = jnp.dtype(dtype)
        self.matmul_precision = matmul_precision
        self.t_vars = _cast(t_vars, self.dtype)
        self._teacher = jax.jit(self._make(WindowTeacher(self.t_config)))
        self.s_config = student.config if student is not None else None
        if student is not None:
            cfg = self.s_config
            self.stride = trunk_stride(cfg)
            self.halo = trunk_halo(cfg)
            tt = trunk_tile if trunk_tile is not None else tuple(
                max(t, 1024) for t in self.tile)
            tt = (tt, tt) if np.isscalar(tt) else tuple(tt)
            self.trunk_tile = tuple(-(-int(t) // self.stride) * self.stride
                                    for t in tt)
            self.s_vars = _cast(s_vars, self.dtype)
            self.spp_vars = {"params": self.s_vars["params"]["spp"]}
            self._rgb = jax.jit(self._make(ToRGB(cfg)))
            self._trunk = jax.jit(self._make(Trunk(cfg)))
            spp = SPPTile(cfg)
            dt = self.dtype
            self._pool = jax.jit(lambda f: [layers.adaptive_avg_pool(f.astype(dt), s)
                                            for s in cfg.spp_levels])
            pre_se = functools.partial(spp.apply, method=SPPTile.pre_se)
            self._pre_se_sum = jax.jit(lambda v, p, r, c, path, o: jnp.sum(
                pre_se(v, p, r, c, path)[:, o[0]:o[1], o[2]:o[3]].astype(
                    jnp.float32), axis=(1, 2)), static_argnums=(4, 5))
            self._se = jax.jit(lambda v, mean: spp.apply(v, mean.astype(dt)))
            self._apply_se = jax.jit(lambda v, p, r, c, path, s: (
                pre_se(v, p, r, c, path) * s).astype(jnp.float32),
                static_argnums=4)

    def _make(self, module):
        dt = self.dtype

        def f(v, x):
            return module.apply(v, jnp.asarray(x, dt)).astype(jnp.float32)
        return f

    def _run(self, fn, *args):
        with jax.default_matmul_precision(self.matmul_precision):
            return fn(*args)

    # Teacher ---------------------------------------------------------------

    def spe_tile(self, x, rows: Span, cols: Span) -> jax.Array:
        """spe_f of the tile rows[0]:rows[1], cols[0]:cols[1] of x (N, H, W, B)."""
        _, h, w, _ = x.shape
        p = self.t_config.pad
        ri = _reflect_index(h, p, rows[0], rows[1] + 2 * p)
        ci = _reflect_index(w, p, cols[0], cols[1] + 2 * p)
        window = np.asarray(x[:, ri[:, None], ci[None, :], :], np.float32)
        return self._run(self._teacher, self.t_vars, window)

    # Student ---------------------------------------------------------------

    def student_state(self, x) -> StudentState:
        """Conv2RGB per tile, the trunk over windows, pools and SE weights."""
        cfg = self.s_config
        n, h, w, _ = x.shape
        rgb = np.empty((n, h, w, 3), np.float32)
        for rows in spans(h, self.tile[0]):
            for cols in spans(w, self.tile[1]):
                part = np.asarray(x[:, rows[0]:rows[1], cols[0]:cols[1]], np.float32)
                out = np.asarray(self._run(self._rgb, self.s_vars, part))
                rgb[:, rows[2]:rows[3], cols[2]:cols[3]] = out[
                    :, rows[2] - rows[0]:rows[3] - rows[0],
                    cols[2] - cols[0]:cols[3] - cols[0]]
        s = self.stride
        trunk = np.empty((n, -(-h // s), -(-w // s), cfg.trunk_widths[-1]), np.float32)
        for r0, r1, a0, a1 in trunk_windows(h, self.trunk_tile[0], s, self.halo):
            for c0, c1, b0, b1 in trunk_windows(w, self.trunk_tile[1], s, self.halo):
                f = np.asarray(self._run(self._trunk, self.s_vars,
                                         rgb[:, r0:r1, c0:c1]))
                trunk[:, a0:a1, b0:b1] = f[:, a0 - r0 // s:a1 - r0 // s,
                                           b0 - c0 // s:b1 - c0 // s]
        del rgb
        pooled = self._run(self._pool, jnp.asarray(trunk))
        paths = resize_paths(cfg.spp_levels, (h, w), trunk.shape[-1])
        total = np.zeros((n, cfg.bands), np.float64)
        for rows in spans(h, self.tile[0]):
            for cols in spans(w, self.tile[1]):
                r, c = self._resize_rows(h, w, rows, cols)
                own = (rows[2] - rows[0], rows[3] - rows[0],
                       cols[2] - cols[0], cols[3] - cols[0])
                total += np.asarray(self._run(self._pre_se_sum, self.spp_vars,
                                              pooled, r, c, paths, own), np.float64)
        mean = (total / (h * w)).astype(np.float32)[:, None, None, :]
        se = self._run(self._se, self.spp_vars, jnp.asarray(mean))
        return StudentState((h, w), trunk, pooled, se, paths)

    def _resize_rows(self, h, w, rows: Span, cols: Span):
        levels = self.s_config.spp_levels
        r = [layers.bilinear_matrix(s, h)[rows[0]:rows[1]] for s in levels]
        c = [layers.bilinear_matrix(s, w)[cols[0]:cols[1]] for s in levels]
        return r, c

    def spa_tile(self, state: StudentState, rows: Span, cols: Span) -> jax.Array:
        """spa_f of one tile, given the image's `student_state`."""
        r, c = self._resize_rows(*state.shape, rows, cols)
        return self._run(self._apply_se, self.spp_vars, state.pooled, r, c,
                         state.paths, state.se)

    # Together --------------------------------------------------------------

    def tiles(self, x, student: bool = True
              ) -> Iterator[Tuple[Span, Span, Dict[str, jax.Array]]]:
        """Yields (rows, cols, {'spe_f', ['spa_f']}) for each tile of x."""
        state = (self.student_state(x)
                 if student and self.s_config is not None else None)
        _, h, w, _ = x.shape
        for rows in spans(h, self.tile[0]):
            for cols in spans(w, self.tile[1]):
                feats = {"spe_f": self.spe_tile(x, rows, cols)}
                if state is not None:
                    feats["spa_f"] = self.spa_tile(state, rows, cols)
                yield rows, cols, feats

    def __call__(self, x) -> Dict[str, np.ndarray]:
        """All features of x (N, H, W, B), stitched: {'spe_f', ['spa_f']}."""
        n, h, w, b = x.shape
        out = {}
        for rows, cols, feats in self.tiles(x):
            for k, v in feats.items():
                if k not in out:
                    out[k] = np.empty((n, h, w, b), np.float32)
                _own(out[k], rows, cols)[...] = _own_part(np.asarray(v), rows, cols)
        return out


def _own(a, rows: Span, cols: Span):
    """The owned part of a tile, in image coordinates of a (N, H, W, ...) array."""
    return a[:, rows[2]:rows[3], cols[2]:cols[3]]


def _own_part(t, rows: Span, cols: Span):
    """The owned part of a tile, in the tile's coordinates."""
    return t[:, rows[2] - rows[0]:rows[3] - rows[0],
             cols[2] - cols[0]:cols[3] - cols[0]]


# --- Tiled detection --------------------------------------------------------

def detect_tiled(feats: TiledFeatures, x, plan: ScenePlan, export: bool = False,
                 chunk_pixels: Optional[int] = None, spill_dir=None,
                 progress: bool = False):
    """FERD / FERS maps of x (N, H, W, B) with tiled features, as `plan` says
    (fers_jax.plan.plan_scene: fusion, RX precision, RX whole or streamed).

    Images are done one at a time. Each RX input (x + features, added in
    float32 in the whole-image order) is written tile by tile into a float32
    cube of x's size, then scored: by `detectors.rx_streaming` (statistics
    accumulated over row chunks of `chunk_pixels`) where plan.rx is
    'stream', else by the whole-image `detectors.rx`.

    Out of core (plan.path 'out-of-core'): x is a `LazyImage` (rows read
    from disk and normalised on demand) and each RX input cube is spilled
    to a file in `spill_dir` (`SpillCube`), written tile by tile and read
    back in row blocks by the streamed RX: features are computed once, and
    RX's statistics are accumulated as the tiles are written
    (`detectors.RXAccumulator`), so a float64 RX reads its spill file once,
    for the scores (float32: three times).

    Why not always stream: in float64 streaming and whole-image RX give the
    same maps (~1e-10 relative, the same AUCs), but the float32 RX of the
    50-band product path is sensitive to the order of its float32 sums
    (maps ~5e-4 relative, AUCs ~1e-5 apart on the shared scenes, as any
    reordering of them does); where the cube fits, the tiled path stays
    the whole-image path's float32 RX.

    Returns:
      (maps (N, H, W) in RX's precision, features dict of (N, H, W, B)
      arrays if `export` else {}; out of core, each feature a list of one
      data.DiskCube over its spill file in `spill_dir`, written tile by tile).
    """
    if plan.method not in ("ferd", "fers"):
        raise InputError(f"tiled detection is for ferd and fers, not {plan.method!r}")
    spill = plan.path == "out-of-core"
    if spill and spill_dir is None:
        raise InputError("out-of-core detection needs a spill folder")
    n, h, w, b = x.shape
    names, fusion = plan.rx_inputs, plan.fusion
    maps, exported = [], {}
    for i in range(n):
        xi = x if n == 1 else x[i:i + 1]
        cubes = {k: (SpillCube(pathlib.Path(spill_dir) / f"{k}.npy", (h, w, b)) if spill
                     else np.empty((1, h, w, b), np.float32)) for k in names}
        # A spilled cube's RX statistics are gathered as it is written, so
        # that it is read back once (float64) instead of four times.
        acc = {k: detectors.RXAccumulator(b, plan.rx_precision)
               for k in names if spill and plan.rx == "stream"}
        keep = {}
        tiles = feats.tiles(xi, student=(plan.method == "fers"))
        for rows, cols, f in _tile_bar(tiles, h, w, feats.tile, progress):
            xt = _own_part(np.asarray(xi[:, rows[0]:rows[1], cols[0]:cols[1]],
                                      np.float32), rows, cols)
            f = {k: _own_part(np.asarray(v), rows, cols) for k, v in f.items()}
            for k, v in rx_input_tiles(xt, f, fusion).items():
                if spill:
                    cubes[k].write(rows[2], cols[2], v[0])
                    if k in acc:
                        acc[k].add(v[0], first_row=rows[2])
                else:
                    _own(cubes[k], rows, cols)[...] = v
            if export:
                for k, v in f.items():
                    if spill:
                        if k not in keep:
                            keep[k] = SpillCube(pathlib.Path(spill_dir) / f"feature-{k}.npy",
                                                (h, w, b))
                        keep[k].write(rows[2], cols[2], v[0])
                        continue
                    keep.setdefault(k, np.empty((1, h, w, b), np.float32))
                    _own(keep[k], rows, cols)[...] = v
        scores = []
        for k in names:
            cube = cubes.pop(k)
            cube = cube.reader() if spill else cube[0]
            scores.append(detectors.rx_streaming(cube, plan.rx_precision,
                                                 chunk_pixels or plan.chunk_pixels,
                                                 acc.get(k))
                          if plan.rx == "stream"
                          else np.asarray(detectors.rx(cube, plan.rx_precision)))
            del cube
        maps.append(scores[0] if len(scores) == 1 else
                    np.asarray(detectors.fuse(scores, "product")))
        for k, v in keep.items():
            exported.setdefault(k, []).append(v.reader() if spill else v[0])
    features = {k: v if spill else np.stack(v) for k, v in exported.items()}
    return np.stack(maps), features


def _tile_bar(tiles, h, w, tile, enabled: bool):
    """The tiles with a progress bar (count, rate and ETA) when enabled."""
    if not enabled:
        return tiles
    from tqdm import tqdm
    total = len(spans(h, tile[0])) * len(spans(w, tile[1]))
    return tqdm(tiles, total=total, desc="tiles", unit="tile", leave=False,
                dynamic_ncols=True)


# --- Out of core --------------------------------------------------------------

class LazyImage:
    """One normalised image (1, H, W, B) read from a cube on disk on demand.

    `cube` is anything read by blocks of rows (data.DiskCube, an array);
    rows come back normalised with the image's global (lo, hi)
    (data.normalise_rows: the in-memory normalisation's numbers), or, with
    `normalised` False, as they are in float64 (LRX/CRD's "cube" scaling;
    lo and hi then only vouch that the cube was checked). The last
    block read is kept, at least `band_rows` rows, so the tiles of one row
    of tiles (and their halos) read the file once.
    """

    ndim = 4

    def __init__(self, cube, lo: float, hi: float, band_rows: int = 64,
                 normalised: bool = True):
        self.cube, self.lo, self.hi = cube, lo, hi
        self.normalised = normalised
        self.dtype = np.dtype(np.float32 if normalised else np.float64)
        self.shape = (1,) + tuple(cube.shape)
        self.band_rows = int(band_rows)
        self._start, self._block = 0, np.empty((0,) + self.shape[2:], self.dtype)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Normalised rows [r0, r1) as an (r1 - r0, W, B) array."""
        stop = self._start + self._block.shape[0]
        if not (self._start <= r0 and r1 <= stop):
            self._block = None  # release the old block before reading the next
            end = min(self.shape[1], max(r1, r0 + self.band_rows))
            self._start = r0
            part = self.cube[r0:end]
            self._block = (data.normalise_rows(part, self.lo, self.hi) if self.normalised
                           else np.asarray(part, np.float64))
        return self._block[r0 - self._start:r1 - self._start]

    def __array__(self, dtype=None, copy=None):
        """The whole normalised image (1, H, W, B), for a method that fits
        in memory."""
        out = np.empty(self.shape, self.dtype)
        for r in range(0, self.shape[1], self.band_rows):
            out[0, r:r + self.band_rows] = self.rows(r, min(self.shape[1], r + self.band_rows))
        return out if dtype is None else out.astype(dtype)

    def cube_view(self) -> "_Rows":
        """The image as an (H, W, B) cube read in row blocks (for RX)."""
        return _Rows(self)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) == 1:
            if key[0] in (slice(None), slice(0, 1)):
                return self
            raise IndexError("a LazyImage holds one image")
        rk, rest = key[1], key[2:]
        if isinstance(rk, slice):
            r0, r1, _ = rk.indices(self.shape[1])
            return self.rows(r0, r1)[None][(slice(None), slice(None)) + rest]
        idx = np.asarray(rk)
        r0, r1 = int(idx.min()), int(idx.max()) + 1
        return self.rows(r0, r1)[None][(slice(None), idx - r0) + rest]


class _Rows:
    ndim = 3

    def __init__(self, image: LazyImage):
        self.image, self.shape = image, image.shape[1:]

    def __getitem__(self, key):
        r0, r1, _ = key.indices(self.shape[0])
        return self.image.rows(r0, r1)


class SpillCube:
    """A float32 (H, W, B) .npy file written tile by tile with plain writes
    (nothing of it mapped, so it never counts towards resident memory) and
    read back as a data.DiskCube, in blocks of rows."""

    def __init__(self, path, shape):
        self.path, self.shape = pathlib.Path(path), tuple(int(s) for s in shape)
        header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + int(np.prod(self.shape)) * 4)
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, r0: int, c0: int, tile: np.ndarray) -> None:
        """Writes `tile` (rows, cols, B) at image row r0, column c0."""
        _, w, b = self.shape
        tile = np.ascontiguousarray(tile, "<f4")
        for i in range(tile.shape[0]):
            os.pwrite(self._fd, tile[i].tobytes(),
                      self.offset + ((r0 + i) * w + c0) * b * 4)

    def reader(self):
        os.close(self._fd)
        return data.DiskCube(self.shape, data.file_rows(
            self.path, np.dtype("<f4"), self.shape, self.offset), self.path)


def rx_input_tiles(xt, f: Dict[str, np.ndarray], fusion: str) -> Dict[str, np.ndarray]:
    """The RX inputs of one tile, added in float32 in the whole-image order."""
    if fusion == "ferd":
        return {"x+spe": xt + f["spe_f"]}
    if fusion == "sum":
        return {"x+spe+spa": (xt + f["spe_f"]) + f["spa_f"]}
    return {"x+spa": xt + f["spa_f"], "x+spe": xt + f["spe_f"]}
