"""Training losses of FERD stage 1 and FERS stage 2 (SPEC sections 4 and 5).

Every loss is a pure jnp function of NHWC arrays, (N, H, W, C), returning a
scalar, so it can sit inside a jitted, differentiated `loss_fn`. Values and
gradients follow the PyTorch reference (checked against
../shared/reference/golden by tests/test_losses.py).

Stage 2, the rebellious student:
    total = cross_covariance(spe_f, spa_f) + 0.1 cosine(spe_f, spa_f)
            + 0.1 variance_preserving(spa_f) + mse(recon, x)
            + 0.01 ssim_loss(recon, x)
Stage 1, reverse distillation:
    total = 0.1 bce + 0.1 mse(x, recon) + 1.0 distillation_cosine(enc, dec)
"""

from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fers_jax.detectors import minmax
from fers_jax.errors import InputError

# torch.nn.functional.cosine_similarity's default.
COSINE_EPS = 1e-8
# Added to the unbiased std before dividing, as the reference does.
STANDARDISE_EPS = 1e-6


def _check_same_shape(a, b, what):
    if a.shape != b.shape:
        raise InputError(
            f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _cosine_similarity(a, b, axis):
    """PyTorch `cosine_similarity` along `axis`.

    Torch clamps each norm separately, a/max(|a|, eps) . b/max(|b|, eps),
    not the product of the norms. Taking the square root of the clamped
    squared norm gives the same value and keeps the gradient finite for an
    all-zero vector (where torch's gradient equals ours); only for norms
    strictly between 0 and eps do the gradients differ.
    """
    def unit(v):
        sq = jnp.sum(v * v, axis=axis, keepdims=True)
        return v / jnp.sqrt(jnp.maximum(sq, COSINE_EPS ** 2))
    return jnp.sum(unit(a) * unit(b), axis=axis)


def mse(a, b):
    """Mean squared error over all elements."""
    _check_same_shape(a, b, "mse")
    return jnp.mean(jnp.square(a - b))


# --- Stage 2 ---------------------------------------------------------------

def _standardise_channels(x):
    """(N, H, W, C) -> (N*H*W, C), each channel at mean 0 and std ~1.

    Mean and unbiased std are taken over batch and pixels together, and
    STANDARDISE_EPS is added to the std (not the variance), as in the
    reference.
    """
    flat = x.reshape(-1, x.shape[-1])
    centred = flat - jnp.mean(flat, axis=0)
    # torch's std backward is 0 where the std is 0 (a dead, all-zero ReLU
    # channel); jnp.std's is NaN there, which would end training.
    var = jnp.var(flat, axis=0, ddof=1)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    return centred / (std + STANDARDISE_EPS)


def cross_covariance(a, b):
    """Decorrelation (orthogonality) loss between two feature maps.

    Args:
        a: (N, H, W, Ca), e.g. the teacher's spe_f.
        b: (N, H, W, Cb), e.g. the student's spa_f.

    Returns:
        Sum of squares of the (Ca, Cb) cross-covariance matrix of the
        channel-standardised maps, normalised by N*H*W.
    """
    if a.shape[:-1] != b.shape[:-1]:
        raise InputError(
            "cross_covariance: batch and pixel dimensions differ, "
            f"{tuple(a.shape)} vs {tuple(b.shape)}")
    sa, sb = _standardise_channels(a), _standardise_channels(b)
    # HIGHEST: on GPUs the default f32 matmul may run in TF32, which is
    # ~1e-3 off the reference; the matrix is tiny, so precision is free.
    cov = jnp.einsum("pi,pj->ij", sa, sb,
                     precision=jax.lax.Precision.HIGHEST) / sa.shape[0]
    return jnp.sum(jnp.square(cov))


def cosine(spe_f, spa_f):
    """1 + mean over pixels of the cosine similarity along channels.

    Minimising it pushes the student's features to point away from the
    teacher's, pixel by pixel (0 when opposite, 2 when aligned).
    """
    _check_same_shape(spe_f, spa_f, "cosine")
    return 1.0 + jnp.mean(_cosine_similarity(spe_f, spa_f, axis=-1))


def _variance_parts(spa_f):
    """(hinge, l1) of the variance-preserving term (see variance_preserving)."""
    n, h, w, c = spa_f.shape
    var = jnp.var(spa_f.reshape(n, h * w, c), axis=1, ddof=1)
    hinge = jnp.mean(jax.nn.relu(1.0 - jnp.mean(var, axis=0)))
    return hinge, jnp.mean(jnp.abs(spa_f))


def variance_preserving(spa_f):
    """Keeps the student's features alive and sparse.

    mean(relu(1 - var)) + mean(|spa_f|), where var is the unbiased variance
    over pixels per sample and channel, averaged over the batch: the hinge
    stops the decorrelation loss from being met by collapsing channels to a
    constant, and the L1 term keeps magnitudes small.
    """
    hinge, l1 = _variance_parts(spa_f)
    return hinge + l1


def _gaussian_window(size, sigma):
    """Normalised 1-D Gaussian window centred on size // 2 (kornia's)."""
    t = np.arange(size, dtype=np.float64) - size // 2
    if size % 2 == 0:
        t += 0.5
    g = np.exp(-t ** 2 / (2.0 * sigma ** 2))
    return g / g.sum()


def _reflect_filter_matrix(n: int, window) -> np.ndarray:
    """(n, n) weights of a 'same'-size 1-D filter with reflect borders
    (without repeating the edge pixel, torch's 'reflect'), as kornia's
    filter2d pads: row o holds the taps of output o, folded back at the
    edges."""
    k = len(window)
    lo = (k - 1) // 2
    m = np.zeros((n, n), np.float64)
    for o in range(n):
        for i, w in enumerate(window):
            j = abs(o + i - lo)
            m[o, j if j < n else 2 * (n - 1) - j] += w
    return m.astype(np.float32)


def _gaussian_filter(x, window):
    """Separable depthwise filter of (N, H, W, C) over H and W, reflect
    borders and a 'same'-size output, as kornia's filter2d; the result is
    channel-major, (N, C, H, W).

    As two small matrices contracted with the maps (one einsum: XLA picks
    the order), not as shifted slices: on CPU the SSIM loss's forward +
    backward took 314 ms so and takes ~60 ms this way at 16 x 32 x 32 x 100
    (the same values to float32 rounding). HIGHEST: exact float32 sums on
    every backend. Channel-major out because that is the order the
    contraction produces on CPU: asked for NHWC, the elementwise SSIM
    fusions downstream read their inputs through a transpose (84 against
    60 ms for the loss's forward + backward; 20 ms of a 0.76 s step).
    """
    _, h, w, _ = x.shape
    return jnp.einsum("oh,pw,nhwc->ncop", _reflect_filter_matrix(h, window),
                      _reflect_filter_matrix(w, window), x,
                      precision=jax.lax.Precision.HIGHEST)


def ssim(a, b, window_size=5, sigma=1.5, max_val=1.0, eps=1e-12):
    """Per-pixel, per-channel SSIM map of two (N, H, W, C) images (kornia)."""
    return jnp.moveaxis(_ssim_channel_major(a, b, window_size, sigma, max_val,
                                            eps), 1, -1)


def _ssim_channel_major(a, b, window_size=5, sigma=1.5, max_val=1.0, eps=1e-12):
    """ssim's map as (N, C, H, W), the filter's order (for means)."""
    _check_same_shape(a, b, "ssim")
    if min(a.shape[1:3]) <= window_size // 2:
        raise InputError(
            f"ssim: image {a.shape[1]}x{a.shape[2]} too small for the "
            f"reflect padding of window {window_size}")
    window = _gaussian_window(window_size, sigma)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    # Each map filtered on its own: concatenating the five and splitting
    # the result cost more (copies, forward and backward) than the filter.
    mu_a, mu_b, e_aa, e_bb, e_ab = (_gaussian_filter(m, window)
                                    for m in (a, b, a * a, b * b, a * b))
    var_a = e_aa - mu_a ** 2
    var_b = e_bb - mu_b ** 2
    cov_ab = e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return num / (den + eps)


def ssim_loss(a, b, window_size=5, max_val=1.0):
    """kornia SSIMLoss: mean(clamp((1 - ssim) / 2, 0, 1))."""
    s = _ssim_channel_major(a, b, window_size=window_size, max_val=max_val)
    return jnp.mean(jnp.clip((1.0 - s) / 2.0, 0.0, 1.0))


def patch_rx(z, ridge=1e-6):
    """Differentiable RX of each image of z (N, H, W, B): squared Mahalanobis
    distances to the image's mean (N, H * W), with a ridge of
    `ridge` * mean eigenvalue in place of the pseudo-inverse's cutoff."""
    n, h, w, b = z.shape
    c = z.reshape(n, h * w, b)
    c = c - c.mean(1, keepdims=True)
    cov = jnp.einsum("npi,npj->nij", c, c) / (h * w - 1)
    cov = cov + ridge * jnp.trace(cov, axis1=1, axis2=2)[:, None, None] / b \
        * jnp.eye(b, dtype=z.dtype)
    solved = jnp.linalg.solve(cov, jnp.swapaxes(c, 1, 2))  # (N, B, P)
    return jnp.einsum("npb,nbp->np", c, solved)


def false_alarm(x, spe_f, spa_f, fusion: str, top: float = 0.01):
    """How peaked the FERS map is on anomaly-free images (not the
    reference's; an ablation for issue 10): per image, the mean of its
    highest `top` share of map values over the map's mean, averaged over
    the batch. On background every peak is a false alarm; a flat map gives
    1. The map is the detection's (sum: RX(x + spe_f + spa_f); product:
    the min-max scaled RX(x + spa_f) times RX(x + spe_f), the second
    without gradient), each image's RX on its own pixels."""
    if fusion == "sum":
        score = patch_rx(x + spe_f + spa_f)
    else:
        score = minmax(patch_rx(x + spa_f), 1) * jax.lax.stop_gradient(
            minmax(patch_rx(x + spe_f), 1))
    k = max(1, int(round(top * score.shape[1])))
    peaks = jax.lax.top_k(score, k)[0].mean(1)
    return jnp.mean(peaks / (score.mean(1) + 1e-12))


class Stage2Weights(NamedTuple):
    """Weights of the stage-2 terms; the defaults are the reference's.

    `l1` weighs the L1 part of the variance term on its own (an ablation,
    issue 10: the L1 push is what shrinks spa_f); None: `var` weighs the
    whole term, hinge and L1, as the reference does. `fa` weighs
    `false_alarm` (not the reference's; 0: not computed).
    """
    cc: float = 1.0
    cos: float = 0.1
    var: float = 0.1
    mse: float = 1.0
    ssim: float = 0.01
    l1: Optional[float] = None
    fa: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Stage2Weights":
        """From 'name=value,...' (any subset of the fields; the rest default)."""
        fields = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in cls._fields:
                raise InputError(f"--loss-weights: {item!r} is not NAME=VALUE "
                                 f"with NAME one of {', '.join(cls._fields)}")
            try:
                fields[name] = float(value)
            except ValueError:
                raise InputError(f"--loss-weights: {name}={value!r} is not a "
                                 f"number") from None
            if not fields[name] >= 0:
                raise InputError(f"--loss-weights: {name} must be >= 0, got "
                                 f"{value}")
        return cls(**fields)


def stage2_loss(spe_f, spa_f, recon, x, weights=Stage2Weights(),
                fusion: str = "sum"):
    """FERS stage-2 loss.

    Args:
        spe_f: (N, H, W, B) frozen teacher features.
        spa_f: (N, H, W, B) student features.
        recon: (N, H, W, B) restoration net output, FRN(spa_f + spe_f).
        x: (N, H, W, B) input cube.
        weights: a Stage2Weights.
        fusion: the detection map's ("sum" or "product"), for `fa` only.

    Returns:
        (total, terms): the weighted sum and a dict of the unweighted terms
        "cc", "cos", "var", "mse", "ssim", "l1" (the L1 part of "var"), and
        "fa" where its weight is not 0.
    """
    hinge, l1 = _variance_parts(spa_f)
    terms = {
        "cc": cross_covariance(spe_f, spa_f),
        "cos": cosine(spe_f, spa_f),
        "var": hinge + l1,
        "mse": mse(recon, x),
        "ssim": ssim_loss(recon, x),
    }
    if weights.fa:
        terms["fa"] = false_alarm(x, spe_f, spa_f, fusion)
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    if weights.l1 is not None:  # the L1 part weighed on its own
        total = total + (weights.l1 - weights.var) * l1
    return total, {**terms, "l1": l1}


# --- Stage 1 ---------------------------------------------------------------

def distillation_cosine(enc_feats: Sequence, dec_feats: Sequence):
    """Reverse-distillation loss: sum over levels of mean_n(1 - cos).

    Each map is flattened per sample before the cosine, so a level counts
    as one vector per sample. NHWC vs NCHW does not matter: both maps of a
    pair are flattened in the same order.
    """
    if len(enc_feats) != len(dec_feats):
        raise InputError(
            f"distillation_cosine: {len(enc_feats)} encoder levels vs "
            f"{len(dec_feats)} decoder levels")
    total = 0.0
    for e, d in zip(enc_feats, dec_feats):
        _check_same_shape(e, d, "distillation_cosine")
        cos = _cosine_similarity(e.reshape(e.shape[0], -1),
                                 d.reshape(d.shape[0], -1), axis=1)
        total = total + jnp.mean(1.0 - cos)
    return total


def bce_with_logits(logits, target=0.0):
    """Mean binary cross-entropy of sigmoid(logits) against `target`.

    The numerically stable form of torch's BCEWithLogitsLoss:
    max(z, 0) - z t + log(1 + exp(-|z|)).
    """
    z = logits
    return jnp.mean(
        jax.nn.relu(z) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z))))


