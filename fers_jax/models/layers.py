"""Building blocks shared by the teacher, the student and the stage-1 graph.

Everything is NHWC. Module and parameter names follow the PyTorch reference
where that keeps the weight conversion (fers_jax.convert) mechanical:
`conv1`, `bn1`, ..., `downsample_conv` for `downsample.0`, and so on.

PyTorch-compatibility notes that the code relies on:
- Padding is explicit: flax's 'SAME' pads stride-2 convs as (0, 1) where
  PyTorch pads (1, 1).
- `BatchNorm` is PyTorch's: it normalises with the biased batch variance but
  updates the running variance with the unbiased one (flax's nn.BatchNorm
  uses the biased one for both, which drifts from the reference in the
  student's running statistics).
- The decoder's 2x2 stride-2 transposed convs (`Deconv2x2`) keep the
  variables of flax's ConvTranspose with transpose_kernel=True; a PyTorch
  weight (in, out, kh, kw) then maps to the flax kernel (kh, kw, out, in)
  by the same permute(2, 3, 1, 0) as a regular conv's OIHW -> HWIO.
"""

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# --- Initialisers -----------------------------------------------------------

def symmetric_uniform(limit: float):
    """uniform(-limit, limit), as torch.nn.init.uniform_(w, -limit, limit)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init


def torch_bias_init(fan_in: int):
    """PyTorch's default conv bias init: uniform(+-1/sqrt(fan_in))."""
    return symmetric_uniform(1.0 / math.sqrt(fan_in))


# PyTorch's default conv weight init, kaiming_uniform(a=sqrt(5)), is
# uniform(+-1/sqrt(fan_in)); with transpose_kernel=True the flax kernel is
# (kh, kw, out, in) and PyTorch's fan_in of a transposed conv counts `out`,
# which is the default in_axis=-2 here too.
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's ResNet (and RD4AD's OCBE / decoder): kaiming_normal_,
# mode='fan_out'; jax's "normal" is the untruncated one.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# SPEC 3.4: Conv2RGB, LightSPP and the restoration net.
spec_uniform = symmetric_uniform(0.1)


# --- Convolutions -----------------------------------------------------------
#
# Every conv below is a flax nn.Conv (same variables `kernel` (kh, kw, in,
# out) and `bias`, same init and dtype promotion, so converted weights and
# checkpoints are unaffected) whose convolution primitive is `conv2d`, which
# is faster to differentiate on CPU than lax.conv_general_dilated:
#
# - 1x1 convs are matmuls over the channel axis (strides subsample first).
#   XLA:CPU computes a 1x1 conv's weight gradient as a convolution with an
#   H x W window at 2-6 GFLOP/s; as the dot it is, ~10x faster, and the
#   forward and input gradient are no slower (on accelerators XLA turns
#   1x1 convs into the same matmuls anyway). Same values to float32
#   rounding (the teacher's features come out bit-identical on CPU).
# - Larger kernels with small outputs (up to SMALL_CONV_PIXELS a map: the
#   student's trunk on training patches) are one im2col matmul, forward and
#   both gradients by autodiff: XLA:CPU's convolution is ~17x slower there.
# - Other larger kernels keep lax.conv_general_dilated for the forward and the
#   input gradient (fast everywhere), with a custom VJP whose weight
#   gradient on CPU is an im2col matmul over blocks of output rows: 3-7x
#   faster than XLA:CPU's weight-gradient conv for the FRN's 3x3 100 -> 100
#   convs at 16 x 64 x 64 (the bulk of the stage-2 backward), and ~10x
#   closer to a float64 result. Other backends keep XLA's own weight
#   gradient (lax.platform_dependent picks the branch when lowering).
#   Forward-mode differentiation (jax.jvp) of these convs is not supported
#   (custom_vjp; nothing here uses it).
# Frozen kernels cost nothing extra: a weight gradient nobody asks for is
# dead code that XLA removes, as before.

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax's NHWC / HWIO specs
# Output pixels per image up to which a kxk conv is one im2col matmul
# (forward and both gradients by autodiff): XLA:CPU's convolution took
# 11.2 ms for ResNet-34 layer3's 3x3 256->256 at 16 x 2 x 2 (the student's
# trunk on 32x32 training patches) against 0.67 ms so, its input gradient
# 11.5 against 0.5 ms; im2col was level or faster up to 8 x 8 outputs, and
# slower from 16 x 16 (2.9 against 4.7 ms at 16 x 16 x 64 -> 64).
SMALL_CONV_PIXELS = 64
# Bytes of im2col patches per block of the CPU weight gradient: 4 MB was
# the best or within 10% of it for every shape measured (1-8 MB, the FRN's
# 16x32x32x100 and 16x64x64x100, stage 1's 128-512-channel 3x3 convs);
# 16 MB took 1.9x as long at 16x32x32x100 (stage 2's training patches).
KERNEL_GRAD_BLOCK_BYTES = 4 << 20


