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


def rx_stats(cube, precision: str = "float64",
             chunk_pixels: int = RX_CHUNK_PIXELS) -> RXStats:
    """RX's statistics of one (H, W, B) cube, `chunk_pixels` pixels at a time.

    The whole-image RX's arithmetic in three passes over the chunks: the
    global min and max (exact in any order), the mean of the scaled pixels,
    then the scatter of the pixels centred on that mean (exact centring:
    no sum-of-squares cancellation); the pseudo-inverse once. Chunk sums
    are accumulated in float64 whatever the precision. Only the order of
    the summations differs from `rx`: the covariance to ~1e-16 relative
    (float64).
    """
    h, w, b = cube.shape
    form = _form(precision, b)
    dtype = form.dtype
    n = h * w
    with jax.enable_x64(precision == "float64"):
        lo, hi = np.inf, -np.inf
        for _, z in _chunks(cube, chunk_pixels):
            lo, hi = min(lo, z.min()), max(hi, z.max())
        lo = jnp.asarray(lo, dtype)
        span = jnp.asarray(hi, dtype) - lo
        total = np.zeros(b, np.float64)
        for _, z in _chunks(cube, chunk_pixels):
            total += np.asarray(_chunk_sum(z, lo, span, dtype), np.float64)
        mean = jnp.asarray(total / n, dtype)
        scatter = np.zeros((b, b), np.float64)
        for _, z in _chunks(cube, chunk_pixels):
            scatter += np.asarray(_chunk_scatter(z, lo, span, mean, dtype), np.float64)
        cov = jnp.asarray(scatter / (n - 1), dtype)
        with _one_blas_thread():  # the LAPACK call of `rx`, alike
            inverse = jax.block_until_ready(
                _pinv(cov, form.rtol, hermitian=form.hermitian))
    return RXStats(lo, span, mean, inverse, n)


def rx_score(chunk, stats: RXStats):
    """RX scores of pixels (..., B) given an image's `rx_stats`."""
    chunk = np.asarray(chunk)
    dtype = stats.inverse.dtype
    with jax.enable_x64(dtype == jnp.float64):
        out = _chunk_scores(chunk.reshape(-1, chunk.shape[-1]), stats.lo,
                            stats.span, stats.mean, stats.inverse, dtype)
    return np.asarray(out).reshape(chunk.shape[:-1])