class Stage1Weights(NamedTuple):
    """Weights of the stage-1 terms; the defaults are the reference's."""
    bce: float = 0.1
    mse: float = 0.1
    cos: float = 1.0


def stage1_loss(outputs: Mapping, x, weights=Stage1Weights(),
                bce_on_logits=False):
    """FERD stage-1 loss.

    Args:
        outputs: the stage-1 forward's dict: "enc_f1".."enc_f3" and
            "dec_f1".."dec_f3" (pairs of equal shape), "recon" (N, H, W, B),
            "prob" (N, H, W, 1) the classifier's sigmoid output (0 when the
            branch is off) and, if bce_on_logits, "logits" before the sigmoid.
        x: (N, H, W, B) input cube.
        weights: a Stage1Weights.
        bce_on_logits: False (default) reproduces the reference, which feeds
            the already-sigmoided "prob" to BCE-with-logits against 0. That
            is softplus(sigmoid(z)): it still pushes z down, only weakly
            and with a floor of log 2, and the published teachers were
            trained with it, so it stays the default for reproduction.
            True applies BCE to "logits", the textbook form.

    Returns:
        (total, terms) with unweighted terms "bce", "mse", "cos".
    """
    levels = ("f1", "f2", "f3")
    if bce_on_logits:
        if "logits" not in outputs:
            raise InputError(
                "stage1_loss: bce_on_logits=True needs outputs['logits']")
        bce_input = outputs["logits"]
    else:
        bce_input = outputs["prob"]
    terms = {
        "bce": bce_with_logits(bce_input, 0.0),
        "mse": mse(x, outputs["recon"]),
        "cos": distillation_cosine([outputs["enc_" + l] for l in levels],
                                   [outputs["dec_" + l] for l in levels]),
    }
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, terms
