"""Feature restoration net (SPEC 3.4): reconstructs x from spa_f + spe_f.

Used only while training the student.
"""

import functools

import flax.linen as nn

from fers_jax.configs import FrnConfig
from fers_jax.models import layers
from fers_jax.models.teacher import check_bands


class ResidualBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, + input, ReLU (bias-free convs)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        norm = functools.partial(layers.BatchNorm, use_running_average=not train)
        conv = functools.partial(layers.conv3x3, c, kernel_init=layers.spec_uniform)
        y = nn.relu(norm(name="bn1")(conv(name="conv1")(x)))
        y = norm(name="bn2")(conv(name="conv2")(y))
        return nn.relu(y + x)


class FeatureRestorationNet(nn.Module):
    """(N, H, W, B) -> (N, H, W, B): `blocks` x [residual block, channel
    attention], then a 1x1 conv with bias.

    Submodules `body_{k}` (k even: residual block, odd: attention, as the
    reference's body.k) and `final_conv`. Returns the array itself.
    """
    config: FrnConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        check_bands(x, cfg.bands, "restoration net")
        for k in range(cfg.blocks):
            x = ResidualBlock(name=f"body_{2 * k}")(x, train)
            x = layers.SqueezeExcitation(cfg.se_reduction,
                                         name=f"body_{2 * k + 1}")(x)
        return layers.biased_conv1x1(cfg.bands, cfg.bands,
                                     kernel_init=layers.spec_uniform,
                                     name="final_conv")(x)