def rx_streaming(cube, precision: str = "float64",
                 chunk_pixels: Optional[int] = None) -> np.ndarray:
    """`rx` of one (H, W, B) cube with bounded memory: `rx_stats` over row
    chunks, then the scores chunk by chunk.

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
    stats = rx_stats(cube, precision, chunk_pixels)
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
# centred on it (K = outer^2 - inner^2 background pixels). Borders are
# padded by reflection (jnp.pad mode="reflect", NumPy's "reflect": the edge
# pixel is not repeated, row -1 is row 1), so border windows hold mirrored
# copies of real pixels. A pixel d rows (or columns) from a border, the
# edge being d = 0, with inner // 2 < 2d <= outer // 2 (d = 1, 2 for
# (3, 11)) has its own mirror image in its background; so do pixels whose
# exact spectrum recurs nearby (5-19% of the pixels of the shared ABU scenes
# equal a neighbour). CRD scores those 0, LRX at most (K - 1)^2 / K (the
# bound for a point of the sample, reached when B >= K - 1).
# As in RX, each image is first min-max scaled to [0, 1] over all its pixels
# and bands, and computed in float64.
#
# Memory is bounded by `chunk`: pixels (of all images of a batch together)
# are processed `chunk` at a time in a lax.map, so the per-pixel matrices
# of only one chunk exist at once, whatever the image or batch size.

LRX_RTOL = 1e-10
_LRX_CHUNK = 256
_CRD_CHUNK = 512
_CRD_TILE = 8


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


def _background(inner, outer):
    """Row-major indices, in the outer window, of the K background pixels."""
    o, g = outer, (outer - inner) // 2
    grid = np.arange(o * o).reshape(o, o)
    guard = np.zeros((o, o), bool)
    guard[g:g + inner, g:g + inner] = True
    return grid[~guard]


def _prepare_local(cubes, pad):
    """Per-image min-max to [0, 1] in float64, reflect-padded by `pad` pixels."""
    x = jax.vmap(minmax)(cubes.astype(jnp.float64))
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def _chunked(fn, xs, chunk):
    """fn over the leading axis of xs, `chunk` rows per step (padded, cropped)."""
    n = xs.shape[0]
    chunk = min(chunk, n)
    steps = -(-n // chunk)
    xs = jnp.pad(xs, [(0, steps * chunk - n)] + [(0, 0)] * (xs.ndim - 1))
    out = jax.lax.map(fn, xs.reshape((steps, chunk) + xs.shape[1:]))
    return out.reshape((steps * chunk,) + out.shape[2:])[:n]


def _lrx_pixels(xb, y, rtol):
    """LRX scores of a chunk of P pixels y (P, B), backgrounds xb (P, K, B)."""
    k = xb.shape[1]
    mean = xb.mean(axis=1)
    xc = xb - mean[:, None]
    d = y - mean
    if xb.shape[-1] <= k:
        cov = jnp.einsum("pkb,pkc->pbc", xc, xc, precision=_HIGHEST) / (k - 1)
        return jnp.einsum("pb,pbc,pc->p", d, pinv(cov, rtol, hermitian=True), d,
                          precision=_HIGHEST)
    # More bands than background pixels: the covariance has rank < K, and
    # d' pinv(C) d = (K - 1) |pinv(Xc Xc') Xc d|^2 (both from the singular
    # values of Xc, the same ones kept): a K x K instead of a B x B
    # eigendecomposition.
    gram = jnp.einsum("pkb,plb->pkl", xc, xc, precision=_HIGHEST)
    g = jnp.einsum("pkb,pb->pk", xc, d, precision=_HIGHEST)
    z = jnp.einsum("pkl,pl->pk", pinv(gram, rtol, hermitian=True), g, precision=_HIGHEST)
    return (k - 1) * jnp.sum(z * z, axis=-1)


@functools.partial(jax.jit, static_argnames=("inner", "outer", "chunk"))
def _lrx_batch(cubes, rtol, inner, outer, chunk):
    n, h, w, b = cubes.shape
    r = outer // 2
    x = _prepare_local(cubes, r)
    hp, wp = h + 2 * r, w + 2 * r
    flat = x.reshape(n * hp * wp, b)
    # Flat index of each pixel's window corner, and of the window around it.
    corner = (np.arange(n)[:, None, None] * hp * wp
              + np.arange(h)[None, :, None] * wp + np.arange(w)[None, None, :])
    window = (np.arange(outer)[:, None] * wp + np.arange(outer)[None, :]).ravel()
    background, centre = window[_background(inner, outer)], window[window.size // 2]

    def step(corners):  # gathers whole B-band rows: cheap
        return _lrx_pixels(flat[corners[:, None] + background],
                           flat[corners + centre], rtol)

    return _chunked(step, jnp.asarray(corner.ravel(), jnp.int32),
                    chunk).reshape(n, h, w)


def lrx(cube, inner: int = 3, outer: int = 11, rtol: float = LRX_RTOL,
        chunk: int = _LRX_CHUNK):
    """Local RX: each pixel's Mahalanobis distance to its dual-window background.

    For each pixel y, the background is the K = outer^2 - inner^2 pixels of
    the outer window minus the inner (guard) window; the score is
    (y - m)' pinv(C) (y - m) with m their mean and C their covariance
    (divided by K - 1). Images are min-max scaled to [0, 1] first and
    reflect-padded (see the section comment above); all in float64.

    Pseudo-inverse: with K <= B (e.g. 112 background pixels and 200 bands) C
    is singular by construction, so the cutoff is part of the method.
    Eigenvalues below `rtol` * the largest are dropped (the pseudo-inverse
    of the symmetric C, or of the K x K Gram of the centred background
    when K <= B, through its eigendecomposition). On the shared
    scenes the kept eigenvalues of local covariances reach down to about
    1e-8 of the largest and the rank-deficiency zeros come out near 1e-16
    (float64 rounding of the product); 1e-10 sits in that gap, 4 orders
    above rounding, and below it lie directions whose spread is under the
    16-bit quantisation of the data. NumPy's default (1e-15) would keep
    rounding noise and give scores of 1e15. No diagonal loading: it would
    change the scores of every pixel, not only the degenerate ones.

    Args:
      cube: (H, W, B) or (N, H, W, B), any real dtype.
      inner, outer: odd window sizes, inner < outer <= min(H, W).
      rtol: pseudo-inverse cutoff, relative to the largest singular value.
      chunk: pixels processed at once. A 512 x 512 x 200 image needs about
        0.9 GB (XLA's estimate; mostly the float64 padded image).

    Time: the per-pixel K x K eigendecomposition of the pseudo-inverse
    dominates.

    Returns:
      float64 scores, (H, W) or (N, H, W).
    """
    batch, single = as_batch(cube)
    inner, outer = _check_windows(inner, outer, np.shape(batch)[1:3], "lrx")
    chunk = _check_chunk(chunk, "lrx")
    if not (np.isfinite(rtol) and 0 < rtol < 1):
        raise InputError(f"lrx: rtol must be in (0, 1), got {rtol!r}")
    with jax.enable_x64(True), _one_blas_thread():
        out = _lrx_batch(_on_device(batch), float(rtol), inner, outer, chunk)
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


def _crd_residual(a_mat, reg, v, yy):
    """CRD residuals |y - X a| of a group of pixels from Gram quantities.

    a_mat = X'X + diag(reg) (P, K, K) is the regularised system, v = X'y
    (P, K), yy = y'y (P,).

    One Cholesky factorisation of the bordered system [[A, v], [v', 2 y'y]]
    gives A = L L' and, in its last row, z = L^-1 v (the forward sweep,
    done by LAPACK for one more row); then a = L'^-1 z. As A a = v,
    |y - X a|^2 = y'y - 2 a'v + a'(A - diag(reg)) a = y'y - |z|^2 - a' diag(reg) a,
    with a'v = |z|^2 from the factorisation itself. (2 y'y keeps the last
    pivot positive: v'A^-1 v <= |y|^2 for any positive reg.)
    """
    k = a_mat.shape[-1]
    border = jnp.concatenate([v, 2 * yy[:, None]], axis=1)
    bordered = jnp.concatenate(
        [jnp.concatenate([a_mat, v[:, :, None]], axis=2), border[:, None, :]], axis=1)
    chol = jax.lax.linalg.cholesky(bordered, symmetrize_input=False)
    z = chol[:, k, :k]
    a = _back_substitute(chol[:, :k, :k], z)

    def factored(a_mat, v):
        return yy - jnp.sum(z * z, -1) - jnp.sum(reg * a * a, -1)

    def fallback(a_mat, v):
        # Should the ridge not suffice (Cholesky fails: NaN; also y = 0),
        # the group is redone with the minimum-norm least-squares solution,
        # and its residual y'y - 2 a'v + a'X'Xa (exact for any a).
        eps = jnp.finfo(a_mat.dtype).eps
        a = jnp.einsum("pkl,pl->pk", pinv(a_mat, k * eps), v, precision=_HIGHEST)
        quad = jnp.sum(jnp.sum(a_mat * a[:, None, :], -1) * a - reg * a * a, -1)
        return yy - 2 * jnp.sum(a * v, -1) + quad

    squared = jax.lax.cond(jnp.all(jnp.isfinite(a)), factored, fallback, a_mat, v)
    return jnp.sqrt(jnp.maximum(squared, 0))


def _crd_tiles(win, lam, inner, outer, tile):
    """CRD scores (T, P, P) of T tiles of P x P pixels from their windows.

    win (T, S, S, B), S = P + outer - 1, holds all pixels any window of the
    tile touches. One Gram of those S^2 pixels per tile (a large, efficient
    product) holds every pixel's X'X, X'y and y'y, taken out with static
    indices. For (3, 11) and 8 x 8 tiles this is 8x fewer flops than a Gram
    per pixel, leaving the K x K Cholesky as the main cost.
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
    # lam |y - x_i|^2 on the diagonal, and a guard: exactly repeated pixels
    # (mirrored at borders, flat regions) with y equal to one of them make
    # X'X + lam G'G singular. A ridge of eps * trace(X'X) lifts it above the
    # float64 rounding of the Gram (~K eps |X'X|) and is ~1e-5 of the
    # lam G'G term on real data, so it does not move the scores.
    ridge = jnp.finfo(union.dtype).eps * jnp.sum(x_sq, -1, keepdims=True)
    reg = lam * jnp.maximum(yy[..., None] - 2 * v + x_sq, 0) + ridge
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
        a_mat = gram + reg_g[:, :, None] * jnp.eye(k, dtype=union.dtype)
        return _crd_residual(a_mat, reg_g, v_g, at(yy[tile_i]))

    out = jax.lax.map(solve, jnp.arange(t * per_tile))
    return out.reshape(t, tile, tile)


