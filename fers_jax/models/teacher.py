"""Spectral teacher (FEN): the inference part of the stage-1 graph (SPEC 2).

ConvH (reflect pad + 1x1 conv) -> Wide-ResNet-101-2 layer1 -> crop -> pixel
head. Its variables are a subset of the stage-1 graph's
(`fers_jax.models.ferd.teacher_variables`).
"""

import flax.linen as nn

from fers_jax.configs import FerdConfig
from fers_jax.errors import InputError
from fers_jax.models import layers


def check_bands(x, bands: int, what: str):
    if x.shape[-1] != bands:
        raise InputError(f"the input has {x.shape[-1]} bands, the {what} was "
                         f"built for {bands} (inputs are NHWC)")


class ConvH(nn.Module):
    """Reflect-pad H and W by `pad`, then a bias-free 1x1 conv B -> features."""
    features: int
    pad: int

    @nn.compact
    def __call__(self, x):
        x = layers.reflect_pad(x, self.pad)
        return layers.conv1x1(self.features, kernel_init=layers.torch_default_init,
                              name="convh")(x)


class SpectralTeacher(nn.Module):
    """x (N, H, W, B) in [-0.1, 0.1] -> {'spe_f': (N, H, W, B), 'enc_f1_cut'}.

    Submodules: `convh`, `encoder` (layer1 only), `head`. BatchNorm uses
    running statistics unless `train` (the reference never trains it).
    """
    config: FerdConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        check_bands(x, cfg.bands, "spectral teacher")
        x = ConvH(cfg.stem_width, cfg.pad, name="convh")(x)
        (a,) = layers.ResNetStages(cfg.encoder_blocks[:1], cfg.expansion,
                                   cfg.width_per_group, name="encoder")(x, train)
        a = layers.crop(a, cfg.pad)
        spe_f = layers.PixelHead(cfg.head_width, cfg.bands, name="head")(a)
        return {"spe_f": spe_f, "enc_f1_cut": a}
