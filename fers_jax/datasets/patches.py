"""Background patches of any scenes as a TFDS builder (array_record).

For users without HAD100: cut size x size patches from scene files, folders
or HAD100 roots and keep those that touch no anomaly pixel (a patch with one
anomaly pixel is skipped whole; a scene with no clean patch is logged and
contributes nothing; see `crops.clean_origins`). Patches keep `bands` bands
from `band_start`, as stored (not normalised: `fers_jax.input_pipeline`
normalises each patch when reading, as for HAD100 images).

Every setting is part of the config, and the config name carries a hash of
them, so two builds with different settings never share a folder:

    config = patch_config(["/data/background"], size=64, stride=32, bands=100)
    builder = build_patches(config, data_dir)
    train = builder.as_data_source("train")       # train[i]["image"]: (64, 64, 100)
    # later: tfds.builder_from_directory(builder.data_dir).as_data_source("train")
"""

import dataclasses
import hashlib
import json
import pathlib
from typing import Iterable, Optional

import numpy as np
import tensorflow_datasets as tfds

from fers_jax import data
from fers_jax.datasets import crops
from fers_jax.datasets.had100 import ARRAY_RECORD
from fers_jax.errors import InputError


@dataclasses.dataclass(eq=False)
class PatchConfig(tfds.core.BuilderConfig):
    """Which scenes and how to cut them. Build one with `patch_config`.

    Attributes:
      paths: scene files, folders or HAD100 roots (absolute).
      size, stride: patch side and step.
      bands, band_start: keep `bands` bands from `band_start` (None: all).
      sensor, split: what a HAD100 root in `paths` contributes
        (`<split>/<sensor>/*.npy`).
    """
    paths: tuple = ()
    size: int = 64
    stride: int = 32
    bands: Optional[int] = None
    band_start: int = 0
    sensor: str = "aviris_ng"
    split: str = "train"

    def settings(self) -> dict:
        return {"paths": list(self.paths), "size": self.size,
                "stride": self.stride, "bands": self.bands,
                "band_start": self.band_start, "sensor": self.sensor,
                "split": self.split}


def patch_config(paths: Iterable, size: int = 64, stride: Optional[int] = 32,
                 bands: Optional[int] = None, band_start: int = 0,
                 sensor: str = "aviris_ng", split: str = "train",
                 name: Optional[str] = None) -> PatchConfig:
    """A PatchConfig whose name is `name` or derived from its settings.

    The derived name, e.g. `p64_s32_b100_1a2b3c4d`, ends in a hash of the
    resolved paths and settings.
    """
    size, stride = crops.check_size_stride(size, stride)
    if bands is not None and bands <= 0:
        raise InputError(f"the band count must be positive, got {bands}")
    paths = tuple(str(pathlib.Path(p).resolve()) for p in paths)
    if not paths:
        raise InputError("no scene paths given for the patch dataset")
    config = PatchConfig(name="unnamed", paths=paths, size=size, stride=stride,
                         bands=bands, band_start=band_start, sensor=sensor,
                         split=split)
    settings = json.dumps(config.settings(), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    config.name = name or (f"p{size}_s{stride}_b{bands or 'all'}"
                           f"{'' if not band_start else f'from{band_start}'}"
                           f"_{digest}")
    config.description = f"Background patches; settings: {settings}"
    return config


class HsiPatches(tfds.core.GeneratorBasedBuilder):
    """Anomaly-free hyperspectral patches cut from scenes (one `train` split).

    Features: `image` (size, size, B) float32 as stored, `name`
    '<scene>_y<y>_x<x>' (the patch origin in its scene).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No predefined configs: every dataset comes from a patch_config.

    def __init__(self, *, config: PatchConfig, **kwargs):
        if not isinstance(config, PatchConfig):
            raise InputError("HsiPatches needs a PatchConfig (see patch_config), "
                             f"got {config!r}")
        kwargs.setdefault("file_format", ARRAY_RECORD)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(c.size, c.size, c.bands),
                                              dtype=np.float32,
                                              encoding="bytes"),
                "name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the scenes are local files named in the config
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        source = crops.PatchSource.from_paths(
            c.paths, c.size, c.stride, c.bands, c.band_start, c.sensor, c.split)
        for i in range(len(source)):
            example = source[i]
            # The index keeps keys unique when two folders hold equal stems.
            yield f"{i:07d}_{example['name']}", {
                "image": np.ascontiguousarray(example["image"]),
                "name": example["name"]}


def build_patches(config: PatchConfig, data_dir) -> HsiPatches:
    """Builds (once) and returns the patch dataset of `config` under data_dir."""
    builder = HsiPatches(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder
