"""Scene I/O, band selection and the reference normalisation."""

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import BACKGROUND, SCENES
from fers_jax import data
from fers_jax.errors import InputError


def write_mat73(path, **arrays):
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header.

    MATLAB writes arrays column-major, so HDF5 sees their axes reversed.
    """
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f[k] = np.asarray(v).T
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" ")
    header += b"\0" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header)


def test_loads_every_shared_scene():
    scenes = data.load_scenes([SCENES])
    assert [s.name for s in scenes] == ["abu-airport-2", "abu-beach-2",
                                        "abu-urban-3", "pavia-car", "sandiego-2"]
    pavia = scenes[3]
    assert pavia.shape == (80, 100, 102)
    assert pavia.cube.dtype == np.float32 and pavia.gt.dtype == np.uint8
    assert int(pavia.gt.sum()) == 41


def test_background_npz_has_empty_mask():
    scene = data.load_scene(BACKGROUND / "samson.npz")
    assert scene.shape == (95, 95, 156) and scene.gt.sum() == 0


def test_mat_v73_read_through_h5py(tmp_path):
    cube = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    gt = np.zeros((6, 7), np.uint8)
    gt[2, 3] = 1
    write_mat73(tmp_path / "s.mat", hsi=cube, hsi_gt=gt)
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(tmp_path / "s.mat")  # proves the file is really v7.3
    scene = data.load_scene(tmp_path / "s.mat")
    np.testing.assert_array_equal(scene.cube, cube)
    np.testing.assert_array_equal(scene.gt, gt)


@pytest.mark.parametrize("cube_key,gt_key", [("data", "map"), ("HSI", "groundtruth"),
                                             ("img", "hsi_gt")])
def test_keys_detected(tmp_path, cube_key, gt_key):
    cube = np.ones((4, 5, 3)) * np.arange(3)
    np.savez(tmp_path / "s.npz", **{cube_key: cube, gt_key: np.eye(4, 5)})
    scene = data.load_scene(tmp_path / "s.npz")
    assert scene.shape == (4, 5, 3) and scene.gt.sum() == 4


def test_ambiguous_keys_name_what_was_found(tmp_path):
    np.savez(tmp_path / "s.npz", a=np.zeros((4, 5, 3)), b=np.ones((4, 5, 3)))
    with pytest.raises(InputError, match=r"\['a', 'b'\]"):
        data.load_scene(tmp_path / "s.npz")
    assert data.load_scene(tmp_path / "s.npz", cube_key="b").cube.max() == 1


def test_given_key_missing_lists_keys(tmp_path):
    np.savez(tmp_path / "s.npz", data=np.zeros((4, 5, 3)))
    with pytest.raises(InputError, match="no key 'cube'.*keys found"):
        data.load_scene(tmp_path / "s.npz", cube_key="cube")


@pytest.mark.parametrize("arrays,message", [
    ({"data": np.zeros((4, 5))}, "no 3-D cube"),
    ({"data": np.zeros((2, 4, 5, 3))}, "no 3-D cube"),
    ({"data": np.zeros((4, 5, 3)), "map": np.zeros((5, 4))}, r"mask is \(5, 4\)"),
    ({"data": np.full((4, 5, 3), np.nan)}, "60 NaN or Inf"),
])
def test_bad_scenes_are_refused_clearly(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message) as e:
        data.load_scene(tmp_path / "bad.npz")
    assert "bad.npz" in str(e.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        data.load_scene(tmp_path / "nope.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(InputError, match="junk.mat"):
        data.load_scene(tmp_path / "junk.mat")
    truncated = tmp_path / "cut.mat"
    truncated.write_bytes((SCENES / "pavia-car.mat").read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.mat"):
        data.load_scene(truncated)
    (tmp_path / "cut.npz").write_bytes((BACKGROUND / "samson.npz").read_bytes()[:999])
    with pytest.raises(InputError, match="cut.npz"):
        data.load_scene(tmp_path / "cut.npz")


def test_find_scene_files(tmp_path):
    assert len(data.find_scene_files([SCENES, SCENES / "pavia-car.mat"])) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scene files"):
        data.find_scene_files([tmp_path / "empty"])
    with pytest.raises(InputError, match="no such file or folder"):
        data.find_scene_files([tmp_path / "absent"])


def test_had100_layout(tmp_path):
    root = tmp_path / "HAD100Dataset"
    (root / "test" / "aviris_ng").mkdir(parents=True)
    (root / "ground_truth" / "aviris_ng").mkdir(parents=True)
    cube = np.random.default_rng(1).random((8, 8, 4)).astype(np.float32)
    np.save(root / "test" / "aviris_ng" / "img1.npy", cube)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1, 2, 1] = 255
    rgb[3, 3, 0] = 255  # red is not the mask channel
    Image.fromarray(rgb).save(root / "ground_truth" / "aviris_ng" / "img1.png")
    files = data.find_scene_files([root])
    assert [f.name for f in files] == ["img1.npy"]
    scene = data.load_scene(files[0])
    np.testing.assert_array_equal(scene.cube, cube)
    assert scene.gt.sum() == 1 and scene.gt[1, 2] == 1
    with pytest.raises(InputError, match="aviris"):
        data.find_scene_files([root], sensor="aviris")


def test_select_bands():
    cube = np.arange(2 * 2 * 10, dtype=np.float32).reshape(2, 2, 10)
    assert data.select_bands(cube, 4).shape == (2, 2, 4)
    np.testing.assert_array_equal(data.select_bands(cube, 3, 5), cube[..., 5:8])
    with pytest.raises(InputError, match="fewer than the 20"):
        data.select_bands(cube, 20)
    with pytest.raises(InputError, match="start band 10"):
        data.select_bands(cube, 1, 10)


def test_normalise_matches_reference_formula():
    x = np.random.default_rng(2).random((2, 5, 6, 3)) * 1000 + 7
    y = data.normalise(x)
    for i in range(2):  # each image alone
        ref = ((x[i] - x[i].min()) / (x[i].max() - x[i].min()) * 2 - 1) * 0.1
        np.testing.assert_allclose(y[i], ref, rtol=1e-6, atol=1e-8)
    assert y.dtype == np.float32 and y.min() == pytest.approx(-0.1)
    with pytest.raises(InputError, match="constant"):
        data.normalise(np.ones((3, 3, 2)))
