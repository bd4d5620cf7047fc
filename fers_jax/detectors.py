"""Training-free anomaly detectors in jnp: RX, and the fusion of maps.

Every detector takes one cube (H, W, B) or a batch of cubes (N, H, W, B) of
one size and returns maps (H, W) or (N, H, W); a batch is one vmapped,
jit-compiled call. Each image is treated alone (its own min-max, mean and
covariance).

Precision. The covariance of real scenes is near singular, so the numbers
depend on the arithmetic. Two paths reproduce the two RX forms of the
reference (SPEC.md section 6):

* "float64" (default): the reference's NumPy RX. Covariance, pseudo-inverse
  and quadratic form in float64, singular values below 1e-15 * the largest
  dropped (NumPy's pinv). It agrees with the reference to ~4e-6 in AUC;
  float32 here would move AUCs by up to 0.19.
* "float32": the reference's batched torch RX, used by its 50-band FERS
  product fusion: float32 throughout, torch.linalg.pinv's default cutoff
  (B * float32 eps * the largest singular value).
"""

import functools
from typing import Sequence

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


def minmax(x, axes=None):
    """Scales x to [0, 1] over `axes` (all by default); a constant x gives 0."""
    lo = jnp.min(x, axis=axes, keepdims=True)
    span = jnp.max(x, axis=axes, keepdims=True) - lo
    return (x - lo) / jnp.where(span > 0, span, 1)


def pinv(a, rtol):
    """Moore-Penrose pseudo-inverse through the SVD, as NumPy and torch do it.

    Singular values at or below `rtol` * the largest are dropped. A symmetric
    eigensolver would be faster, but which tiny values survive the cutoff
    decides the AUC on near-singular scenes, so the reference's SVD is kept.
    """
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    keep = s > rtol * s[..., :1]
    s_inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return jnp.matmul(vt.swapaxes(-1, -2) * s_inv[..., None, :],
                      u.swapaxes(-1, -2), precision=_HIGHEST)


def _dtype_and_rtol(precision, bands):
    if precision == "float64":
        return jnp.float64, 1e-15
    if precision == "float32":
        return jnp.float32, bands * float(np.finfo(np.float32).eps)
    raise InputError(f"RX precision must be one of {PRECISIONS}, got {precision!r}")


def _rx_image(cube, precision):
    """RX of one (H, W, B) cube: squared Mahalanobis distance to the global mean."""
    h, w, b = cube.shape
    dtype, rtol = _dtype_and_rtol(precision, b)
    x = minmax(cube.astype(dtype)).reshape(h * w, b)
    xc = x - x.mean(axis=0)
    cov = jnp.matmul(xc.T, xc, precision=_HIGHEST) / (h * w - 1)
    quad = jnp.matmul(xc, pinv(cov, rtol), precision=_HIGHEST) * xc
    return quad.sum(axis=-1).reshape(h, w)


@functools.partial(jax.jit, static_argnames=("precision",))
def _rx_batch(cubes, precision):
    return jax.vmap(functools.partial(_rx_image, precision=precision))(cubes)


def rx(cube, precision: str = "float64"):
    """The RX detector of the reference, per image.

    Args:
      cube: (H, W, B) or (N, H, W, B), any real dtype.
      precision: "float64" (the reference's NumPy RX) or "float32" (its
        batched torch RX); see the module docstring.

    Returns:
      RX scores, (H, W) or (N, H, W), in the dtype of `precision`.
    """
    batch, single = as_batch(cube)
    _dtype_and_rtol(precision, 1)
    with jax.enable_x64(precision == "float64"):
        out = _rx_batch(jnp.asarray(batch), precision)
    return out[0] if single else out


def fuse(maps: Sequence, mode: str = "sum"):
    """Fuses detection maps of one scene (or batch of scenes).

    "sum" adds them as they are; "product" multiplies them after min-max
    scaling each to [0, 1] per image (the reference's 50-band FERS map).
    """
    if not maps:
        raise InputError("fuse needs at least one map")
    if mode == "sum":
        return functools.reduce(jnp.add, maps)
    if mode == "product":
        scaled = [minmax(m, axes=(-2, -1)) for m in maps]
        return functools.reduce(jnp.multiply, scaled)
    raise InputError(f"fusion must be 'sum' or 'product', got {mode!r}")