def _lax_conv(x, kernel, strides, padding, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision)


def _im2col(x, kernel_hw, strides, padding, out_hw):
    """(N, Ho, Wo, kh * kw * C) patches of x, (i, j, c) order as HWIO."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    return jnp.concatenate(
        [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)


def _kernel_grad_im2col(x, g, kernel_shape, strides, padding, precision):
    """d(conv)/d(kernel) . g as im2col matmuls, over blocks of output rows."""
    kh, kw, c, o = kernel_shape
    sh, sw = strides
    n, ho, wo = g.shape[:3]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    acc_dtype = jnp.promote_types(xp.dtype, jnp.float32)
    per_row = n * wo * kh * kw * c * jnp.dtype(x.dtype).itemsize
    rows = int(max(1, min(ho, KERNEL_GRAD_BLOCK_BYTES // per_row)))
    blocks = -(-ho // rows)
    span = (rows - 1) * sh + kh
    # Zero rows of g contribute nothing; xp gets the rows the last block reads.
    g = jnp.pad(g, ((0, 0), (0, blocks * rows - ho), (0, 0), (0, 0)))
    extra = max(0, (blocks * rows - 1) * sh + kh - xp.shape[1])
    xp = jnp.pad(xp, ((0, 0), (0, extra), (0, 0), (0, 0)))

    def block(b):
        xb = jax.lax.dynamic_slice_in_dim(xp, b * rows * sh, span, axis=1)
        gb = jax.lax.dynamic_slice_in_dim(g, b * rows, rows, axis=1)
        cols = _im2col(xb, (kh, kw), strides, ((0, 0), (0, 0)), (rows, wo))
        return jax.lax.dot_general(
            cols.reshape(-1, kh * kw * c), gb.reshape(-1, o),
            (((0,), (0,)), ((), ())), precision=precision,
            preferred_element_type=acc_dtype)

    if blocks == 1:
        dk = block(0)
    else:
        dk, _ = jax.lax.scan(lambda acc, b: (acc + block(b), None),
                             jnp.zeros((kh * kw * c, o), acc_dtype),
                             jnp.arange(blocks))
    return dk.reshape(kernel_shape)


def _conv_im2col(x, kernel, strides, padding, precision):
    """A kxk conv as one matmul over im2col patches (autodiff for both
    gradients): for small outputs, where XLA:CPU's convolution is slow."""
    kh, kw, c, o = kernel.shape
    out_hw = [(x.shape[1 + a] + sum(padding[a]) - kernel.shape[a]) // strides[a] + 1
              for a in (0, 1)]
    cols = _im2col(x, (kh, kw), strides, padding, out_hw)
    return jax.lax.dot_general(cols, kernel.reshape(kh * kw * c, o),
                               (((3,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_kxk(x, kernel, strides, padding, precision):
    return _lax_conv(x, kernel, strides, padding, precision)


def _conv_kxk_fwd(x, kernel, strides, padding, precision):
    return _lax_conv(x, kernel, strides, padding, precision), (x, kernel)


def _conv_kxk_bwd(strides, padding, precision, residuals, g):
    x, kernel = residuals
    conv = functools.partial(_lax_conv, strides=strides, padding=padding,
                             precision=precision)
    (dx,) = jax.linear_transpose(lambda x: conv(x, kernel), x)(g)

    def xla_grad(x, g):
        return jax.linear_transpose(lambda k: conv(x, k), kernel)(g)[0]

    def cpu_grad(x, g):
        return _kernel_grad_im2col(x, g, kernel.shape, strides, padding,
                                   precision).astype(kernel.dtype)

    dk = jax.lax.platform_dependent(x, g, cpu=cpu_grad, default=xla_grad)
    return dx, dk


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def conv2d(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           precision=None, **kwargs):
    """lax.conv_general_dilated's signature (nn.Conv's `conv_general_dilated`
    hook); NHWC x HWIO convs without dilation or groups take the fast paths
    described above, anything else is passed through to lax."""
    if (lhs.ndim != 4 or kwargs or feature_group_count != 1
            or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
            or tuple(map(tuple, jax.lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, dimension_numbers))) != _NHWC):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, precision=precision,
            **kwargs)
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                          strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
        x = lhs[:, ::strides[0], ::strides[1], :]
        return jax.lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())),
                                   precision=precision)
    out_hw = [(lhs.shape[1 + a] + sum(padding[a]) - rhs.shape[a]) // strides[a] + 1
              for a in (0, 1)]
    if out_hw[0] * out_hw[1] <= SMALL_CONV_PIXELS:
        return _conv_im2col(lhs, rhs, strides, padding, precision)
    return _conv_kxk(lhs, rhs, strides, padding, precision)


