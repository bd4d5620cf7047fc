"""HAD100 as a TensorFlow Datasets builder, written as array_record.

The user downloads HAD100 (https://github.com/ZhaoxuLi123/AETNet) and puts
`HAD100Dataset/` into the manual folder (or passes that folder itself).
Examples hold the images as stored: all bands, float32, not normalised.
Band selection and the reference normalisation happen when reading
(`fers_jax.input_pipeline`, through `data.select_bands` / `data.normalise`),
so one build serves the 50-, 100- and 200-band models.

Build and read without TensorFlow (array_record is read by random access):

    builder = build_had100("/path/to/HAD100Dataset", data_dir, "aviris_ng")
    train = builder.as_data_source("train")   # train[i]["image"]: (H, W, B)
    # train[i]["mask"]: (H, W) uint8; train[i]["name"]: bytes (TFDS Text)
    # later (once fers_jax.datasets is imported, which registers the name):
    #   tfds.data_source("had100/aviris_ng", data_dir=...)
"""

import dataclasses
import pathlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from fers_jax import data
from fers_jax.errors import InputError

ARRAY_RECORD = "array_record"

_CITATION = """\
@article{li2023aetnet,
  title   = {You Only Train Once: Learning a General Anomaly Enhancement
             Network with Random Masks for Hyperspectral Anomaly Detection},
  author  = {Li, Zhaoxu and Wang, Yingqian and Xiao, Chao and Ling, Qiang and
             Lin, Zaiping and An, Wei},
  journal = {arXiv preprint arXiv:2303.18001},
  year    = {2023}
}"""

_MANUAL = """\
Download HAD100 from https://github.com/ZhaoxuLi123/AETNet and put its
`HAD100Dataset/` folder into the manual folder (or pass HAD100Dataset itself
as the manual folder). Expected layout:
  HAD100Dataset/train/aviris_ng/*.npy
  HAD100Dataset/train/aviris/*.npy
  HAD100Dataset/test/aviris_ng/*.npy
  HAD100Dataset/ground_truth/aviris_ng/<stem>.png  (anomaly: green == 255)
"""


@dataclasses.dataclass(eq=False)
class Had100Config(tfds.core.BuilderConfig):
    """One sensor of HAD100.

    Attributes:
      sensor: the folder name under train/ and test/.
      required: splits that must be present; others are built when found.
    """
    sensor: str = "aviris_ng"
    required: tuple = ("train", "test")


def had100_root(folder) -> pathlib.Path:
    """The HAD100 root in `folder`: `folder/HAD100Dataset` or `folder` itself."""
    folder = pathlib.Path(folder)
    for candidate in (folder / "HAD100Dataset", folder):
        if data.is_had100_root(candidate):
            return candidate
    raise InputError(
        f"{folder}: not a HAD100 folder (no ground_truth/ beside train/ or "
        f"test/, here or in {folder / 'HAD100Dataset'})")


class Had100(tfds.core.GeneratorBasedBuilder):
    """HAD100 hyperspectral anomaly detection images (manual download).

    Features: `image` (H, W, B) float32 as stored, `mask` (H, W) uint8 with
    1 = anomaly (from the green channel of the ground-truth PNG; all zeros for
    train images, which HAD100 gives as anomaly-free background), `name` the
    file stem. The band dimension is left open in the features because the
    two sensors differ in band count.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
    BUILDER_CONFIGS = [
        Had100Config(name="aviris_ng", sensor="aviris_ng",
                     required=("train", "test"),
                     description="AVIRIS-NG: train and test images."),
        # HAD100 has no AVIRIS test images; a test/aviris folder is used
        # when present.
        Had100Config(name="aviris", sensor="aviris", required=("train",),
                     description="AVIRIS: train images."),
    ]
    DEFAULT_CONFIG_NAME = "aviris_ng"

    def __init__(self, **kwargs):
        # array_record is the format that reads without TensorFlow.
        kwargs.setdefault("file_format", ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not dataset_info_from_configs: the latter
        # expects a TFDS-style package folder with README/CITATIONS files.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None, None),
                                              dtype=np.float32,
                                              encoding="bytes"),
                "mask": tfds.features.Tensor(shape=(None, None),
                                             dtype=np.uint8, encoding="bytes"),
                "name": tfds.features.Text(),
            }),
            homepage="https://github.com/ZhaoxuLi123/AETNet",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        try:
            manual = dl_manager.manual_dir
        except AssertionError as e:  # TFDS asserts on a missing manual folder
            raise InputError(str(e)) from None
        root = had100_root(manual)
        sensor = self.builder_config.sensor
        splits = {}
        for split in ("train", "test"):
            folder = root / split / sensor
            files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
            if files:
                splits[split] = self._generate_examples(files, split)
            elif split in self.builder_config.required:
                raise InputError(f"{root}: HAD100 root without its {split} "
                                 f"split ({folder} has no .npy files)")
        return splits

    def _generate_examples(self, files, split):
        for f in files:
            scene = data.load_scene(f)
            if scene.gt is None and split == "test":
                raise InputError(f"{f}: test image without its ground-truth "
                                 f"PNG (ground_truth/{f.parent.name}/{f.stem}.png)")
            gt = (np.zeros(scene.cube.shape[:2], np.uint8) if scene.gt is None
                  else scene.gt)
            yield scene.name, {"image": scene.cube, "mask": gt,
                               "name": scene.name}


def build_had100(root, data_dir, sensor: str = "aviris_ng",
                 version: Optional[str] = None) -> Had100:
    """Builds (once) and returns the HAD100 builder for one sensor.

    Args:
      root: the HAD100Dataset folder, or the folder that holds it.
      data_dir: where TFDS writes `had100/<sensor>/<version>/`.
      sensor: 'aviris_ng' or 'aviris'.
    """
    root = had100_root(root)
    names = [c.name for c in Had100.BUILDER_CONFIGS]
    if sensor not in names:
        raise InputError(f"HAD100 sensor {sensor!r} unknown; one of {names}")
    builder = Had100(config=sensor, data_dir=str(data_dir), version=version)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder
