"""Training-free anomaly detectors in jnp: RX, and the fusion of maps.

Every detector takes one cube (H, W, B) or a batch of cubes (N, H, W, B) of
one size and returns maps (H, W) or (N, H, W); a batch is one vmapped,
jit-compiled call. Each image is treated alone (its own min-max, mean and
covariance).

Cubes too large for memory: `rx_streaming` computes RX's statistics over
chunks (`rx_stats`) and scores chunk by chunk (`rx_score`), with the same
arithmetic as `rx` (one implementation: min-max, centring, scatter,
pseudo-inverse and quadratic form are shared).

Precision. The covariance of real scenes is near singular, so the numbers
depend on the arithmetic. Two paths reproduce the two RX forms of the
reference (SPEC.md section 6):

* "float64" (default): the reference's NumPy RX. Covariance, pseudo-inverse
  and quadratic form in float64, singular values below 1e-15 * the largest
  dropped (NumPy's pinv cutoff; the pseudo-inverse of the symmetric
  covariance through its eigendecomposition, which keeps the same values
  as the reference's SVD at half the cost). It agrees with the reference to
  ~4e-6 in AUC; float32 here would move AUCs by up to 0.19.
* "float32": the reference's batched torch RX, used by its 50-band FERS
  product fusion: float32 throughout, torch.linalg.pinv's default cutoff
  (B * float32 eps * the largest singular value).
"""

import contextlib
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fers_jax.errors import InputError

PRECISIONS = ("float64", "float32")
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators


def as_batch(cube, where="cube"):
    """Returns (batch (N, H, W, B), whether the input was a single image).

    Refuses other ranks, non-numeric data and (for concrete arrays, not
    inside a caller's jit) NaN or Inf: every detector would turn one
    non-finite value into a map of NaN without a word.
    """
    ndim = np.ndim(cube)
    if ndim not in (3, 4):
        raise InputError(f"{where}: expected (H, W, B) or (N, H, W, B), got "
                         f"shape {np.shape(cube)}")
    if not isinstance(cube, (np.ndarray, jax.Array)):
        cube = np.asarray(cube)
    if not (jnp.issubdtype(cube.dtype, jnp.floating)
            or jnp.issubdtype(cube.dtype, jnp.integer)):
        raise InputError(f"{where}: the cube holds {cube.dtype}, not real "
                         "numbers")
    if not isinstance(cube, jax.core.Tracer):
        finite = (np.isfinite(cube).all() if isinstance(cube, np.ndarray)
                  else jnp.isfinite(cube).all())
        if not bool(finite):
            bad = int(np.size(cube) - np.count_nonzero(np.isfinite(np.asarray(cube))))
            raise InputError(f"{where}: the cube has {bad} NaN or Inf values; "
                             "the detectors need finite numbers")
    return (cube[None], True) if ndim == 3 else (cube, False)


def _on_device(batch):
    """The batch as a device array: NumPy input is copied once (jnp.asarray
    copies twice on CPU), or not at all if it is 64-byte aligned."""
    return batch if isinstance(batch, jax.Array) else jax.device_put(batch)


def minmax(x, axes=None):
    """Scales x to [0, 1] over `axes` (all by default); a constant x gives 0."""
    lo = jnp.min(x, axis=axes, keepdims=True)
    span = jnp.max(x, axis=axes, keepdims=True) - lo
    return _scale(x, lo, span)


def _scale(x, lo, span):
    """minmax's arithmetic with a given lo and span (span 0: no scaling)."""
    return (x - lo) / jnp.where(span > 0, span, 1)


def pinv(a, rtol, hermitian: bool = False):
    """Moore-Penrose pseudo-inverse, as NumPy and torch compute it.

    Through the SVD, or (hermitian=True, NumPy's pinv(hermitian=True)) the
    eigendecomposition of a symmetric matrix, whose singular values are the
    absolute eigenvalues: the same pseudo-inverse at about half the cost.
    Values at or below `rtol` * the largest are dropped.
    """
    if hermitian:
        s, v = jnp.linalg.eigh(a)
        u, vt = v, v.swapaxes(-1, -2)
        mag = jnp.abs(s)
    else:
        u, s, vt = jnp.linalg.svd(a, full_matrices=False)
        mag = s
    keep = mag > rtol * jnp.max(mag, axis=-1, keepdims=True)
    s_inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return jnp.matmul(vt.swapaxes(-1, -2) * s_inv[..., None, :],
                      u.swapaxes(-1, -2), precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class _Form:
    """The arithmetic of one RX precision: dtype, pinv cutoff and method."""
    dtype: type
    rtol: float
    hermitian: bool

    def pinv(self, cov):
        return pinv(cov, self.rtol, self.hermitian)


def _form(precision, bands) -> _Form:
    if precision == "float64":
        # NumPy's pinv cutoff. The covariance is symmetric, and on real
        # scenes its condition number (1e6-1e9 on the shared ones) is far
        # from 1 / rtol, so the eigendecomposition keeps the same values as
        # the reference's SVD and gives its pseudo-inverse to ~cond * eps.
        return _Form(jnp.float64, 1e-15, True)
    if precision == "float32":
        # torch.linalg.pinv's default cutoff, through the SVD as torch does:
        # in float32 the cutoff falls among the covariance's own values, so
        # the method decides which survive.
        return _Form(jnp.float32, bands * float(np.finfo(np.float32).eps), False)
    raise InputError(f"RX precision must be one of {PRECISIONS}, got {precision!r}")


def _scatter(xc):
    """Sum of outer products of centred pixels (P, B) -> (B, B)."""
    return jnp.matmul(xc.T, xc, precision=_HIGHEST)


def _rx_scores(xc, inverse):
    """Squared Mahalanobis norms xc' inverse xc of centred pixels (P, B) -> (P,)."""
    return (jnp.matmul(xc, inverse, precision=_HIGHEST) * xc).sum(axis=-1)


def _centred(z, lo, span, mean, dtype):
    """Pixels z (P, B) min-max scaled with the image's (lo, span), in `dtype`,
    minus the image's mean scaled pixel."""
    return _scale(z.astype(dtype), lo, span) - mean


def _row_chunks(pixels, rows, fn, init):
    """Folds fn(chunk, start, carry) over `rows`-row chunks of pixels (P, B):
    whole chunks in a fori_loop (dynamic slices of the input, no copy), the
    remainder as one smaller chunk."""
    n = pixels.shape[0]
    rows = min(rows, n)
    full = n // rows

    def body(i, carry):
        start = i * rows
        return fn(jax.lax.dynamic_slice_in_dim(pixels, start, rows), start, carry)

    carry = jax.lax.fori_loop(0, full, body, init)
    if n % rows:
        carry = fn(pixels[full * rows:], full * rows, carry)
    return carry


def _rx_image(cube, form: _Form, rows: int):
    """RX scores (H, W) of one (H, W, B) cube: min-max scaled to [0, 1],
    centred on the mean pixel, covariance over N - 1, pseudo-inverse,
    squared Mahalanobis distances.

    The scatter and the scores run over chunks of `rows` pixels, so no
    centred copy of the image is made and each chunk stays in cache from
    its conversion to its product (on a 2-core VM a fresh 16 MB buffer
    alone cost ~7 ms of page faults). Only the summation order of the
    scatter differs from one product over all pixels.
    """
    h, w, b = cube.shape
    n = h * w
    pixels = cube.reshape(n, b)
    lo = jnp.min(pixels).astype(form.dtype)  # exact in any dtype
    span = jnp.max(pixels).astype(form.dtype) - lo
    mean = _scale(pixels.astype(form.dtype), lo, span).mean(axis=0)
    centred = functools.partial(_centred, lo=lo, span=span, mean=mean,
                                dtype=form.dtype)
    scatter = _row_chunks(pixels, rows,
                          lambda z, _, acc: acc + _scatter(centred(z)),
                          jnp.zeros((b, b), form.dtype))
    inverse = form.pinv(scatter / (n - 1))

    def score(z, start, out):
        return jax.lax.dynamic_update_slice_in_dim(
            out, _rx_scores(centred(z), inverse), start, axis=0)

    return _row_chunks(pixels, rows, score,
                       jnp.zeros(n, form.dtype)).reshape(h, w)


_RX_ROWS_CPU = 4096  # pixels per chunk of _rx_image on CPU (6.6 MB at 200 bands)


def _rx_plan(shape):
    """(images per step, pixels per chunk) of `_rx_batch` for a batch shape.

    CPU: two images at a time (lax.map over vmapped pairs), each in
    cache-sized chunks of pixels: 100 64x64x100 images took 0.41 s so,
    0.49 s one by one and 0.9 s all at once (2-core VM). With several CPU
    devices one image per step, keeping each LAPACK call to one matrix:
    jaxlib's batched calls spread a batch over the intra-op thread pool and
    wait for it, which deadlocked when several CPU devices did so at once
    (jaxlib 0.10.2, 2 cores). Accelerators: the whole batch vmapped, each
    image in one chunk.
    """
    n, h, w, _ = shape
    if jax.default_backend() != "cpu":
        return n, h * w
    return (2 if jax.device_count() == 1 else 1), _RX_ROWS_CPU


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (None without
    threadpoolctl). Made once: finding the libraries costs ~1 ms a call."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    # jaxlib takes LAPACK from SciPy, loading it on first use; a library
    # loaded after this would escape the limit.
    import scipy.linalg.cython_lapack  # noqa: F401
    return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread():
    """Runs XLA's per-matrix LAPACK calls (eigh, SVD, Cholesky) on one BLAS
    thread.

    On CPU they go to SciPy's OpenBLAS, whose threads only add
    synchronisation on matrices of a few hundred rows: a batched SVD ran 8x
    slower with its default 2 threads on a shared 2-core machine.
    Process-wide while it lasts; a no-op without threadpoolctl.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.partial(jax.jit, static_argnames=("precision",))
def _rx_batch(cubes, precision):
    """RX of a batch (N, H, W, B) of cubes, each with its own statistics."""
    form = _form(precision, cubes.shape[-1])
    per_step, rows = _rx_plan(cubes.shape)
    return jax.lax.map(functools.partial(_rx_image, form=form, rows=rows),
                       cubes, batch_size=per_step)


def rx(cube, precision: str = "float64"):
    """The RX detector of the reference, per image.

    Args:
      cube: (H, W, B) or (N, H, W, B), any real dtype.
      precision: "float64" (the reference's NumPy RX) or "float32" (its
        batched torch RX); see the module docstring.

    Returns:
      RX scores, (H, W) or (N, H, W), in the dtype of `precision`.

    For cubes too large for memory, `rx_streaming` computes the same map
    from statistics accumulated over chunks.
    """
    batch, single = as_batch(cube)
    _form(precision, 1)
    with jax.enable_x64(precision == "float64"), _one_blas_thread():
        out = jax.block_until_ready(_rx_batch(_on_device(batch), precision))
    return out[0] if single else out


# RX over chunks: the same statistics, bounded memory -------------------------

RX_CHUNK_PIXELS = 1 << 16  # pixels per chunk of rx_streaming (~100 MB at 200 bands)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _chunk_sum(z, lo, span, dtype):
    return _scale(z.astype(dtype), lo, span).sum(axis=0)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _chunk_scatter(z, lo, span, mean, dtype):
    return _scatter(_centred(z, lo, span, mean, dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _chunk_scores(z, lo, span, mean, inverse, dtype):
    return _rx_scores(_centred(z, lo, span, mean, dtype), inverse)


_pinv = jax.jit(pinv, static_argnames=("hermitian",))


@dataclasses.dataclass(frozen=True)
class RXStats:
    """The global statistics of one image's RX, in its precision's dtype:
    min-max scaling (lo, span), mean and pseudo-inverse covariance of the
    scaled pixels."""
    lo: jax.Array
    span: jax.Array
    mean: jax.Array
    inverse: jax.Array
    pixels: int


def _chunks(cube, chunk_pixels):
    """(P, B) row chunks of an (H, W, B) array (or memory map), as NumPy."""
    h, w, b = cube.shape
    rows = max(1, chunk_pixels // w)
    for r in range(0, h, rows):
        yield r, np.asarray(cube[r:r + rows]).reshape(-1, b)


@jax.jit
def _block_range(z):
    return jnp.min(z), jnp.max(z), jnp.isfinite(z).all()


@jax.jit
def _block_moments(z, shift, total, scatter):
    d = z.astype(shift.dtype) - shift
    return total + d.sum(axis=0), scatter + _scatter(d)


class RXAccumulator:
    """RX's statistics of one (H, W, B) cube, accumulated block by block.

    `add` takes the pixels (..., B) of each block once, in any order and
    as they come (a tiled path's RX inputs while they are spilled); `stats`
    gives `rx_stats`. With float64 one pass is enough: the exact min and
    max, and the sum and scatter of the pixels about a shift (the first
    block's mean), accumulated in float64 and moved to the mean and to the
    min-max scaling at the end. While the shift is within a few standard
    deviations of the mean this is the two-pass scatter to ~1e-15 relative;
    the maps equal `rx`'s to ~1e-12. float32 scales each pixel in float32
    first, which needs the min and max: `stats` then reads the cube twice
    more (the sum, then the scatter about the mean), as the whole-image
    float32 RX orders its arithmetic.

    The sums are jitted and dispatched without waiting (XLA's threads, not
    NumPy's BLAS, whose spinning threads slowed the rest of an out-of-core
    run by half); NaN or Inf is refused when `stats` is asked for, naming
    the first block that had any.
    """

    def __init__(self, bands: int, precision: str = "float64", where: str = "rx"):
        self.form = _form(precision, bands)
        self.precision, self.where, self.bands = precision, where, int(bands)
        self.n, self._ranges, self._moments, self._shift = 0, [], None, None

    def add(self, block, first_row: Optional[int] = None) -> None:
        """Accumulates the pixels of `block` (..., B)."""
        z = np.asarray(block).reshape(-1, self.bands)
        if z.shape[0] == 0:
            return
        self.n += z.shape[0]
        with jax.enable_x64(self.precision == "float64"):
            z = jnp.asarray(z)
            self._ranges.append((first_row, _block_range(z)))
            if self.precision != "float64":
                return
            if self._shift is None:
                self._shift = jnp.mean(z.astype(jnp.float64), axis=0)
                self._moments = (jnp.zeros(self.bands, jnp.float64),
                                 jnp.zeros((self.bands,) * 2, jnp.float64))
            self._moments = _block_moments(z, self._shift, *self._moments)

    def _range(self):
        lo, hi = np.inf, -np.inf
        for first_row, (b_lo, b_hi, finite) in self._ranges:
            if not bool(finite):
                at = "" if first_row is None else f" (rows from {first_row})"
                raise InputError(f"{self.where}: the cube has NaN or Inf values{at}; "
                                 "the detectors need finite numbers")
            lo, hi = min(lo, float(b_lo)), max(hi, float(b_hi))
        return lo, hi

    def stats(self, cube=None, chunk_pixels: int = RX_CHUNK_PIXELS) -> RXStats:
        """The image's RXStats; float32 reads `cube` (the same pixels) twice."""
        if self.n < 2:
            raise InputError(f"{self.where}: RX needs at least 2 pixels, got {self.n}")
        lo_f, hi_f = self._range()
        dtype, n = self.form.dtype, self.n
        with jax.enable_x64(self.precision == "float64"):
            lo = jnp.asarray(lo_f, dtype)
            span = jnp.asarray(hi_f, dtype) - lo
            if self.precision == "float64":
                total, scatter = (np.asarray(m) for m in self._moments)
                s = hi_f - lo_f
                mean_x = np.asarray(self._shift) + total / n
                scatter = scatter - np.outer(total, total) / n
                mean = jnp.asarray((mean_x - lo_f) / s, dtype)
                cov = jnp.asarray(scatter / (s * s) / (n - 1), dtype)
            else:
                total = np.zeros(self.bands, np.float64)
                for _, z in _chunks(cube, chunk_pixels):
                    total += np.asarray(_chunk_sum(z, lo, span, dtype), np.float64)
                mean = jnp.asarray(total / n, dtype)
                scatter = np.zeros((self.bands,) * 2, np.float64)
                for _, z in _chunks(cube, chunk_pixels):
                    scatter += np.asarray(_chunk_scatter(z, lo, span, mean, dtype),
                                          np.float64)
                cov = jnp.asarray(scatter / (n - 1), dtype)
            with _one_blas_thread():  # the LAPACK call of `rx`, alike
                inverse = jax.block_until_ready(
                    _pinv(cov, self.form.rtol, hermitian=self.form.hermitian))
        return RXStats(lo, span, mean, inverse, n)


def rx_stats(cube, precision: str = "float64",
             chunk_pixels: int = RX_CHUNK_PIXELS) -> RXStats:
    """RX's statistics of one (H, W, B) cube, `chunk_pixels` pixels at a time
    (an `RXAccumulator` over the row chunks: one pass in float64, three in
    float32). Chunk sums are accumulated in float64 whatever the precision;
    only the order of the arithmetic differs from `rx` (float64: the
    covariance to ~1e-15 relative)."""
    acc = RXAccumulator(cube.shape[-1], precision)
    for r, z in _chunks(cube, chunk_pixels):
        acc.add(z, first_row=r)
    return acc.stats(cube, chunk_pixels)


def rx_score(chunk, stats: RXStats):
    """RX scores of pixels (..., B) given an image's `rx_stats`."""
    chunk = np.asarray(chunk)
    dtype = stats.inverse.dtype
    with jax.enable_x64(dtype == jnp.float64):
        out = _chunk_scores(chunk.reshape(-1, chunk.shape[-1]), stats.lo,
                            stats.span, stats.mean, stats.inverse, dtype)
    return np.asarray(out).reshape(chunk.shape[:-1])


def rx_streaming(cube, precision: str = "float64",
                 chunk_pixels: Optional[int] = None,
                 accumulated: Optional[RXAccumulator] = None) -> np.ndarray:
    """`rx` of one (H, W, B) cube with bounded memory: `rx_stats` over row
    chunks, then the scores chunk by chunk. `accumulated`: an RXAccumulator
    that has seen every pixel of `cube` already (added as the cube was
    written), so that in float64 the cube is read once, for the scores.

    The cube can be a NumPy array or memory map of any size; device memory
    is a few chunks (`chunk_pixels`, default RX_CHUNK_PIXELS). Equals `rx` up
    to the order of the summations (float64: maps to ~1e-12 relative).

    Returns:
      (H, W) NumPy scores in the dtype of `precision`.
    """
    if np.ndim(cube) != 3:
        raise InputError(f"rx_streaming: expected one (H, W, B) cube, got shape "
                         f"{np.shape(cube)}")
    chunk_pixels = RX_CHUNK_PIXELS if chunk_pixels is None else int(chunk_pixels)
    stats = (rx_stats(cube, precision, chunk_pixels) if accumulated is None
             else accumulated.stats(cube, chunk_pixels))
    h, w, _ = cube.shape
    out = np.empty((h, w), np.dtype(stats.inverse.dtype))
    for r, z in _chunks(cube, chunk_pixels):
        out[r:r + z.shape[0] // w] = rx_score(z, stats).reshape(-1, w)
    return out


def fuse(maps: Sequence, mode: str = "sum"):
    """Fuses detection maps of one scene (or batch of scenes).

    "sum" adds them as they are; "product" multiplies them after min-max
    scaling each to [0, 1] per image (the reference's 50-band FERS map).
    """
    if not maps:
        raise InputError("fuse needs at least one map")
    if mode not in ("sum", "product"):
        raise InputError(f"fusion must be 'sum' or 'product', got {mode!r}")
    # float64 maps (RX's default) stay float64: outside x64 JAX would
    # silently round them to float32 before the product.
    with jax.enable_x64(any(np.dtype(m.dtype) == np.float64 for m in maps)):
        if mode == "sum":
            return functools.reduce(jnp.add, maps)
        scaled = [minmax(m, axes=(-2, -1)) for m in maps]
        return functools.reduce(jnp.multiply, scaled)


# Local detectors over a dual window -----------------------------------------
#
# LRX and CRD score each pixel against its own background: the pixels of an
# `outer` x `outer` window minus an `inner` x `inner` guard window, both
# centred on it (K = outer^2 - inner^2 background positions). As in RX, each
# image is first min-max scaled to [0, 1] over all its pixels and bands, and
# computed in float64.
#
# Borders (`border`), for windows that overhang the image:
#
# * "wrap": the image tiled periodically, as the public MATLAB code does
#   (repmat 3 x 3 and crop): a pixel on an edge takes its background from
#   the opposite edge. With outer <= min(H, W) no window reaches back to its
#   own pixel or guard window, so all K positions are used.
# * "reflect": mirrored padding (NumPy's "reflect": row -1 is row 1), but a
#   position whose mirrored source lies in the pixel's own guard window (the
#   pixel itself included) is left out; other mirrored pixels stay and may
#   count twice. Without that exclusion a pixel 1-2 rows from an edge
#   (for (3, 11)) had its own mirror image in its background and scored ~0.
# * "inside": only positions inside the image; the background shrinks near
#   edges (to (outer // 2 + 1)^2 - (inner // 2 + 1)^2 at a corner).
#
# Left-out positions are masked (weights 0), so every pixel still has a
# fixed-size K-position problem and the whole image is one batched, jitted
# computation. In no mode does the pixel under test, or a copy of a pixel
# of its guard window, enter its own background. Pixels whose exact
# spectrum recurs in the scene itself can still meet a copy (5-19% of the
# pixels of the shared ABU scenes equal a neighbour): CRD scores those ~0,
# LRX's pseudo-inverse form at most (K - 1)^2 / K.
#
# Memory is bounded by `chunk`: pixels (of all images of a batch together)
# are processed `chunk` at a time in a lax.map, so the per-pixel matrices
# of only one chunk exist at once, whatever the image or batch size.

BORDERS = ("wrap", "reflect", "inside")
DEFAULT_BORDER = "wrap"
LRX_FORMS = ("pinv", "matlab")
CRD_FORMS = ("sum-to-one", "plain")
LRX_RTOL = 1e-10
LRX_DELTA = 1e-5
_LRX_CHUNK = 256
_CRD_CHUNK = 512
_CRD_TILE = 8


@dataclasses.dataclass(frozen=True)
class Convention:
    """How the local detectors are computed: one place for every option.

    border: see the section comment; lrx_form: "pinv" (centred covariance,
    pseudo-inverse) or "matlab" (uncentred Gram + delta I); crd_form:
    "sum-to-one" (Li and Du 2015's main algorithm) or "plain"; scaling:
    the input the detectors get in evaluate.py, "reference" (the FERS
    reference's [-0.1, 0.1] float32 normalisation, which the detectors
    min-max again) or "cube" (the raw cube in float64, min-max scaled over
    the whole cube by the detector, as the MATLAB code).
    """
    border: str = DEFAULT_BORDER
    lrx_form: str = "pinv"
    crd_form: str = "sum-to-one"
    scaling: str = "reference"


CONVENTIONS = {
    "fers_jax": Convention(),
    # The public MATLAB code (lzw-lzw/Hyperspectral-anomaly-detection-methods,
    # CRD/CRDfunc.m, LRX/LRXfunc.m).
    "matlab": Convention(border="wrap", lrx_form="matlab", crd_form="sum-to-one",
                         scaling="cube"),
}


def convention(name: str = "fers_jax", **overrides) -> Convention:
    """The named convention, with any option given (not None) replacing its
    own; each value checked."""
    if name not in CONVENTIONS:
        raise InputError(f"convention must be one of {tuple(CONVENTIONS)}, got {name!r}")
    conv = dataclasses.replace(CONVENTIONS[name], **{
        k: v for k, v in overrides.items() if v is not None})
    for field, allowed in (("border", BORDERS), ("lrx_form", LRX_FORMS),
                           ("crd_form", CRD_FORMS),
                           ("scaling", ("reference", "cube"))):
        if getattr(conv, field) not in allowed:
            raise InputError(f"{field.replace('_', '-')} must be one of {allowed}, "
                             f"got {getattr(conv, field)!r}")
    return conv


def _check_windows(inner, outer, shape_hw, where):
    for name, v in (("inner", inner), ("outer", outer)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{where}: the {name} window must be an int, got {v!r}")
        if v < 1 or v % 2 == 0:
            raise InputError(f"{where}: the {name} window must be odd and "
                             f"positive, got {v}")
    if inner >= outer:
        raise InputError(f"{where}: the inner window ({inner}) must be smaller "
                         f"than the outer window ({outer})")
    if outer > min(shape_hw):
        raise InputError(f"{where}: the outer window ({outer}) is larger than "
                         f"the image ({shape_hw[0]} x {shape_hw[1]} pixels)")
    return int(inner), int(outer)


def _check_chunk(chunk, where):
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"{where}: chunk must be a positive int, got {chunk!r}")
    return int(chunk)


def _check_border(border, where):
    if border not in BORDERS:
        raise InputError(f"{where}: border must be one of {BORDERS}, got {border!r}")
    return border


def _check_lrx(form, rtol, delta):
    if form not in LRX_FORMS:
        raise InputError(f"lrx: form must be one of {LRX_FORMS}, got {form!r}")
    if not (np.isfinite(rtol) and 0 < rtol < 1):
        raise InputError(f"lrx: rtol must be in (0, 1), got {rtol!r}")
    if not (np.isfinite(delta) and delta > 0):
        raise InputError(f"lrx: delta must be finite and > 0, got {delta!r}")


def _check_crd(form, lam):
    if form not in CRD_FORMS:
        raise InputError(f"crd: form must be one of {CRD_FORMS}, got {form!r}")
    if not (np.isfinite(lam) and lam >= 0):
        raise InputError(f"crd: lam must be finite and >= 0, got {lam!r}")


def _background(inner, outer):
    """Row-major indices, in the outer window, of the K background pixels."""
    o, g = outer, (outer - inner) // 2
    grid = np.arange(o * o).reshape(o, o)
    guard = np.zeros((o, o), bool)
    guard[g:g + inner, g:g + inner] = True
    return grid[~guard]


def _valid(rows, cols, h, w, inner, outer, border):
    """Which of the K background positions count, (..., K) bool, for pixels
    at image rows/cols (...,); None when all do ("wrap").

    "inside": the position lies in the image. "reflect": its mirrored
    source is not in the pixel's own guard window.
    """
    if border == "wrap":
        return None
    r, gi = outer // 2, inner // 2
    idx = _background(inner, outer)
    di, dj = idx // outer - r, idx % outer - r
    sr, sc = rows[..., None] + di, cols[..., None] + dj
    if border == "inside":
        return (sr >= 0) & (sr < h) & (sc >= 0) & (sc < w)

    def mirror(s, n):  # NumPy "reflect" for |overhang| < n
        return jnp.where(s < 0, -s, jnp.where(s >= n, 2 * (n - 1) - s, s))
    guard = ((jnp.abs(mirror(sr, h) - rows[..., None]) <= gi)
             & (jnp.abs(mirror(sc, w) - cols[..., None]) <= gi))
    return ~guard


def _prepare_local(cubes, pad, border):
    """Per-image min-max to [0, 1] in float64, padded by `pad` pixels
    (periodically, by reflection, or with zeros for "inside": masked)."""
    x = jax.vmap(minmax)(cubes.astype(jnp.float64))
    mode = {"wrap": "wrap", "reflect": "reflect", "inside": "constant"}[border]
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)


def _pad_columns(block, lo, span, pad, border):
    """A block of rows (1, R + 2 pad, W, B), its halo rows already in place
    (`_halo_rows`), scaled as `minmax` with the image's (lo, span) and
    padded by `pad` columns as `_prepare_local` pads."""
    x = _scale(block.astype(jnp.float64), lo, span)
    mode = {"wrap": "wrap", "reflect": "reflect", "inside": "constant"}[border]
    return jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)), mode=mode)