def _conv(kernel: int, padding: int, features: int, strides: int = 1,
          use_bias: bool = False, kernel_init=kaiming_fan_out, **kwargs):
    return nn.Conv(features, (kernel, kernel), strides=strides,
                   padding=((padding, padding), (padding, padding)),
                   use_bias=use_bias, kernel_init=kernel_init,
                   conv_general_dilated=conv2d, **kwargs)


conv1x1 = functools.partial(_conv, 1, 0)
conv3x3 = functools.partial(_conv, 3, 1)
conv7x7 = functools.partial(_conv, 7, 3)


class Deconv2x2(nn.Module):
    """PyTorch ConvTranspose2d(kernel_size=2, stride=2, bias=False): 2x size.

    The variables, init and values of flax's nn.ConvTranspose(features,
    (2, 2), strides=(2, 2), transpose_kernel=True): `kernel` (2, 2,
    features, in). Computed as what it is: with kernel = stride each output
    pixel (2i + a, 2j + b) sees input pixel (i, j) alone, through tap
    (a, b), so the transposed conv is one matmul over channels and a
    depth-to-space. The same numbers to float32 rounding (the sums over
    channels in another order); its gradients are matmuls too, where XLA:CPU's transposed-conv kernel gradient ran
    4-21x slower than PyTorch's (benchmarks/results/train_stage1_ops_vm.json).
    """
    features: int
    kernel_init: Callable = torch_default_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init,
                            (2, 2, self.features, x.shape[-1]), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        n, h, w, _ = x.shape
        y = jnp.einsum("nijc,aboc->niajbo", x, kernel, precision=self.precision)
        return y.reshape(n, 2 * h, 2 * w, self.features)


def deconv2x2(features: int, **kwargs) -> Deconv2x2:
    return Deconv2x2(features, **kwargs)


def biased_conv1x1(features: int, in_features: int, kernel_init=torch_default_init,
                   **kwargs):
    """A 1x1 conv with bias, both initialised the PyTorch way by default."""
    return nn.Conv(features, (1, 1), padding="VALID", use_bias=True,
                   kernel_init=kernel_init,
                   bias_init=torch_bias_init(in_features),
                   conv_general_dilated=conv2d, **kwargs)


def reflect_pad(x, pad: int):
    """F.pad(x, (pad,) * 4, mode='reflect') on the H and W axes."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def crop(x, pad: int):
    """Removes `pad` pixels from every side of H and W."""
    return x[:, pad:x.shape[1] - pad, pad:x.shape[2] - pad, :]


def max_pool3x3(x):
    """nn.MaxPool2d(3, stride=2, padding=1): padding never wins the max."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


# --- Normalisation ----------------------------------------------------------

