"""Datasets and the input pipeline, on a small HAD100 cut from ../shared/data.

The TFDS builds run once, in a subprocess, so that its fresh sys.modules
shows whether building or reading imported TensorFlow; the tests here read
what it wrote.
"""

import json
import logging
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import BACKGROUND, REPO, SCENES
from fers_jax import data, input_pipeline
from fers_jax.datasets import crops, layout
from fers_jax.errors import InputError

BANDS = 100  # every shared scene has at least 102 bands
PATCH_SCENES = [BACKGROUND, SCENES / "pavia-car.mat", SCENES / "abu-airport-2.mat"]

BUILD_SCRIPT = r"""
import json, sys
import tensorflow_datasets as tfds
from fers_jax import datasets
root, data_dir, patch_paths = sys.argv[1], sys.argv[2], sys.argv[3:]
datasets.build_had100(root, data_dir, "aviris_ng")
config = datasets.patch_config(patch_paths, size=64, stride=16, bands=%d)
patches = datasets.build_patches(config, data_dir)
# Read back through the registered name, as a user would later.
had100 = tfds.data_source("had100/aviris_ng", data_dir=data_dir)
assert len(had100["train"][0]["image"].shape) == 3
assert patches.as_data_source("train")[0]["image"].shape[-1] == %d
print(json.dumps({
    "tf_modules": sorted(m for m in sys.modules
                         if m == "tensorflow" or m.startswith("tensorflow.")),
    "patch_dir": str(patches.data_dir),
    "had100_dir": str(datasets.Had100(config="aviris_ng",
                                      data_dir=data_dir).data_dir),
}))
""" % (BANDS, BANDS)


@pytest.fixture(scope="module")
def had100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("had100") / "HAD100Dataset"
    written = layout.write_layout([SCENES, BACKGROUND], root, bands=BANDS)
    assert written["train"] and written["test"]
    return root


@pytest.fixture(scope="module")
def built(had100_root, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    run = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(had100_root), str(data_dir)]
        + [str(p) for p in PATCH_SCENES],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["data_dir"] = data_dir
    return result


def test_layout_writes_had100_crops(had100_root):
    for split in ("train", "test"):
        for f in sorted((had100_root / split / "aviris_ng").glob("*.npy")):
            scene_name, y, x = re.fullmatch(r"(.+)_y(\d+)_x(\d+)", f.stem).groups()
            y, x = int(y), int(x)
            source = next(p for d in (SCENES, BACKGROUND) for p in d.iterdir()
                          if p.stem == scene_name)
            scene = data.load_scene(source)
            crop = np.load(f)
            assert crop.dtype == np.float32 and crop.shape == (64, 64, BANDS)
            np.testing.assert_array_equal(
                crop, scene.cube[y:y + 64, x:x + 64, :BANDS])
            png = had100_root / "ground_truth" / "aviris_ng" / f"{f.stem}.png"
            if split == "train":
                assert not crops.touches_anomaly(scene.gt, y, x, 64)
                assert not png.exists()
            else:
                np.testing.assert_array_equal(data.read_png_mask(png),
                                              scene.gt[y:y + 64, x:x + 64])
                assert data.read_png_mask(png).any()
    # The loader finds the masks by the HAD100 rule.
    scenes = data.load_scenes([had100_root], split="test")
    assert all(s.gt is not None and s.gt.any() for s in scenes)


def test_layout_cli(tmp_path):
    out = tmp_path / "H"
    assert layout.main(["--scenes", str(BACKGROUND), "--out", str(out),
                        "--size", "32", "--stride", "32", "--sensor", "aviris",
                        "--bands", "10"]) == 0
    files = sorted((out / "train" / "aviris").glob("*.npy"))
    # jasper 100x100: origins 0, 32, 64, 68; samson 95x95: 0, 32, 63.
    assert len(files) == 4 * 4 + 3 * 3
    assert np.load(files[0]).shape == (32, 32, 10)
    assert layout.main(["--scenes", str(tmp_path / "none"), "--out",
                        str(out)]) == 2


def test_builds_do_not_import_tensorflow(built):
    assert built["tf_modules"] == []