@functools.partial(jax.jit, static_argnames=("inner", "outer", "chunk"))
def _crd_batch(cubes, lam, inner, outer, chunk):
    n, h, w, b = cubes.shape
    r = outer // 2
    tile = min(_CRD_TILE, outer - 1)  # (tile + 2r)^4 / tile^2 is least at 2r
    ny, nx = -(-h // tile), -(-w // tile)
    x = _prepare_local(cubes, r)
    # Tiles overhanging the bottom/right edge see edge copies; their extra
    # pixels are computed and cropped.
    x = jnp.pad(x, ((0, 0), (0, ny * tile - h), (0, nx * tile - w), (0, 0)),
                mode="edge")
    s = tile + 2 * r
    # (image, row, column, band) of each tile's window corner.
    corners = np.stack(np.meshgrid(np.arange(n), np.arange(ny) * tile,
                                   np.arange(nx) * tile, [0], indexing="ij"), -1)

    def step(starts):
        win = jax.vmap(lambda c: jax.lax.dynamic_slice(x, c, (1, s, s, b))[0])(starts)
        return _crd_tiles(win, lam, inner, outer, tile)

    out = _chunked(step, jnp.asarray(corners.reshape(-1, 4), jnp.int32),
                   max(1, chunk // tile ** 2))
    out = out.reshape(n, ny, nx, tile, tile).transpose(0, 1, 3, 2, 4)
    return out.reshape(n, ny * tile, nx * tile)[:, :h, :w]


def crd(cube, inner: int = 3, outer: int = 11, lam: float = 1e-6,
        chunk: int = _CRD_CHUNK):
    """Collaborative Representation Detector (Li and Du, IEEE TGRS 2015).

    Each pixel y is represented by its K = outer^2 - inner^2 background
    pixels X (B x K, the dual window as in `lrx`) with weights
    a = (X'X + lam G'G)^-1 X'y, G = diag(|y - x_i|), so pixels far from y
    are penalised; the score is the residual |y - X a|. Images are min-max
    scaled to [0, 1] first and reflect-padded, as in `lrx` (a and the score
    do not depend on the scale, lam G'G scales with X'X; the shift matters).

    Precision: float64. X'X of neighbouring spectra is ill-conditioned
    (about 1e8, 1e10 with the mirrored duplicates at borders, where only
    lam G'G keeps it invertible), beyond float32. The K x K system is
    solved by Cholesky after a ridge of eps * trace(X'X) (see
    `_crd_tiles`); a chunk whose factorisation still fails is solved with
    the pseudo-inverse instead. The residual comes from Gram quantities
    (y'y - |L^-1 X'y|^2 - a' diag(reg) a, see `_crd_residual`), so it is
    exact to a few sqrt(eps * y'y) (3e-8 for unit spectra; up to 1.1e-7
    seen on 200-band scenes): scores below that, such as pixels that recur
    in their own background, read as 0 or noise at that level. Elsewhere
    it agrees with the per-pixel solve to ~1e-9.

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

    Returns:
      float64 residual norms, (H, W) or (N, H, W).
    """
    batch, single = as_batch(cube)
    inner, outer = _check_windows(inner, outer, np.shape(batch)[1:3], "crd")
    chunk = _check_chunk(chunk, "crd")
    if not (np.isfinite(lam) and lam >= 0):
        raise InputError(f"crd: lam must be finite and >= 0, got {lam!r}")
    with jax.enable_x64(True), _one_blas_thread():
        out = _crd_batch(_on_device(batch), float(lam), inner, outer, chunk)
        out = jax.block_until_ready(out)  # the LAPACK calls run in the limit
    return out[0] if single else out