class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d in NHWC with flax's variable names.

    Params `scale`, `bias`; batch_stats `mean`, `var`. In training mode it
    normalises with the batch mean and biased variance and, outside init,
    updates the running statistics with momentum (flax convention: 0.9 here
    is PyTorch's 0.1) using the unbiased variance, as PyTorch does.
    """
    use_running_average: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * unbiased
            return y
        return _bn_apply(x, mean, var, scale, bias, self.epsilon)


# Train-mode batch norm with its closed-form backward: autodiff of the
# two-pass forward takes 1.6-2.8x torch's BatchNorm2d forward + backward on
# CPU (8 x 72 x 72 x 128: 25.4 against 9.2 ms); the closed form is a few
# fused passes over x. The forward is the same expression as before
# (bit-identical outputs), the gradients equal autodiff's to rounding.

def _bn_apply(x, mean, var, scale, bias, epsilon):
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def _bn_forward(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    # Two-pass variance, as PyTorch: no cancellation for large means.
    var = jnp.mean(jnp.square(x - mean), axes)
    return _bn_apply(x, mean, var, scale, bias, epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, epsilon):
    """(y, batch mean, biased batch variance) over all axes but the last."""
    return _bn_forward(x, scale, bias, epsilon)


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    y, mean, var = _bn_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    x, scale, mean, var = residuals
    gy, gmean, gvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    rstd = jax.lax.rsqrt(var + epsilon)
    xc = x - mean
    xhat = xc * rstd
    dbias = jnp.sum(gy, axes)
    dscale = jnp.sum(gy * xhat, axes)
    # y's path, then the batch mean's and variance's own (running statistics).
    dx = (scale * rstd) * (gy - dbias / n - xhat * (dscale / n)) \
        + gmean / n + xc * (2 * gvar / n)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


# --- Residual blocks --------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision BasicBlock (ResNet-18/34)."""
    planes: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        y = nn.relu(norm(name="bn1")(
            conv3x3(self.planes, self.strides, name="conv1")(x)))
        y = norm(name="bn2")(conv3x3(self.planes, name="conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.planes:
            x = norm(name="downsample_bn")(
                conv1x1(self.planes, self.strides, name="downsample_conv")(x))
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv).

    With `upsample=True` it is RD4AD's decoder de-bottleneck instead: the
    3x3 conv becomes a 2x2 stride-2 transposed conv (`deconv2`) and the
    shortcut a 2x2 stride-2 transposed conv + BN (`upsample_*`), doubling
    H and W. The same class serves the teacher, the encoder, the OCBE and
    the decoder.
    """
    planes: int
    strides: int = 1
    expansion: int = 4
    width_per_group: int = 64
    upsample: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        width = self.planes * self.width_per_group // 64
        out_features = self.planes * self.expansion
        y = nn.relu(norm(name="bn1")(conv1x1(width, name="conv1")(x)))
        if self.upsample:
            y = deconv2x2(width, name="deconv2")(y)
        else:
            y = conv3x3(width, self.strides, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv1x1(out_features, name="conv3")(y))
        if self.upsample:
            x = norm(name="upsample_bn")(
                deconv2x2(out_features, name="upsample_conv")(x))
        elif self.strides != 1 or x.shape[-1] != out_features:
            x = norm(name="downsample_bn")(
                conv1x1(out_features, self.strides, name="downsample_conv")(x))
        return nn.relu(y + x)


class SqueezeExcitation(nn.Module):
    """Channel attention: global mean, 1x1 C -> C//r, ReLU, 1x1 -> C, sigmoid.

    Both convs are bias-free, named after the reference's `fc.0` / `fc.2`.
    """
    reduction: int = 8
    kernel_init: nn.initializers.Initializer = spec_uniform

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(conv1x1(c // self.reduction, kernel_init=self.kernel_init,
                            name="fc1")(s))
        s = nn.sigmoid(conv1x1(c, kernel_init=self.kernel_init, name="fc2")(s))
        return x * s


# --- Resampling -------------------------------------------------------------

def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(out, in) averaging weights with PyTorch's adaptive-pool bin edges."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(out, in) weights of F.interpolate(mode='bilinear', align_corners=False).

    Half-pixel centres, source coordinate clamped at 0, upper neighbour
    clamped at the last pixel, scale = in / out (an explicit `size`).
    """
    m = np.zeros((size_out, size_in), np.float32)
    scale = size_in / size_out
    for o in range(size_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        lam = src - i0
        m[o, i0] += 1.0 - lam
        m[o, i1] += lam
    return m


def _separable(x, mh: np.ndarray, mw: np.ndarray):
    # Exact float32 sums: parity with the reference at every backend's
    # default matmul precision.
    return jnp.einsum("oh,pw,nhwc->nopc", mh, mw, x,
                      precision=jax.lax.Precision.HIGHEST)


def adaptive_avg_pool(x, size: int):
    """nn.AdaptiveAvgPool2d(size) in NHWC (static shapes)."""
    _, h, w, _ = x.shape
    return _separable(x, adaptive_pool_matrix(h, size),
                      adaptive_pool_matrix(w, size))


def resize_bilinear(x, shape: Sequence[int]):
    """F.interpolate(x, size=shape, mode='bilinear', align_corners=False).

    Unlike jax.image.resize it never antialiases, so it also matches PyTorch
    when shrinking.
    """
    _, h, w, _ = x.shape
    return _separable(x, bilinear_matrix(h, shape[0]),
                      bilinear_matrix(w, shape[1]))


# --- Shared heads and encoders ----------------------------------------------

class ResNetStages(nn.Module):
    """Bottleneck stages of a torchvision (Wide-)ResNet, without the stem.

    Stage i has planes 64 * 2**i, stride 1 for the first stage and 2 after,
    like torchvision's layer1, layer2, ... Returns every stage's output.
    Blocks are named `layer{i+1}_{j}` (torchvision's `layer{i+1}.{j}`).
    """
    blocks: Sequence[int]
    expansion: int = 4
    width_per_group: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        outputs = []
        for i, n in enumerate(self.blocks):
            for j in range(n):
                x = Bottleneck(64 * 2 ** i, 2 if (i > 0 and j == 0) else 1,
                               self.expansion, self.width_per_group,
                               name=f"layer{i + 1}_{j}")(x, train)
            outputs.append(x)
        return outputs


class PixelHead(nn.Module):
    """The reference's Pixel_Classifier feature part: two 1x1 convs + ReLU.

    features -> hidden -> bands, each with bias and ReLU; named `conv1`,
    `conv2` as in the reference. Its output is the teacher's `spe_f`.
    """
    hidden: int
    bands: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(biased_conv1x1(self.hidden, x.shape[-1], name="conv1")(x))
        return nn.relu(biased_conv1x1(self.bands, self.hidden, name="conv2")(x))