def test_had100_reads_back_equal_to_files(built, had100_root):
    import tensorflow_datasets as tfds
    ds = tfds.data_source("had100/aviris_ng", data_dir=built["data_dir"])
    for split in ("train", "test"):
        files = sorted((had100_root / split / "aviris_ng").glob("*.npy"))
        assert len(ds[split]) == len(files)
        examples = {ds[split][i]["name"].decode(): ds[split][i]
                    for i in range(len(ds[split]))}
        assert sorted(examples) == [f.stem for f in files]
        for f in files:
            ex = examples[f.stem]
            assert ex["image"].dtype == np.float32
            np.testing.assert_array_equal(ex["image"], np.load(f))
            png = had100_root / "ground_truth" / "aviris_ng" / f"{f.stem}.png"
            want = data.read_png_mask(png) if split == "test" else np.zeros((64, 64))
            np.testing.assert_array_equal(ex["mask"], want)


def test_had100_errors(tmp_path, had100_root):
    from fers_jax.datasets import build_had100
    with pytest.raises(InputError, match="not a HAD100 folder"):
        build_had100(tmp_path, tmp_path / "tfds")
    no_test = tmp_path / "HAD100Dataset"
    for part in ("train/aviris_ng", "ground_truth/aviris_ng"):
        (no_test / part).mkdir(parents=True)
    for f in sorted((had100_root / "train" / "aviris_ng").glob("*.npy"))[:2]:
        (no_test / "train" / "aviris_ng" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="without its test split"):
        build_had100(tmp_path, tmp_path / "tfds", "aviris_ng")
    with pytest.raises(InputError, match=r"HAD100 root, test/aviris_ng\): no scene"):
        input_pipeline.load_eval_scenes([no_test])
    with pytest.raises(InputError, match="unknown"):
        build_had100(tmp_path, tmp_path / "tfds", "hydice")
    # The AVIRIS config needs only train/aviris, which this root lacks.
    with pytest.raises(InputError, match="without its train split"):
        build_had100(tmp_path, tmp_path / "tfds", "aviris")


def test_patch_dataset_skips_patches_touching_anomalies(built):
    import tensorflow_datasets as tfds
    ds = tfds.builder_from_directory(built["patch_dir"]).as_data_source("train")
    scenes = {s.name: s for s in data.load_scenes(PATCH_SCENES)}
    got = {}
    for i in range(len(ds)):
        ex = ds[i]
        name, y, x = re.fullmatch(r"(.+)_y(\d+)_x(\d+)",
                                  ex["name"].decode()).groups()
        y, x = int(y), int(x)
        s = scenes[name]
        np.testing.assert_array_equal(ex["image"],
                                      s.cube[y:y + 64, x:x + 64, :BANDS])
        got.setdefault(name, set()).add((y, x))
    for name, s in scenes.items():
        # Brute force over every grid patch: kept exactly when no anomaly in it.
        want = {(y, x) for y, x in crops.grid(s.cube.shape[:2], 64, 16)
                if s.gt is None or not s.gt[y:y + 64, x:x + 64].any()}
        assert got.get(name, set()) == want, name
    assert "abu-airport-2" not in got      # every 64x64 patch touches a target
    assert 0 < len(got["pavia-car"]) < len(crops.grid((80, 100), 64, 16))


def test_patch_source_says_when_a_scene_gives_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        source = input_pipeline.scene_source(PATCH_SCENES[1:], stride=16)
    assert "abu-airport-2" in caplog.text and "no background patches" in caplog.text
    assert len(source) == 2  # pavia-car only
    with pytest.raises(InputError, match="no background patches"):
        input_pipeline.scene_source([SCENES / "abu-airport-2.mat"], stride=16)


def test_empty_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no scene files"):
        input_pipeline.scene_source([tmp_path])
    with pytest.raises(InputError, match="no scene files"):
        layout.write_layout([tmp_path], tmp_path / "out")
    with pytest.raises(InputError, match="not built"):
        input_pipeline.tfds_source("had100/aviris_ng", data_dir=tmp_path)
    with pytest.raises(InputError, match="neither"):
        input_pipeline.tfds_source("mnist", data_dir=tmp_path)


def test_tfds_source_splits(built):
    n = len(input_pipeline.tfds_source("had100/aviris_ng", "train",
                                       data_dir=built["data_dir"]))
    half = input_pipeline.tfds_source(pathlib.Path(built["had100_dir"]),
                                      "train[:50%]")
    assert len(half) == n // 2
    with pytest.raises(InputError, match="no split 'validation'"):
        input_pipeline.tfds_source(pathlib.Path(built["had100_dir"]),
                                   "validation")


