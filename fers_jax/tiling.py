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

Also here: `normalise_tiled` (the reference normalisation without the
float64 copy of the cube), and `estimate_bytes` and `auto_tile` (when to
tile). Whole-image batches are sharded over devices by fers_jax.parallel.
"""

import dataclasses
import functools
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fers_jax import detectors
from fers_jax.configs import FerdConfig, StudentConfig
from fers_jax.errors import InputError
from fers_jax.models import layers
from fers_jax.models.student import Conv2RGB, ResNetTrunk
from fers_jax.models.teacher import ConvH

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


def parse_tile(text) -> Optional[Tuple[int, int]]:
    """'H,W' (or 'N' for N,N) -> (H, W); None / '' / 'none' -> None."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        text = ",".join(str(t) for t in text)
    text = str(text).strip().lower()
    if text in ("", "none", "off"):
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise InputError(f"--tile must be H,W (positive ints), got {text!r}")
    return tuple(parts)


def _reflect_index(n: int, pad: int, start: int, stop: int) -> np.ndarray:
    """Image indices of rows [start, stop) of the image reflect-padded by pad.

    NumPy/torch 'reflect' (the edge is not repeated): padded row p is image
    row |p - pad| mirrored at 0 and n - 1.
    """
    i = np.abs(np.arange(start, stop) - pad)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


# --- Module pieces sharing the whole models' variable names -----------------

class WindowTeacher(nn.Module):
    """The SpectralTeacher on a window of the already reflect-padded image.

    (N, th + 2 pad, tw + 2 pad, B) -> spe_f (N, th, tw, B). Same variables
    as SpectralTeacher; ConvH runs with pad 0 (nothing is re-padded).
    """
    config: FerdConfig

    @nn.compact
    def __call__(self, xp):
        cfg = self.config
        x = ConvH(cfg.stem_width, 0, name="convh")(xp)
        (a,) = layers.ResNetStages(cfg.encoder_blocks[:1], cfg.expansion,
                                   cfg.width_per_group, name="encoder")(x, False)
        a = layers.crop(a, cfg.pad)
        return layers.PixelHead(cfg.head_width, cfg.bands, name="head")(a)


class _ToRGB(nn.Module):
    config: StudentConfig

    @nn.compact
    def __call__(self, x):
        return Conv2RGB(self.config.rgb_width, name="to_rgb")(x)


class _Trunk(nn.Module):
    config: StudentConfig

    @nn.compact
    def __call__(self, rgb):
        cfg = self.config
        return ResNetTrunk(cfg.trunk_blocks, cfg.stem_width, name="trunk")(rgb, False)


