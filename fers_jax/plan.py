"""Per-scene decisions, made once: how a scene is computed.

`plan_scene` says, for one batch shape and method, whether the networks and
RX run on the whole image or tile by tile (and with which tile), which RX
precision and which FERS fusion apply, and whether RX is computed whole or
streamed. The evaluation, fers_jax.inference and fers_jax.tiling read the
plan; none of them decides again.
"""

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import jax
import numpy as np

from fers_jax.errors import InputError

FUSIONS = ("auto", "sum", "product")
PRODUCT_MAX_BANDS = 50  # the reference fuses by product at 50 bands and below


def resolve_fusion(fusion: str, bands: int) -> str:
    if fusion not in FUSIONS:
        raise InputError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "auto":
        return "product" if bands <= PRODUCT_MAX_BANDS else "sum"
    return fusion


def resolve_precision(precision: str, fusion: str) -> str:
    """'auto' follows the reference: float32 RX on the product path only."""
    if precision == "auto":
        return "float32" if fusion == "product" else "float64"
    return precision


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
    return host_memory_bytes()


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



RX_WHOLE_MAX_BYTES = 1 << 30  # rx='auto': whole-image RX up to this estimate


def whole_rx_fits(shape_hwb, precision: str) -> bool:
    """Whether `detectors.rx` of one cube stays under RX_WHOLE_MAX_BYTES (and
    AUTO_MEMORY_FRACTION of the device): the cast cube, the centred one and
    the product, in the precision's dtype."""
    h, w, b = shape_hwb
    need = 3 * h * w * b * (8 if precision == "float64" else 4)
    return need <= min(RX_WHOLE_MAX_BYTES,
                       AUTO_MEMORY_FRACTION * device_memory_bytes())


# --- The plan ---------------------------------------------------------------

CLASSICAL = ("rx", "lrx", "crd")
LEARNED = ("ferd", "fers")
PATHS = ("whole", "tiled", "out-of-core")


@dataclasses.dataclass(frozen=True)
class ScenePlan:
    """How one batch of scenes is computed; read by everything downstream.

    Attributes:
      method: rx, lrx, crd, ferd or fers.
      path: 'whole' (every network and RX on whole images, the batch
        sharded over devices), 'tiled' (fers_jax.tiling, one image at a
        time, in memory) or 'out-of-core' (one image read from disk in
        row blocks, RX inputs spilled to disk: resident memory bounded by
        the tile, not the scene; `budget` says when; LRX and CRD stream
        blocks of whole rows, detectors.lrx_streaming / crd_streaming).
      tile: (H, W) tile of the tiled path (out of core, LRX/CRD: (rows of
        a block, W)), else None.
      fusion: FERS's 'sum' or 'product'; 'ferd' for FERD; None otherwise.
      rx_precision: RX's arithmetic, float64 or float32.
      rx: 'whole' (detectors.rx of a cube) or 'stream' (detectors.rx_streaming).
      rx_inputs: the cubes RX scores, named by what is added to x.
      need_bytes: the estimated working set of this plan.
      chunk_pixels: pixels per chunk of a streamed RX (None: its default).
    """
    method: str
    path: str
    tile: Optional[Tuple[int, int]]
    fusion: Optional[str]
    rx_precision: str
    rx: str
    rx_inputs: Tuple[str, ...] = ()
    need_bytes: int = 0
    chunk_pixels: Optional[int] = None

    @property
    def tiled(self) -> bool:
        return self.path != "whole"


def rx_inputs(method: str, fusion: Optional[str]) -> Tuple[str, ...]:
    if method == "rx":
        return ("x",)
    if method == "ferd":
        return ("x+spe",)
    if method == "fers":
        return ("x+spe+spa",) if fusion == "sum" else ("x+spa", "x+spe")
    return ()


def is_flight_line(shape_hw: Sequence[int]) -> bool:
    """A scene above AUTO_MAX_PIXELS: normalised without a float64 copy,
    scored alone (a batch of one) and run once (its compile time included)."""
    return int(shape_hw[0]) * int(shape_hw[1]) > AUTO_MAX_PIXELS


