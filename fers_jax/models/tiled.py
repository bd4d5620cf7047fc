"""The FERS / FERD networks in pieces, for computing them tile by tile.

Each module shares the variable names of the whole model it mirrors
(SpectralTeacher, SpatialStudent), so the same variables apply; the
receptive-field facts of those models (`trunk_reach`, `trunk_halo`, ...)
say how much halo a tile needs. fers_jax.tiling plans the tiles and
stitches what these modules compute.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fers_jax.configs import FerdConfig, StudentConfig
from fers_jax.models import layers
from fers_jax.models.student import Conv2RGB, ResNetTrunk
from fers_jax.models.teacher import ConvH


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


class ToRGB(nn.Module):
    config: StudentConfig

    @nn.compact
    def __call__(self, x):
        return Conv2RGB(self.config.rgb_width, name="to_rgb")(x)


class Trunk(nn.Module):
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
