"""Spatial student, the "rebellious student" (SPEC 3).

Conv2RGB -> ResNet-34 stem and stages 1-3 -> LightSPP. Works for any H, W.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from fers_jax.configs import StudentConfig
from fers_jax.models import layers
from fers_jax.models.teacher import check_bands


class Conv2RGB(nn.Module):
    """1x1 B -> width (+bias), ReLU, 1x1 -> 3 (+bias), sigmoid: false colour.

    Named `conv` and `hidden` as the reference's initial_conv.
    """
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(layers.biased_conv1x1(
            self.width, x.shape[-1], kernel_init=layers.spec_uniform,
            name="conv")(x))
        return nn.sigmoid(layers.biased_conv1x1(
            3, self.width, kernel_init=layers.spec_uniform, name="hidden")(x))


class ResNetTrunk(nn.Module):
    """torchvision ResNet-34 stem and the first stages (basic blocks).

    Names as torchvision (`conv1`, `bn1`, `layer{i}_{j}`) so ImageNet
    weights convert directly.
    """
    blocks: tuple
    stem_width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.conv7x7(self.stem_width, 2, name="conv1")(x)
        x = layers.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = layers.max_pool3x3(nn.relu(x))
        for i, n in enumerate(self.blocks):
            for j in range(n):
                x = layers.BasicBlock(self.stem_width * 2 ** i,
                                      2 if (i > 0 and j == 0) else 1,
                                      name=f"layer{i + 1}_{j}")(x, train)
        return x


class LightSPP(nn.Module):
    """Pyramid pooling back to (H, W), 1x1 fuse to B bands, channel attention.

    As the reference: each level is an adaptive average pool to
    level x level and a bilinear resize to `shape` (align_corners=False);
    the levels are concatenated in `levels` order and fused by 1x1 convs
    (`fuse1` -> `width`, ReLU, `fuse2` -> `bands`, ReLU), then `se`.

    Computed in another order, exact up to float rounding: the resize and
    fuse1 (bias-free, before its ReLU) are both linear and act on different
    axes, so fuse1 runs on the small pooled maps and the resized results
    are summed, rather than fuse1 on the (H, W, 3 C) concatenation -- at
    64 x 64 that is ~13 GFLOP less per batch of 16 forward and twice that
    backward. fuse1 keeps its (1, 1, 3 C, width) kernel: it is applied
    once to the pooled pixels of all levels side by side, each level's
    channels in its own block of the 3 C inputs and zeros elsewhere.
    """
    bands: int
    width: int = 128
    levels: tuple = (1, 2, 4)
    se_reduction: int = 8

    @nn.compact
    def __call__(self, x, shape):
        n, c = x.shape[0], x.shape[-1]
        k = len(self.levels)
        pooled = [layers.adaptive_avg_pool(x, s).reshape(n, s * s, c)
                  for s in self.levels]
        blocks = jnp.concatenate(
            [jnp.pad(p, ((0, 0), (0, 0), (i * c, (k - 1 - i) * c)))
             for i, p in enumerate(pooled)], axis=1)[:, None]
        conv = functools.partial(layers.conv1x1, kernel_init=layers.spec_uniform)
        fused = conv(self.width, name="fuse1")(blocks)[:, 0]
        x, start = 0, 0
        for s in self.levels:
            level = fused[:, start:start + s * s].reshape(n, s, s, self.width)
            x = x + layers.resize_bilinear(level, shape)
            start += s * s
        x = nn.relu(x)
        x = nn.relu(conv(self.bands, name="fuse2")(x))
        return layers.SqueezeExcitation(self.se_reduction, name="se")(x)


class SpatialStudent(nn.Module):
    """x (N, H, W, B) -> {'spa_f': (N, H, W, B), 'false_rgb': (N, H, W, 3),
    'trunk': (N, ~H/16, ~W/16, C)}.

    Submodules `to_rgb`, `trunk`, `spp`. `train` switches the trunk's
    BatchNorm to batch statistics, as the reference's student.train() does
    even though the trunk's parameters are frozen.
    """
    config: StudentConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        check_bands(x, cfg.bands, "spatial student")
        rgb = Conv2RGB(cfg.rgb_width, name="to_rgb")(x)
        f = ResNetTrunk(cfg.trunk_blocks, cfg.stem_width, name="trunk")(rgb, train)
        spa_f = LightSPP(cfg.bands, cfg.spp_width, cfg.spp_levels,
                         cfg.se_reduction, name="spp")(f, x.shape[1:3])
        return {"spa_f": spa_f, "false_rgb": rgb, "trunk": f}