def plan_scene(shape: Sequence[int], method: str, tile="auto",
               fusion: str = "auto", precision: str = "auto",
               rx: str = "auto", budget: Optional[int] = None) -> ScenePlan:
    """The decisions for a batch of `shape` (N, H, W, B), made once.

    Args:
      tile: 'auto' (auto_tile), 'off'/None (whole images), or (H, W) / 'H,W'.
      fusion, precision: the options (FERS's 'auto' fusion is sum above 50
        bands, product at 50 and below; 'auto' precision float32 RX on the
        product path only, float64 elsewhere).
      rx: 'auto' (stream on the tiled path where the whole-image RX of a
        cube would not fit, `whole_rx_fits`; RX itself always streams when
        tiled), 'whole' or 'stream'.
      budget: memory budget in bytes (None: no limit). A scene whose
        in-memory plan needs more (`in_memory_bytes`) runs out of core
        with the largest tile that fits (`out_of_core_bytes`); a budget
        too small for the smallest tile is refused, naming the smallest
        budget that works.
    """
    if rx not in ("auto", "whole", "stream"):
        raise InputError(f"rx must be 'auto', 'whole' or 'stream', got {rx!r}")
    _, h, w, b = shape
    if method == "fers":
        fusion = resolve_fusion(fusion, b)
        rx_precision = resolve_precision(precision, fusion)
    else:
        fusion = "ferd" if method == "ferd" else None
        rx_precision = "float64" if precision == "auto" else precision
    inputs = rx_inputs(method, fusion)
    if method in ("lrx", "crd"):
        plan = ScenePlan(method, "whole", None, None, "float64", "whole",
                         need_bytes=in_memory_bytes(shape, method, "whole", None))
        if budget is None or plan.need_bytes <= budget or shape[0] != 1:
            _check_budget(plan, budget, shape)
            return plan
        # Out of core: blocks of whole rows (detectors.lrx_streaming).
        return _out_of_core(shape, method, [(r, w) for r in LOCAL_BLOCK_ROWS],
                            budget, None, "float64", ())
    chosen = resolve_tile(tile, shape, method, rx_precision)
    if chosen is None:
        mode = "whole" if rx == "auto" else rx
        path = "whole"
    else:
        path = "tiled"
        mode = rx if rx != "auto" else (
            "stream" if method == "rx" or not whole_rx_fits((h, w, b), rx_precision)
            else "whole")
    need = in_memory_bytes(shape, method, path, chosen, mode, rx_precision)
    if budget is None or need <= budget or shape[0] != 1:
        plan = ScenePlan(method, path, chosen, fusion, rx_precision, mode, inputs, need)
        if shape[0] != 1:
            _check_budget(plan, budget, shape)
        return plan
    fixed = None if (isinstance(tile, str) and tile.strip().lower() == "auto") \
        else parse_tile(tile)
    return _out_of_core(shape, method, [fixed] if fixed else OUT_OF_CORE_TILES,
                        budget, fusion, rx_precision, inputs)


def _out_of_core(shape, method, candidates, budget, fusion, rx_precision, inputs
                 ) -> ScenePlan:
    """The out-of-core plan with the first candidate tile that fits `budget`;
    refused, naming the smallest budget that works, when none does."""
    _, h, w, b = shape
    for t in candidates:
        t = (min(t[0], h), min(t[1], w))
        need = out_of_core_bytes(shape, method, t)
        if need <= budget:
            return ScenePlan(method, "out-of-core", t, fusion, rx_precision,
                             "stream", inputs, need, ooc_chunk_pixels(shape, t))
    least = out_of_core_bytes(shape, method, (min(candidates[-1][0], h),
                                              min(candidates[-1][1], w)))
    raise InputError(
        f"the memory budget of {budget / 1e9:.3g} GB is too small for even one "
        f"tile of this {h} x {w} x {b} scene ({method}, tile "
        f"{candidates[-1][0]}x{candidates[-1][1]}); the smallest budget that "
        f"works is --memory-budget {_round_up_gb(least)}")


def _round_up_gb(n: int) -> str:
    return f"{np.ceil(n / 1e7) / 100:.2f}"


def _check_budget(plan: ScenePlan, budget, shape):
    if budget is not None and plan.need_bytes > budget:
        _, h, w, b = shape
        raise InputError(
            f"{plan.method} on {shape[0]} x {h} x {w} x {b} needs about "
            f"{plan.need_bytes / 1e9:.3g} GB in memory (no out-of-core path for "
            f"{plan.method if shape[0] == 1 else 'a batch'}); the memory budget is "
            f"{budget / 1e9:.3g} GB: the smallest budget that works is "
            f"--memory-budget {_round_up_gb(plan.need_bytes)}")


# --- Memory, as the plans use it ----------------------------------------------

OUT_OF_CORE_TILES = ((256, 512), (128, 512), (64, 512), (32, 1024), (32, 512), (32, 256),
                     (16, 128))  # by preference: the largest that fits the budget