@pytest.fixture(scope="module")
def train_source(built):
    return input_pipeline.tfds_source(pathlib.Path(built["had100_dir"]), "train")


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batches_shape_and_normalisation(train_source):
    n = len(train_source)
    assert n >= 8
    with input_pipeline.batches(train_source, 4, seed=3, bands=50,
                                num_epochs=1) as it:
        got = list(it)
    assert len(got) == n // 4
    for b in got:
        assert b.shape == (4, 64, 64, 50) and b.dtype == np.float32
        np.testing.assert_allclose(b.min(axis=(1, 2, 3)), -0.1, atol=1e-7)
        np.testing.assert_allclose(b.max(axis=(1, 2, 3)), 0.1, atol=1e-7)
    # Each image is normalised alone, the same as data.prepare on the file.
    order = input_pipeline.Batches(train_source, 4, seed=3).order(0)
    first = train_source[int(order[0])]
    np.testing.assert_array_equal(
        got[0][0], data.normalise(data.select_bands(first["image"], 50)))
    with input_pipeline.batches(train_source, 4, seed=3, num_epochs=1,
                                drop_remainder=False) as it:
        sizes = [len(b) for b in it]
    assert sum(sizes) == n and sizes[-1] == n - 4 * (len(sizes) - 1)


def test_batches_are_deterministic_and_resume_exactly(train_source):
    steps = len(train_source) // 4
    k = steps + 1                           # past an epoch boundary
    with input_pipeline.batches(train_source, 4, seed=7) as it:
        whole = take(it, k + 3)
    with input_pipeline.batches(train_source, 4, seed=7) as it:
        np.testing.assert_array_equal(np.stack(take(it, k + 3)), np.stack(whole))
    with input_pipeline.batches(train_source, 4, seed=8) as it:
        assert not np.array_equal(np.stack(take(it, steps)),
                                  np.stack(whole[:steps]))
    with input_pipeline.batches(train_source, 4, seed=7) as it:
        take(it, k)
        state = json.loads(json.dumps(it.state))
    assert state["epoch"] == 1 and state["step_in_epoch"] == 1
    with input_pipeline.batches(train_source, 4, seed=7, state=state) as it:
        for want in whole[k:]:
            np.testing.assert_array_equal(next(it), want)
    with pytest.raises(InputError, match="seed=7, now seed=9"):
        input_pipeline.batches(train_source, 4, seed=9, state=state)
    with pytest.raises(InputError, match="batch_size=4, now batch_size=2"):
        input_pipeline.batches(train_source, 2, seed=7, state=state)
    # Augmented, the same: its symmetries, like the order, come from
    # (seed, epoch) alone.
    with input_pipeline.batches(train_source, 4, seed=7, augment=True) as it:
        turned = take(it, k + 3)
    assert not np.array_equal(np.stack(turned), np.stack(whole))
    with input_pipeline.batches(train_source, 4, seed=7, augment=True,
                                state=state) as it:
        for want in turned[k:]:
            np.testing.assert_array_equal(next(it), want)


def test_augment_refuses_images_that_are_not_square():
    source = [np.random.default_rng(0).random((6, 8, 3), np.float32)] * 2
    with input_pipeline.batches(source, 2, seed=0, augment=True) as it:
        with pytest.raises(InputError, match="example 0: image of 6 x 8 "
                                             "pixels: .*needs square images"):
            next(it)


def test_in_memory_source_matches_patch_dataset(built):
    import tensorflow_datasets as tfds
    stored = tfds.builder_from_directory(built["patch_dir"]).as_data_source("train")
    memory = input_pipeline.scene_source(PATCH_SCENES, stride=16)
    assert len(memory) == len(stored)
    by_name = {stored[i]["name"].decode(): stored[i]["image"]
               for i in range(len(stored))}
    for i in range(len(memory)):
        np.testing.assert_array_equal(memory[i]["image"][..., :BANDS],
                                      by_name[memory[i]["name"]])
    with input_pipeline.batches(memory, 8, seed=0, bands=BANDS) as it:
        assert next(it).shape == (8, 64, 64, BANDS)
    # Scenes of different band counts cannot share a batch without `bands`;
    # the error comes from the prefetch thread to the caller.
    with input_pipeline.batches(memory, len(memory), seed=0) as it:
        with pytest.raises(InputError, match="band count"):
            next(it)


def test_eval_scenes(had100_root):
    scenes = input_pipeline.load_eval_scenes([had100_root], bands=BANDS)
    assert len(scenes) == len(list((had100_root / "test" / "aviris_ng").glob("*.npy")))
    for s in scenes:
        assert s.x.shape == (64, 64, BANDS) and s.gt.shape == (64, 64)
        assert np.isclose(s.x.min(), -0.1) and np.isclose(s.x.max(), 0.1)
    with pytest.raises(InputError, match="no anomaly pixels"):
        input_pipeline.load_eval_scenes([BACKGROUND])