def _chunked(fn, xs, chunk):
    """fn over the leading axis of xs, `chunk` rows per step (padded, cropped)."""
    n = xs.shape[0]
    chunk = min(chunk, n)
    steps = -(-n // chunk)
    xs = jnp.pad(xs, [(0, steps * chunk - n)] + [(0, 0)] * (xs.ndim - 1))
    out = jax.lax.map(fn, xs.reshape((steps, chunk) + xs.shape[1:]))
    return out.reshape((steps * chunk,) + out.shape[2:])[:n]


def _bordered_row(a_mat, v, c):
    """z = L^-1 v for A = L L' (P, K, K), v (P, K), from one Cholesky of the
    bordered [[A, v], [v', c]] (its last row; c must keep it definite)."""
    k = a_mat.shape[-1]
    border = jnp.concatenate([v, c[:, None]], axis=1)
    bordered = jnp.concatenate(
        [jnp.concatenate([a_mat, v[:, :, None]], axis=2), border[:, None, :]], axis=1)
    chol = jax.lax.linalg.cholesky(bordered, symmetrize_input=False)
    return chol, chol[:, k, :k]


def _lrx_pixels(xb, y, valid, form, rtol, delta):
    """LRX scores of a chunk of P pixels y (P, B), backgrounds xb (P, K, B),
    valid (P, K) or None (all K positions count)."""
    k, b = xb.shape[1], xb.shape[2]
    if valid is None:
        n = jnp.full(xb.shape[:1], float(k), xb.dtype)
        mean = xb.mean(axis=1)
    else:
        wts = valid.astype(xb.dtype)
        xb = xb * wts[..., None]  # masked positions: zero rows
        n = wts.sum(axis=1)
        mean = xb.sum(axis=1) / n[:, None]
    d = y - mean
    if form == "matlab":
        # (y - m)' (B'B + delta I)^-1 (y - m), B the uncentred background
        # (masked rows zero), by Cholesky; with more bands than positions
        # through the K x K form (Woodbury): (d'd - g'(delta I + BB')^-1 g)
        # / delta, g = B d.
        dd = jnp.sum(d * d, -1)
        if b <= k:
            gram = (jnp.einsum("pkb,pkc->pbc", xb, xb, precision=_HIGHEST)
                    + delta * jnp.eye(b, dtype=xb.dtype))
            _, z = _bordered_row(gram, d, 2 * dd / delta + 1)
            return jnp.sum(z * z, -1)
        gram = (jnp.einsum("pkb,plb->pkl", xb, xb, precision=_HIGHEST)
                + delta * jnp.eye(k, dtype=xb.dtype))
        g = jnp.einsum("pkb,pb->pk", xb, d, precision=_HIGHEST)
        _, z = _bordered_row(gram, g, 2 * dd + delta)
        return (dd - jnp.sum(z * z, -1)) / delta
    xc = xb - mean[:, None]
    if valid is not None:
        xc = xc * wts[..., None]
    dof = jnp.maximum(n - 1, 1)
    if b <= k:
        cov = jnp.einsum("pkb,pkc->pbc", xc, xc, precision=_HIGHEST) / dof[:, None, None]
        return jnp.einsum("pb,pbc,pc->p", d, pinv(cov, rtol, hermitian=True), d,
                          precision=_HIGHEST)
    # More bands than background pixels: the covariance has rank < K, and
    # d' pinv(C) d = (n - 1) |pinv(Xc Xc') Xc d|^2 (both from the singular
    # values of Xc, the same ones kept; masked rows give exact zeros,
    # dropped): a K x K instead of a B x B eigendecomposition.
    gram = jnp.einsum("pkb,plb->pkl", xc, xc, precision=_HIGHEST)
    g = jnp.einsum("pkb,pb->pk", xc, d, precision=_HIGHEST)
    z = jnp.einsum("pkl,pl->pk", pinv(gram, rtol, hermitian=True), g, precision=_HIGHEST)
    return dof * jnp.sum(z * z, axis=-1)


def _lrx_padded(x, row0, h, rtol, delta, inner, outer, chunk, border, form):
    """LRX scores (N, R, W) of the R rows of x (N, R + 2r, W + 2r, B), the
    scaled images padded by r = outer // 2, the first of them image row
    `row0` of an image of `h` rows (the whole image: row0 0, R = h)."""
    n, hp, wp, b = x.shape
    r = outer // 2
    rows_n, w = hp - 2 * r, wp - 2 * r
    flat = x.reshape(n * hp * wp, b)
    # Flat index of each pixel's window corner, its row and column.
    rows, cols = np.meshgrid(np.arange(rows_n), np.arange(w), indexing="ij")
    corner = (np.arange(n)[:, None, None] * hp * wp + rows * wp + cols)
    where = np.stack([corner.ravel(), np.broadcast_to(rows, corner.shape).ravel(),
                      np.broadcast_to(cols, corner.shape).ravel()], -1)
    window = (np.arange(outer)[:, None] * wp + np.arange(outer)[None, :]).ravel()
    background, centre = window[_background(inner, outer)], window[window.size // 2]

    def step(at):  # gathers whole B-band rows: cheap
        corners = at[:, 0]
        valid = _valid(at[:, 1] + row0, at[:, 2], h, w, inner, outer, border)
        return _lrx_pixels(flat[corners[:, None] + background],
                           flat[corners + centre], valid, form, rtol, delta)

    return _chunked(step, jnp.asarray(where, jnp.int32), chunk).reshape(n, rows_n, w)


_LOCAL_STATIC = ("inner", "outer", "chunk", "border", "form")


@functools.partial(jax.jit, static_argnames=_LOCAL_STATIC)
def _lrx_batch(cubes, rtol, delta, inner, outer, chunk, border, form):
    return _lrx_padded(_prepare_local(cubes, outer // 2, border), 0, cubes.shape[1],
                       rtol, delta, inner, outer, chunk, border, form)


@functools.partial(jax.jit, static_argnames=_LOCAL_STATIC)
def _lrx_block(block, lo, span, row0, h, rtol, delta, inner, outer, chunk, border,
               form):
    return _lrx_padded(_pad_columns(block, lo, span, outer // 2, border), row0, h,
                       rtol, delta, inner, outer, chunk, border, form)


def lrx(cube, inner: int = 3, outer: int = 11, rtol: float = LRX_RTOL,
        chunk: int = _LRX_CHUNK, border: str = DEFAULT_BORDER,
        form: str = "pinv", delta: float = LRX_DELTA):
    """Local RX: each pixel's Mahalanobis distance to its dual-window background.

    For each pixel y, the background is the pixels of the outer window minus
    the inner (guard) window (K = outer^2 - inner^2, fewer near the edges
    with border "inside"; see the section comment above). Images are
    min-max scaled to [0, 1] first; all in float64. Two forms:

    * "pinv": (y - m)' pinv(C) (y - m) with m the background mean and C its
      covariance (divided by n - 1, n the background count).
    * "matlab" (the public MATLAB code's LRXfunc.m): (y - m)' (G + delta I)^-1
      (y - m) with G = B'B the uncentred Gram matrix of the background
      spectra B (n x bands, not divided by n).

    Pseudo-inverse ("pinv"): with K <= B (e.g. 112 background pixels and 200
    bands) C is singular by construction, so the cutoff is part of the method.
    Eigenvalues below `rtol` * the largest are dropped (the pseudo-inverse
    of the symmetric C, or of the K x K Gram of the centred background
    when K <= B, through its eigendecomposition). On the shared
    scenes the kept eigenvalues of local covariances reach down to about
    1e-8 of the largest and the rank-deficiency zeros come out near 1e-16
    (float64 rounding of the product); 1e-10 sits in that gap, 4 orders
    above rounding, and below it lie directions whose spread is under the
    16-bit quantisation of the data. NumPy's default (1e-15) would keep
    rounding noise and give scores of 1e15.
    "matlab" solves by Cholesky, through the K x K system
    delta I + B B' (Woodbury) when there are more bands than positions.

    Args:
      cube: (H, W, B) or (N, H, W, B), any real dtype.
      inner, outer: odd window sizes, inner < outer <= min(H, W).
      rtol: pseudo-inverse cutoff ("pinv"), relative to the largest
        singular value.
      chunk: pixels processed at once. A 512 x 512 x 200 image needs about
        0.9 GB (XLA's estimate; mostly the float64 padded image).
      border: "wrap", "reflect" or "inside" (see the section comment).
      form: "pinv" or "matlab".
      delta: the diagonal loading of "matlab", > 0.

    Time: "pinv": the per-pixel K x K eigendecomposition dominates;
    "matlab": one K x K Cholesky per pixel, several times faster.

    Returns:
      float64 scores, (H, W) or (N, H, W).
    """
    batch, single = as_batch(cube)
    inner, outer = _check_windows(inner, outer, np.shape(batch)[1:3], "lrx")
    chunk = _check_chunk(chunk, "lrx")
    border = _check_border(border, "lrx")
    _check_lrx(form, rtol, delta)
    with jax.enable_x64(True), _one_blas_thread():
        out = _lrx_batch(_on_device(batch), float(rtol), float(delta), inner,
                         outer, chunk, border, form)
        out = jax.block_until_ready(out)  # the LAPACK calls run in the limit
    return out[0] if single else out


def _back_substitute(chol, z):
    """Solves L' a = z for a batch of lower-triangular L (P, K, K), z (P, K).

    Reads L by rows (the column form of the backward sweep), one row of all
    P pixels per step; XLA's per-matrix triangular_solve calls cost 3x more
    here.
    """
    k = chol.shape[-1]
    take = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)

    def step(j, state):  # a_i = z_i / L_ii, then z[:i] -= a_i L[i, :i]
        a, z = state
        i = k - 1 - j
        row = take(chol, i, axis=1)
        ai = take(z, i, axis=1) / take(row, i, axis=1)
        z = z - jnp.where(jnp.arange(k) < i, ai[:, None] * row, 0)
        return jax.lax.dynamic_update_index_in_dim(a, ai, i, axis=1), z

    return jax.lax.fori_loop(0, k, step, (jnp.zeros_like(z), z))[0]


_CRD_GROUP_BYTES = 2 << 20  # systems solved at once: ~2 MB of them (16 at K = 112)


def _crd_residual(a_mat, reg, v, yy, sum_to_one):
    """CRD residuals |y - X a| of a group of pixels from Gram quantities.

    a_mat = X'X + diag(reg) (P, K, K) is the regularised system, v = X'y
    (P, K), yy = y'y (P,); with `sum_to_one` X and y are the augmented ones
    (a final 1 on every spectrum) and the residual is that of the plain
    spectra.

    One Cholesky factorisation of the bordered system [[A, v], [v', 2 y'y]]
    gives A = L L' and, in its last row, z = L^-1 v (the forward sweep,
    done by LAPACK for one more row); then a = L'^-1 z. As A a = v,
    |y - X a|^2 = y'y - 2 a'v + a'(A - diag(reg)) a = y'y - |z|^2 - a' diag(reg) a,
    with a'v = |z|^2 from the factorisation itself. (2 y'y keeps the last
    pivot positive: v'A^-1 v <= |y|^2 for any positive reg.) The augmented
    residual is the plain one plus (1 - sum(a))^2, its last component.
    """
    k = a_mat.shape[-1]
    chol, z = _bordered_row(a_mat, v, 2 * yy)
    a = _back_substitute(chol[:, :k, :k], z)

    def factored(a_mat, v):
        return yy - jnp.sum(z * z, -1) - jnp.sum(reg * a * a, -1), a

    def fallback(a_mat, v):
        # Should the ridge not suffice (Cholesky fails: NaN; also y = 0),
        # the group is redone with the minimum-norm least-squares solution,
        # and its residual y'y - 2 a'v + a'X'Xa (exact for any a).
        eps = jnp.finfo(a_mat.dtype).eps
        a = jnp.einsum("pkl,pl->pk", pinv(a_mat, k * eps), v, precision=_HIGHEST)
        quad = jnp.sum(jnp.sum(a_mat * a[:, None, :], -1) * a - reg * a * a, -1)
        return yy - 2 * jnp.sum(a * v, -1) + quad, a

    squared, a = jax.lax.cond(jnp.all(jnp.isfinite(a)), factored, fallback, a_mat, v)
    if sum_to_one:
        squared = squared - (1 - jnp.sum(a, -1)) ** 2
    return jnp.sqrt(jnp.maximum(squared, 0))


def _crd_tiles(win, starts, lam, inner, outer, tile, hw, border, sum_to_one):
    """CRD scores (T, P, P) of T tiles of P x P pixels from their windows.

    win (T, S, S, B), S = P + outer - 1, holds all pixels any window of the
    tile touches; starts (T, 2) the image row and column of each tile's
    first pixel. One Gram of those S^2 pixels per tile (a large, efficient
    product) holds every pixel's X'X, X'y and y'y, taken out with static
    indices. For (3, 11) and 8 x 8 tiles this is 8x fewer flops than a Gram
    per pixel, leaving the K x K Cholesky as the main cost. The sum-to-one
    form's augmented Gram is that Gram + 1.
    """
    t, s, _, b = win.shape
    r = outer // 2
    flat = win.reshape(t, s * s, b)
    union = jnp.matmul(flat, flat.swapaxes(1, 2), precision=_HIGHEST)
    # Union indices of each tile pixel's background pixels and centre.
    corner = (np.arange(tile)[:, None] * s + np.arange(tile)).ravel()
    window = (np.arange(outer)[:, None] * s + np.arange(outer)).ravel()
    bg = corner[:, None] + window[_background(inner, outer)]
    centre = corner + r * s + r
    k, n_px = bg.shape[1], tile * tile
    union = union.reshape(t, s ** 4)
    # Gathers with static flat indices (stacking static slices of the union
    # instead ran ~10x slower in XLA on CPU). Per pixel: X'y, y'y, |x_i|^2.
    v = jnp.take(union, (centre[:, None] * s * s + bg).ravel(), axis=1)
    yy = jnp.take(union, centre * (s * s + 1), axis=1)
    x_sq = jnp.take(union, (bg * (s * s + 1)).ravel(), axis=1).reshape(t, n_px, k)
    v = v.reshape(t, n_px, k)
    rows = starts[:, :1] + np.arange(n_px) // tile
    cols = starts[:, 1:] + np.arange(n_px) % tile
    valid = _valid(rows, cols, hw[0], hw[1], inner, outer, border)  # (t, n_px, k)
    # lam |y - x_i|^2 on the diagonal (plain spectra), and a guard: exactly
    # repeated pixels (flat regions) with y equal to one of them make
    # X'X + lam G'G singular. A ridge of eps * trace(X'X) lifts it above the
    # float64 rounding of the Gram (~K eps |X'X|) and is ~1e-5 of the
    # lam G'G term on real data, so it does not move the scores.
    dist = jnp.maximum(yy[..., None] - 2 * v + x_sq, 0)
    if valid is not None:
        x_sq = jnp.where(valid, x_sq, 0)
    ridge = jnp.finfo(union.dtype).eps * jnp.sum(x_sq, -1, keepdims=True)
    reg = lam * dist + ridge
    if sum_to_one:
        union, v, yy = union + 1, v + 1, yy + 1
    if valid is not None:
        # A left-out position: its row and column of the system become
        # those of the identity and its X'y 0, so its weight is exactly 0.
        v = jnp.where(valid, v, 0)
        reg = jnp.where(valid, reg, 1)
    # The K x K systems, a cache-sized group of pixels at a time: each
    # group's X'X is gathered, factored, solved and used while in cache,
    # and no (pixels, K, K) array is ever written (on a 2-core VM that and
    # the full-size factor cost as much as LAPACK's factorisations).
    group = max(d for d in range(1, n_px + 1) if n_px % d == 0 and (
        d == 1 or d * k * k * union.dtype.itemsize <= _CRD_GROUP_BYTES))
    gram_idx = (bg[:, :, None] * s * s + bg[:, None, :]).reshape(-1, group, k, k)
    per_tile = n_px // group

    def solve(i):
        tile_i, part = i // per_tile, i % per_tile
        idx = jax.lax.dynamic_index_in_dim(gram_idx, part, keepdims=False)
        gram = jnp.take(union[tile_i], idx)  # (group, K, K)
        at = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=part * group,
                               slice_size=group)
        reg_g, v_g = at(reg[tile_i]), at(v[tile_i])
        if valid is not None:
            ok = at(valid[tile_i])
            gram = jnp.where(ok[:, :, None] & ok[:, None, :], gram, 0)
        a_mat = gram + reg_g[:, :, None] * jnp.eye(k, dtype=union.dtype)
        return _crd_residual(a_mat, reg_g, v_g, at(yy[tile_i]), sum_to_one)

    out = jax.lax.map(solve, jnp.arange(t * per_tile))
    return out.reshape(t, tile, tile)


def _crd_padded(x, row0, h, lam, inner, outer, chunk, border, form):
    """CRD scores (N, R, W) of the R rows of x (N, R + 2r, W + 2r, B), as
    `_lrx_padded`."""
    n, hp, wp, b = x.shape
    r = outer // 2
    rows_n, w = hp - 2 * r, wp - 2 * r
    tile = min(_CRD_TILE, outer - 1)  # (tile + 2r)^4 / tile^2 is least at 2r
    ny, nx = -(-rows_n // tile), -(-w // tile)
    # Tiles overhanging the bottom/right edge see edge copies; their extra
    # pixels are computed and cropped.
    x = jnp.pad(x, ((0, 0), (0, ny * tile - rows_n), (0, nx * tile - w), (0, 0)),
                mode="edge")
    s = tile + 2 * r
    # (image, row, column, band) of each tile's window corner.
    corners = np.stack(np.meshgrid(np.arange(n), np.arange(ny) * tile,
                                   np.arange(nx) * tile, [0], indexing="ij"), -1)

    def step(starts):
        win = jax.vmap(lambda c: jax.lax.dynamic_slice(x, c, (1, s, s, b))[0])(starts)
        at = starts[:, 1:3] + jnp.stack([row0, 0]).astype(starts.dtype)
        return _crd_tiles(win, at, lam, inner, outer, tile, (h, w),
                          border, form == "sum-to-one")

    out = _chunked(step, jnp.asarray(corners.reshape(-1, 4), jnp.int32),
                   max(1, chunk // tile ** 2))
    out = out.reshape(n, ny, nx, tile, tile).transpose(0, 1, 3, 2, 4)
    return out.reshape(n, ny * tile, nx * tile)[:, :rows_n, :w]


@functools.partial(jax.jit, static_argnames=_LOCAL_STATIC)
def _crd_batch(cubes, lam, inner, outer, chunk, border, form):
    return _crd_padded(_prepare_local(cubes, outer // 2, border), 0, cubes.shape[1],
                       lam, inner, outer, chunk, border, form)


@functools.partial(jax.jit, static_argnames=_LOCAL_STATIC)
def _crd_block(block, lo, span, row0, h, lam, inner, outer, chunk, border, form):
    return _crd_padded(_pad_columns(block, lo, span, outer // 2, border), row0, h,
                       lam, inner, outer, chunk, border, form)


def crd(cube, inner: int = 3, outer: int = 11, lam: float = 1e-6,
        chunk: int = _CRD_CHUNK, border: str = DEFAULT_BORDER,
        form: str = "sum-to-one"):
    """Collaborative Representation Detector (Li and Du, IEEE TGRS 2015).

    Each pixel y is represented by its background pixels X (B x K, the dual
    window as in `lrx`) with weights a = (X'X + lam G'G)^-1 X'y,
    G = diag(|y - x_i|), so pixels far from y are penalised; the score is
    the residual |y - X a|. Form "sum-to-one" (the paper's main algorithm
    and the public MATLAB code's CRDfunc.m): X and y augmented by a final 1
    in the solve (the weights nearly sum to one), G and the residual from
    the plain spectra; form "plain": no augmentation. Images are min-max
    scaled to [0, 1] first, as in `lrx` (the plain form's a and score do not
    depend on the scale, lam G'G scales with X'X; the shift matters; the
    sum-to-one form depends on both).

    Precision: float64. X'X of neighbouring spectra is ill-conditioned
    (about 1e8, more where spectra repeat, where only lam G'G keeps it
    invertible), beyond float32. The K x K system is
    solved by Cholesky after a ridge of eps * trace(X'X) (see
    `_crd_tiles`); a chunk whose factorisation still fails is solved with
    the pseudo-inverse instead. The residual comes from Gram quantities
    (y'y - |L^-1 X'y|^2 - a' diag(reg) a, see `_crd_residual`), so it is
    exact to a few sqrt(eps * y'y) (3e-8 for unit spectra; up to 1.1e-7
    seen on 200-band scenes): scores below that, such as pixels that recur
    in their own background, read as 0 or noise at that level. Elsewhere
    it agrees with the per-pixel solve to ~1e-9. Where y recurs twice or
    more in its background the system is singular even with lam G'G (any
    weights shared among the copies fit exactly): the exact score, 0, is
    returned; a plain solver returns rounding noise of any size there.

    Time: per pixel one K x K Cholesky (LAPACK, in cache-sized groups) and
    its two triangular sweeps are most of it.

    Args:
      cube: (H, W, B) or (N, H, W, B), any real dtype.
      inner, outer: odd window sizes, inner < outer <= min(H, W).
      lam: the distance-weighted Tikhonov weight (lambda), >= 0.
      chunk: pixels processed at once (rounded down to whole 8 x 8 tiles).
        A 512 x 512 x 200 image needs about 0.9 GB (XLA's estimate; mostly
        the float64 padded image) with chunk 512 or 4096 alike: the K x K
        systems themselves are built and solved ~2 MB at a time.
      border: "wrap", "reflect" or "inside" (see the section comment).
      form: "sum-to-one" or "plain".

    Returns:
      float64 residual norms, (H, W) or (N, H, W).
    """
    batch, single = as_batch(cube)
    inner, outer = _check_windows(inner, outer, np.shape(batch)[1:3], "crd")
    chunk = _check_chunk(chunk, "crd")
    border = _check_border(border, "crd")
    _check_crd(form, lam)
    with jax.enable_x64(True), _one_blas_thread():
        out = _crd_batch(_on_device(batch), float(lam), inner, outer, chunk,
                         border, form)
        out = jax.block_until_ready(out)  # the LAPACK calls run in the limit
    return out[0] if single else out


# --- LRX and CRD of cubes too large for memory ----------------------------------
#
# The same arithmetic as `lrx` / `crd` over blocks of rows: the image's min
# and max in one streamed pass, then each block read with outer // 2 halo
# rows (taken across the image's top and bottom as the border says), scaled
# and scored; pixel (i, j) sees the very window it sees in the whole image.
# Every block has one shape (the last is shifted back to end at the image's
# last row, scoring only the rows the others did not): one compilation.

LOCAL_BLOCK_BYTES = 32 << 20  # float64 bytes of one padded block of rows


def _global_minmax(cube, chunk_pixels: int, where: str):
    """The min and max of a cube read in row chunks; refuses NaN and Inf."""
    lo, hi = np.inf, -np.inf
    for r, z in _chunks(cube, chunk_pixels):
        if not np.isfinite(z).all():
            raise InputError(f"{where}: the cube has NaN or Inf values (rows from "
                             f"{r}); the detectors need finite numbers")
        lo, hi = min(lo, float(z.min())), max(hi, float(z.max()))
    return lo, hi


def _halo_rows(cube, r0: int, r1: int, pad: int, border: str, fill: float):
    """Rows [r0 - pad, r1 + pad) of an (H, W, B) cube as float64 (1, R, W, B):
    rows beyond the image wrapped, mirrored (NumPy's "reflect") or, for
    "inside", `fill` (the image's minimum: it scales to the 0 of the
    whole-image padding, and those positions are masked anyway)."""
    h = cube.shape[0]
    a, b = max(0, r0 - pad), min(h, r1 + pad)
    main = np.asarray(cube[a:b], np.float64)
    idx = np.arange(r0 - pad, r1 + pad)
    out = np.empty((idx.size,) + main.shape[1:], np.float64)
    out[a - (r0 - pad):b - (r0 - pad)] = main
    for i in np.flatnonzero((idx < a) | (idx >= b)):
        if border == "inside":
            out[i] = fill
            continue
        src = idx[i] % h if border == "wrap" else (
            -idx[i] if idx[i] < 0 else 2 * (h - 1) - idx[i])
        out[i] = (main[src - a] if a <= src < b
                  else np.asarray(cube[src:src + 1], np.float64)[0])
    return out[None]


def local_block_rows(shape, outer: int, block_bytes: int = LOCAL_BLOCK_BYTES) -> int:
    """Rows per block of `lrx_streaming` / `crd_streaming`: a multiple of 8
    (CRD's tiles) whose padded float64 block is about `block_bytes`."""
    h, w, b = (int(s) for s in shape)
    per_row = (w + outer) * b * 8
    rows = max(8, (block_bytes // per_row - outer) // 8 * 8)
    return min(h, rows)


def _local_streaming(score, name, cube, inner, outer, border, block_rows,
                     minmax=None) -> np.ndarray:
    """score(block, lo, span, row0, h) over the blocks of rows of `cube`;
    `minmax`: the cube's (min, max) if already known (else one pass)."""
    if np.ndim(cube) != 3:
        raise InputError(f"{name}_streaming: expected one (H, W, B) cube, got shape "
                         f"{np.shape(cube)}")
    h, w, b = cube.shape
    inner, outer = _check_windows(inner, outer, (h, w), name)
    border = _check_border(border, name)
    rows = local_block_rows(cube.shape, outer) if block_rows is None else int(block_rows)
    if rows < 1:
        raise InputError(f"{name}_streaming: block_rows must be positive, got {rows}")
    rows, pad = min(rows, h), outer // 2
    lo, hi = minmax if minmax is not None else _global_minmax(cube, max(w, rows * w),
                                                              name)
    out = np.empty((h, w), np.float64)
    with jax.enable_x64(True), _one_blas_thread():
        lo_, span = jnp.float64(lo), jnp.float64(hi - lo)
        for own in range(0, h, rows):
            start = min(own, h - rows)
            block = _halo_rows(cube, start, start + rows, pad, border, lo)
            scores = score(jax.device_put(block), lo_, span, jnp.int32(start),
                           jnp.int32(h))
            out[own:start + rows] = np.asarray(scores)[0, own - start:]
    return out


def lrx_streaming(cube, inner: int = 3, outer: int = 11, rtol: float = LRX_RTOL,
                  chunk: int = _LRX_CHUNK, border: str = DEFAULT_BORDER,
                  form: str = "pinv", delta: float = LRX_DELTA,
                  block_rows: Optional[int] = None, minmax=None) -> np.ndarray:
    """`lrx` of one (H, W, B) cube read in blocks of rows (an array, a memory
    map, or anything sliced `cube[r0:r1]`, such as data.DiskCube): memory is
    one block of `block_rows` rows and its halo (default `local_block_rows`,
    ~32 MB of float64) plus the (H, W) map. The scores equal `lrx`'s (the
    same per-pixel computation, in other chunks). `minmax`: the cube's
    (min, max) when the caller has it (saves a pass over the disk).

    Returns:
      (H, W) float64 NumPy scores.
    """
    _check_lrx(form, rtol, delta)
    chunk = _check_chunk(chunk, "lrx")
    return _local_streaming(
        lambda *a: _lrx_block(*a, float(rtol), float(delta), inner, outer, chunk,
                              border, form),
        "lrx", cube, inner, outer, border, block_rows, minmax)


def crd_streaming(cube, inner: int = 3, outer: int = 11, lam: float = 1e-6,
                  chunk: int = _CRD_CHUNK, border: str = DEFAULT_BORDER,
                  form: str = "sum-to-one",
                  block_rows: Optional[int] = None, minmax=None) -> np.ndarray:
    """`crd` of one (H, W, B) cube read in blocks of rows, as `lrx_streaming`.
    Blocks start on CRD's 8-row tile grid (but the last), so the scores are
    `crd`'s bit for bit where the tiles coincide.

    Returns:
      (H, W) float64 NumPy scores.
    """
    _check_crd(form, lam)
    chunk = _check_chunk(chunk, "crd")
    return _local_streaming(
        lambda *a: _crd_block(*a, float(lam), inner, outer, chunk, border, form),
        "crd", cube, inner, outer, border, block_rows, minmax)