LOCAL_BLOCK_ROWS = (256, 128, 64, 32, 16, 8)  # LRX/CRD out of core: whole rows
LOCAL_HALO = 8             # rows and columns of halo budgeted (outer <= 17)
LOCAL_WORK_BYTES_PER_BAND = 256 * 128 * 8 * 4  # LRX/CRD: a chunk's gathered windows
DEFAULT_BUDGET_FRACTION = 0.1  # --memory-budget default: of MemAvailable
TRUNK_WINDOW_BYTES_PER_PIXEL = 80   # see fers_jax.tiling.TiledFeatures
SPP_TILE_BYTES_PER_PIXEL = 4 * 600  # the student head on an output tile
MAP_BYTES_PER_PIXEL = 8 * 6         # maps, fused map, ROC sorting (float64, int64)


def in_memory_bytes(shape, method: str, path: str, tile=None, rx: str = "whole",
                    rx_precision: str = "float64") -> int:
    """Estimated bytes of a scene computed in memory: the scene as loaded
    (float32) and normalised, then `estimate_bytes` (whole) or the tiled
    path's RX input cubes, whole-image RX and tile activations."""
    n, h, w, b = shape
    px = n * h * w
    loaded = 2 * 4 * b * px + MAP_BYTES_PER_PIXEL * px
    if path == "whole" or method in ("rx", "lrx", "crd"):
        if method in ("lrx", "crd"):
            return loaded + 8 * 3 * b * px + LOCAL_WORK_BYTES_PER_BAND * b
        if method == "rx" and path != "whole":
            return loaded
        return loaded + estimate_bytes(shape, method, rx_precision)
    inputs = len(rx_inputs(method, resolve_fusion("auto", b) if method == "fers"
                           else None))
    rx_bytes = 3 * b * (8 if rx_precision == "float64" else 4) * px \
        if rx == "whole" else 0
    return loaded + inputs * 4 * b * px + rx_bytes + _tile_bytes(shape, method, tile)


def _tile_bytes(shape, method, tile) -> int:
    _, h, w, b = shape
    th, tw = tile
    per_px = TEACHER_BYTES_PER_PIXEL + 4 * b * 6
    total = th * tw * per_px
    if method == "fers":
        window = (max(th, 1024) + 2 * 288) * (max(tw, 1024) + 2 * 288)
        total += (min(window, h * w) * TRUNK_WINDOW_BYTES_PER_PIXEL
                  + th * tw * SPP_TILE_BYTES_PER_PIXEL + 12 * h * w)
    return total


RX_CHUNK_PIXELS = 1 << 16  # detectors.RX_CHUNK_PIXELS: the in-memory default


def ooc_chunk_pixels(shape, tile) -> int:
    """Out of core, RX streams chunks of the tile's rows (at most RX_CHUNK_PIXELS)."""
    return max(shape[2], min(RX_CHUNK_PIXELS, tile[0] * shape[2]))


def out_of_core_bytes(shape, method: str, tile) -> int:
    """Estimated resident bytes of a scene out of core: a row band of the
    raw and normalised image (tile rows + halo, all columns), the tile's
    activations, RX's chunks and the maps; the image itself stays on disk."""
    _, h, w, b = shape
    th, _ = tile
    if method in ("lrx", "crd"):  # float32 read, float64 block, scaled, padded
        return int((th + 2 * LOCAL_HALO) * (w + 2 * LOCAL_HALO) * b * (4 + 3 * 8)
                   + LOCAL_WORK_BYTES_PER_BAND * b + 16 * h * w)
    from_disk = (th + 16) * w * b * (4 + 4 + 8)  # raw block, float64 scaling, float32
    rx_chunk = 4 * ooc_chunk_pixels(shape, tile) * b * 8 + 4 * b * b * 8
    net = 0 if method == "rx" else _tile_bytes(shape, method, tile)
    return int(from_disk + rx_chunk + net + MAP_BYTES_PER_PIXEL * h * w)


def default_budget() -> int:
    """--memory-budget's default: DEFAULT_BUDGET_FRACTION of the RAM
    available now (MemAvailable), at least 1 GB."""
    return max(1 << 30, int(DEFAULT_BUDGET_FRACTION * host_memory_bytes()))


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def plan_for(cfg, shape: Sequence[int], in_memory: bool = False) -> ScenePlan:
    """`plan_scene` with the options of an evaluation config (EvalConfig or
    anything with method, tile, fusion, precision and memory_budget (GB)
    attributes). `in_memory`: for inputs already in memory (a detector
    called on an array), the budget is not applied."""
    gb = None if in_memory else getattr(cfg, "memory_budget", None)
    return plan_scene(shape, cfg.method, getattr(cfg, "tile", "auto"),
                      getattr(cfg, "fusion", "auto"),
                      getattr(cfg, "precision", "auto"),
                      budget=None if gb is None else int(gb * 1e9))
