"""Sizes of the models, as data.

The same module code runs at the published sizes and at the tiny sizes the
golden stage-1 file and the fast tests use; only these records differ.

- `FerdConfig` describes the stage-1 reverse-distillation graph (FERD). The
  spectral teacher (FEN) is the ConvH + encoder layer1 + head part of that
  graph, so it is built from the same record (only `encoder_blocks[0]` of
  the encoder is used).
- `StudentConfig` describes the spatial student (HyperSpatialResNet).
- `FrnConfig` describes the feature restoration net.

Use the functions at the bottom (`ferd`, `ferd_tiny`, `student`, ...)
rather than spelling out the fields.
"""

import dataclasses
from typing import Tuple

from fers_jax.errors import InputError


def head_width(bands: int) -> int:
    """Hidden width of the pixel head: the reference's rule."""
    return 256 if bands > 128 else 128


def _check_bands(bands, minimum=1):
    if not isinstance(bands, int) or isinstance(bands, bool) or bands < minimum:
        raise InputError(f"bands must be an integer >= {minimum}, got {bands!r}")


@dataclasses.dataclass(frozen=True)
class FerdConfig:
    """Stage-1 graph (and spectral teacher) sizes.

    Attributes:
      bands: input bands B.
      pad: reflect padding of ConvH on every side, cropped off again later.
      stem_width: ConvH output channels (the encoder's input width).
      expansion: bottleneck expansion (4 in torchvision, 1 in the tiny file).
      width_per_group: torchvision `width_per_group` (128 for the wide nets).
      encoder_blocks: bottlenecks per encoder stage (Wide-ResNet-101-2).
      ocbe_blocks: bottlenecks of the one-class bottleneck embedding.
      decoder_blocks: bottlenecks per decoder stage (mirrored WRN-50-2).
    """
    bands: int
    pad: int = 4
    stem_width: int = 64
    expansion: int = 4
    width_per_group: int = 128
    encoder_blocks: Tuple[int, ...] = (3, 4, 23)
    ocbe_blocks: int = 3
    decoder_blocks: Tuple[int, ...] = (3, 4, 6)

    def __post_init__(self):
        _check_bands(self.bands)

    @property
    def head_width(self) -> int:
        return head_width(self.bands)

    @property
    def features(self) -> int:
        """Channels of encoder layer1, the head's input."""
        return 64 * self.expansion


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Spatial student sizes (Conv2RGB, ResNet-34 trunk, LightSPP).

    Attributes:
      bands: input and output bands B.
      rgb_width: hidden width of Conv2RGB.
      stem_width: channels of the 7x7 stem (64 in ResNet-34).
      trunk_blocks: basic blocks per trunk stage (ResNet-34 stages 1-3).
      spp_levels: adaptive-pool output sizes of LightSPP.
      spp_width: hidden width of LightSPP's fuse convs.
      se_reduction: squeeze-excitation reduction.
    """
    bands: int
    rgb_width: int = 256
    stem_width: int = 64
    trunk_blocks: Tuple[int, ...] = (3, 4, 6)
    spp_levels: Tuple[int, ...] = (1, 2, 4)
    spp_width: int = 128
    se_reduction: int = 8

    def __post_init__(self):
        # B // reduction squeeze channels: fewer bands than that leaves none.
        _check_bands(self.bands, self.se_reduction)

    @property
    def trunk_widths(self) -> Tuple[int, ...]:
        return tuple(self.stem_width * 2 ** i
                     for i in range(len(self.trunk_blocks)))


@dataclasses.dataclass(frozen=True)
class FrnConfig:
    """Feature restoration net sizes.

    Attributes:
      bands: channels in and out.
      blocks: residual block + channel attention pairs.
      se_reduction: channel-attention reduction.
    """
    bands: int
    blocks: int = 3
    se_reduction: int = 8

    def __post_init__(self):
        _check_bands(self.bands, self.se_reduction)


def ferd(bands: int) -> FerdConfig:
    """The published FERD / spectral-teacher sizes."""
    return FerdConfig(bands=bands)


# The teacher is the FEN part of the stage-1 graph: same record.
teacher = ferd


def ferd_tiny(bands: int = 20) -> FerdConfig:
    """The golden file's tiny stage-1 graph (reference/README.md)."""
    return FerdConfig(bands=bands, expansion=1, width_per_group=16,
                      encoder_blocks=(1, 1, 1), ocbe_blocks=1,
                      decoder_blocks=(1, 1, 1))


teacher_tiny = ferd_tiny


def student(bands: int) -> StudentConfig:
    """The published spatial student sizes."""
    return StudentConfig(bands=bands)


def student_tiny(bands: int = 16) -> StudentConfig:
    """A small student for fast tests: same graph, fewer channels."""
    return StudentConfig(bands=bands, rgb_width=16, stem_width=8,
                         trunk_blocks=(1, 1, 1), spp_width=16)


def frn(bands: int) -> FrnConfig:
    return FrnConfig(bands=bands)


def frn_tiny(bands: int = 16) -> FrnConfig:
    return FrnConfig(bands=bands, blocks=1)


def to_dict(config) -> dict:
    """A JSON-able dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)


_CLASSES = {"FerdConfig": FerdConfig, "StudentConfig": StudentConfig,
            "FrnConfig": FrnConfig}


def from_dict(name: str, fields: dict):
    """Rebuilds a config written by `to_dict`; `name` is its class name."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise InputError(f"unknown config class {name!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise InputError(f"{name}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in fields.items()})