class _SEWeights(nn.Module):
    """SqueezeExcitation's channel weights from a given mean (names fc1, fc2)."""
    reduction: int

    @nn.compact
    def __call__(self, mean):
        c = mean.shape[-1]
        conv = lambda f, name: layers.conv1x1(f, kernel_init=layers.spec_uniform,
                                              name=name)
        s = nn.relu(conv(c // self.reduction, "fc1")(mean))
        return nn.sigmoid(conv(c, "fc2")(s))


class SPPTile(nn.Module):
    """LightSPP on one output tile, given the pooled pyramid; variables of
    the student's `spp` (fuse1, fuse2, se/fc1, se/fc2).

    `pre_se(pooled, rows, cols, paths)`: resize rows/cols matrices are the
    tile's rows of layers.bilinear_matrix(level, H) / (level, W), `paths`
    the einsum contraction orders the whole image's resize uses (see
    `resize_paths`); returns the tile's features before the
    squeeze-excitation. Calling it on a mean gives the SE channel weights.
    """
    config: StudentConfig

    def setup(self):
        cfg = self.config
        self.fuse1 = layers.conv1x1(cfg.spp_width, kernel_init=layers.spec_uniform)
        self.fuse2 = layers.conv1x1(cfg.bands, kernel_init=layers.spec_uniform)
        self.se = _SEWeights(cfg.se_reduction)

    def pre_se(self, pooled, rows, cols, paths):
        pyramid = [jnp.einsum("oh,pw,nhwc->nopc", mh, mw, p, optimize=list(path),
                              precision=jax.lax.Precision.HIGHEST)
                   for p, mh, mw, path in zip(pooled, rows, cols, paths)]
        x = jnp.concatenate(pyramid, axis=-1)
        return nn.relu(self.fuse2(nn.relu(self.fuse1(x))))

    def __call__(self, mean):
        return self.se(mean)


def resize_paths(levels: Sequence[int], shape: Sequence[int], channels: int):
    """The contraction order jnp.einsum picks for layers.resize_bilinear of
    each pooled level to the whole image's `shape`.

    A tile's resize uses fewer rows of the same matrices; left to itself
    opt_einsum would pick another order for those shapes (contracting W
    before H, say) and round differently (~4e-7 relative). Forced to the
    whole image's order, the tile's values are the whole image's bit for bit.
    """
    paths = []
    for s in levels:
        path, _ = jnp.einsum_path(
            "oh,pw,nhwc->nopc", np.empty((shape[0], s), np.float32),
            np.empty((shape[1], s), np.float32),
            np.empty((1, s, s, channels), np.float32), optimize="auto")
        paths.append(tuple(tuple(step) for step in path))
    return tuple(paths)


# --- Receptive fields -------------------------------------------------------

def trunk_stride(config: StudentConfig) -> int:
    """Pixels per trunk output cell: stem 2, max pool 2, each later stage 2."""
    return 4 * 2 ** (len(config.trunk_blocks) - 1)


def trunk_reach(config: StudentConfig) -> int:
    """P: trunk output cell c sees input pixels [stride c - P, stride c + P].

    Sum over the layers of their padding times the jump (pixels per step)
    of their input: the 7x7 stem (pad 3, jump 1), the 3x3 max pool (pad 1,
    jump 2), and per basic block two 3x3 convs (pad 1; the first conv of a
    strided stage at the stage's input jump, everything after at twice it).
    The 1x1 stride-2 shortcuts read pixel 2c only and add nothing.
    """
    reach, jump = 3 + 1 * 2, 4
    for i, n in enumerate(config.trunk_blocks):
        if i == 0:
            reach += 2 * n * jump
        else:
            reach += jump + (2 * n - 1) * 2 * jump
            jump *= 2
    return reach


def trunk_halo(config: StudentConfig) -> int:
    """Trunk cells of halo a window needs on an interior side (18 for ResNet-34)."""
    return -(-trunk_reach(config) // trunk_stride(config))


def teacher_radius(config: FerdConfig) -> int:
    """Receptive radius of the teacher's layer1: one 3x3 conv per bottleneck."""
    return config.encoder_blocks[0]


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
            self._rgb = jax.jit(self._make(_ToRGB(cfg)))
            self._trunk = jax.jit(self._make(_Trunk(cfg)))
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

RX_WHOLE_MAX_BYTES = 1 << 30  # rx='auto': whole-image RX up to this estimate


def _whole_rx_fits(shape_hwb, precision: str) -> bool:
    """Whether `detectors.rx` of one cube stays under RX_WHOLE_MAX_BYTES (and
    AUTO_MEMORY_FRACTION of the device): the cast cube, the centred one and
    the product, in the precision's dtype."""
    h, w, b = shape_hwb
    need = 3 * h * w * b * (8 if precision == "float64" else 4)
    return need <= min(RX_WHOLE_MAX_BYTES,
                       AUTO_MEMORY_FRACTION * device_memory_bytes())


def detect_tiled(feats: TiledFeatures, x, method: str, fusion: str = "auto",
                 precision: str = "auto", export: bool = False, rx: str = "auto",
                 chunk_pixels: Optional[int] = None):
    """FERD / FERS maps of x (N, H, W, B) with tiled features.

    Images are done one at a time. Each RX input (x + features, added in
    float32 in the whole-image order) is written tile by tile into a float32
    cube of x's size, then scored: by `detectors.rx_streaming` (statistics
    accumulated over row chunks of `chunk_pixels`) where rx='stream', or
    where rx='auto' and the whole-image RX of the cube would not fit
    (`_whole_rx_fits`); else by the whole-image `detectors.rx`.

    Why not always stream: in float64 streaming and whole-image RX give the
    same maps (~1e-10 relative, the same AUCs), but the float32 RX of the
    50-band product path is sensitive to the order of its float32 sums
    (maps ~5e-4 relative, AUCs ~1e-5 apart on the shared scenes, as any
    reordering of them does); where the cube fits, the tiled path stays
    the whole-image path's float32 RX.

    Returns:
      (maps (N, H, W) in RX's precision, features dict of (N, H, W, B)
      arrays if `export` else {}).
    """
    from fers_jax import inference
    if rx not in ("auto", "whole", "stream"):
        raise InputError(f"rx must be 'auto', 'whole' or 'stream', got {rx!r}")
    n, h, w, b = x.shape
    if method == "ferd":
        fusion = "ferd"
        precision = "float64" if precision == "auto" else precision
        names = ("x+spe",)
    elif method == "fers":
        fusion = inference.resolve_fusion(fusion, b)
        precision = inference.resolve_precision(precision, fusion)
        names = ("x+spe+spa",) if fusion == "sum" else ("x+spa", "x+spe")
    else:
        raise InputError(f"tiled detection is for ferd and fers, not {method!r}")
    stream = rx == "stream" or (rx == "auto" and not _whole_rx_fits((h, w, b), precision))
    maps, exported = [], {}
    for i in range(n):
        xi = x[i:i + 1]
        cubes = {k: np.empty((1, h, w, b), np.float32) for k in names}
        keep = {}
        for rows, cols, f in feats.tiles(xi, student=(method == "fers")):
            xt = _own_part(np.asarray(xi[:, rows[0]:rows[1], cols[0]:cols[1]],
                                      np.float32), rows, cols)
            f = {k: _own_part(np.asarray(v), rows, cols) for k, v in f.items()}
            if fusion == "ferd":
                _own(cubes["x+spe"], rows, cols)[...] = xt + f["spe_f"]
            elif fusion == "sum":
                _own(cubes["x+spe+spa"], rows, cols)[...] = (xt + f["spe_f"]) + f["spa_f"]
            else:
                _own(cubes["x+spa"], rows, cols)[...] = xt + f["spa_f"]
                _own(cubes["x+spe"], rows, cols)[...] = xt + f["spe_f"]
            if export:
                for k, v in f.items():
                    keep.setdefault(k, np.empty((1, h, w, b), np.float32))
                    _own(keep[k], rows, cols)[...] = v
        scores = []
        for k in names:
            cube = cubes.pop(k)[0]
            scores.append(detectors.rx_streaming(cube, precision, chunk_pixels)
                          if stream else np.asarray(detectors.rx(cube, precision)))
            del cube
        maps.append(scores[0] if len(scores) == 1 else
                    np.asarray(detectors.fuse(scores, "product")))
        for k, v in keep.items():
            exported.setdefault(k, []).append(v[0])
    features = {k: np.stack(v) for k, v in exported.items()}
    return np.stack(maps), features


# --- The reference normalisation, streamed ----------------------------------

def normalise_tiled(cube, rows: int = 128, where="cube") -> np.ndarray:
    """data.normalise of one (H, W, B) cube without its float64 copy.

    Same arithmetic (float64 per value, float32 out), so the same numbers;
    the cube may be a memory map. `rows` rows at a time: first the min and
    max, then the scaling.
    """
    h = cube.shape[0]
    lo, hi = np.inf, -np.inf
    for r in range(0, h, rows):
        part = np.asarray(cube[r:r + rows], np.float64)
        lo, hi = min(lo, part.min()), max(hi, part.max())
    if hi == lo:
        raise InputError(f"{where}: the cube is constant (every value "
                         f"{float(lo)}): nothing to normalise or detect")
    out = np.empty(cube.shape, np.float32)
    for r in range(0, h, rows):
        part = np.asarray(cube[r:r + rows], np.float64)
        out[r:r + rows] = ((part - lo) / (hi - lo) * 2.0 - 1.0) * 0.1
    return out


# --- When to tile -----------------------------------------------------------

# Bytes per pixel of the activations of the compiled whole-image forwards
# (temp buffers of jit(...).lower(...).compile().memory_analysis() on
# XLA:CPU at the published sizes, 128x128 and 256x256, 50/100/200 bands:
# 5.4-5.6 KB teacher, 6.1 KB student, independent of the band count).
TEACHER_BYTES_PER_PIXEL = 5700
STUDENT_BYTES_PER_PIXEL = 6200
AUTO_TILE = (512, 512)      # tile used when tiling is automatic
AUTO_MAX_PIXELS = 1 << 20   # scenes above a megapixel are always tiled
AUTO_MEMORY_FRACTION = 0.4  # ... and any batch estimated above this share


def estimate_bytes(shape: Sequence[int], method: str,
                   rx_precision: str = "float64") -> int:
    """Peak bytes of the whole-image path for a batch of `shape` (N, H, W, B).

    Network activations (TEACHER/STUDENT_BYTES_PER_PIXEL, from XLA's own
    buffer assignment; none for 'rx'), plus the float32 input and features
    and RX's copies of the cube in its precision (the cast and the centred
    one).
    """
    n, h, w, b = shape
    student = method == "fers"
    per_px = 0 if method == "rx" else (
        TEACHER_BYTES_PER_PIXEL + STUDENT_BYTES_PER_PIXEL * int(student))
    rx_bytes = 8 if rx_precision == "float64" else 4
    features = 0 if method == "rx" else 1 + int(student)
    cubes = 4 * b * (1 + features) + 2 * rx_bytes * b
    return int(n * h * w * (per_px + cubes))


def device_memory_bytes() -> int:
    """Memory the default device can hold: its allocator's limit on an
    accelerator, else the host's available RAM."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_tile(shape: Sequence[int], method: str, rx_precision: str = "float64",
              available: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """The automatic tiling rule: a tile size, or None for the whole image.

    Tiles of AUTO_TILE when a scene has more than AUTO_MAX_PIXELS pixels, or
    when `estimate_bytes` of the batch exceeds AUTO_MEMORY_FRACTION of the
    device's memory (`device_memory_bytes`, or `available`).
    """
    _, h, w, _ = shape
    if h * w > AUTO_MAX_PIXELS:
        return AUTO_TILE
    available = device_memory_bytes() if available is None else available
    if estimate_bytes(shape, method, rx_precision) > AUTO_MEMORY_FRACTION * available:
        return AUTO_TILE
    return None


def resolve_tile(tile, shape: Sequence[int], method: str,
                 rx_precision: str = "float64") -> Optional[Tuple[int, int]]:
    """An option value ('auto', 'off', None, (H, W) or 'H,W') -> tile or None."""
    if isinstance(tile, str) and tile.strip().lower() == "auto":
        return auto_tile(shape, method, rx_precision)
    return parse_tile(tile)

