"""ENVI scenes and cubes left on disk (fers_jax.data).

Every file is written by the test itself: with `spectral` (the package
fers_jax reads ENVI through) for the round trips, by hand for the header
offset and the damaged files. Bad ENVI input must give the one-line errors
of tests/test_bad_inputs.py through evaluate.py.
"""

import json
import pathlib

import numpy as np
import pytest
import spectral.io.envi as envi

from fers_jax import data
from fers_jax.errors import InputError
from test_bad_inputs import assert_error, run_eval
from test_data import write_mat73

RNG = np.random.default_rng(3)
DTYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64,
          12: np.uint16, 13: np.uint32, 14: np.int64, 15: np.uint64}


def cube_of(dtype, shape=(5, 7, 4)):
    hi = 200 if np.dtype(dtype).kind in "ui" else 1.0
    return (RNG.random(shape) * hi).astype(dtype)


def write_envi(path, cube, interleave="bil", byteorder=0, **meta):
    path = pathlib.Path(path)
    envi.save_image(str(path), cube, interleave=interleave, byteorder=byteorder,
                    force=True, metadata=meta)
    return path


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byteorder", [0, 1])
@pytest.mark.parametrize("code", sorted(DTYPES))
def test_envi_round_trip(tmp_path, interleave, byteorder, code):
    cube = cube_of(DTYPES[code])
    hdr = write_envi(tmp_path / "s.hdr", cube, interleave, byteorder)
    assert f"data type = {code}" in hdr.read_text()
    opened = data.open_scene(hdr)
    assert isinstance(opened.cube, data.DiskCube) and opened.cube.shape == cube.shape
    np.testing.assert_array_equal(opened.cube[1:4], cube[1:4].astype(np.float32))
    np.testing.assert_array_equal(data.load_scene(hdr).cube, cube.astype(np.float32))


def test_header_offset_written_by_hand(tmp_path):
    cube = cube_of(np.int16, (3, 4, 2))
    (tmp_path / "h.img").write_bytes(b"x" * 17 + cube.astype(">i2").tobytes())
    (tmp_path / "h.hdr").write_text(
        "ENVI\nsamples = 4\nlines = 3\nbands = 2\nheader offset = 17\n"
        "data type = 2\ninterleave = bip\nbyte order = 1\n")
    np.testing.assert_array_equal(data.load_scene(tmp_path / "h.hdr").cube, cube)


def test_bad_bands_wavelengths_and_mask(tmp_path, capsys):
    cube = cube_of(np.float32, (12, 12, 6))
    hdr = write_envi(tmp_path / "line.hdr", cube, wavelength=[400, 500, 600, 700, 800, 900],
                     bbl=[1, 0, 1, 1, 0, 1], **{"wavelength units": "nm"})
    mask = np.zeros((12, 12), np.uint8)
    mask[3, 4] = 255
    np.save(tmp_path / "line_mask.npy", mask)
    scene = data.load_scene(hdr, drop_bad_bands=True)
    np.testing.assert_array_equal(scene.cube, cube[..., [0, 2, 3, 5]])
    assert scene.wavelengths == (400, 600, 700, 900) and scene.gt.sum() == 1
    assert data.load_scene(hdr).cube.shape[-1] == 6
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", tmp_path, "--method", "rx",
                         "--drop-bad-bands", "--start-band", "1", "--out", out)
    assert code == 0, err
    row = json.loads((out / "results.json").read_text())["scenes"][0]
    assert row["shape"] == [12, 12, 4] and row["auc"] is not None
    assert row["wavelengths"] == [600, 700, 900] and row["wavelength_units"] == "nm"


def test_envi_mask_gets_the_usual_checks(tmp_path, capsys):
    write_envi(tmp_path / "s.hdr", cube_of(np.float32, (12, 12, 4)))
    np.save(tmp_path / "s_mask.npy", np.zeros((12, 11), np.uint8))
    code, err = run_eval(capsys, "--scenes", tmp_path / "s.hdr", "--out", tmp_path / "o")
    assert_error(code, err, "s_mask.npy", "(12, 11)")
    (tmp_path / "s_mask.npy").unlink()
    write_envi(tmp_path / "s_mask.hdr", -np.ones((12, 12, 1), np.int16))
    code, err = run_eval(capsys, "--scenes", tmp_path, "--out", tmp_path / "o")
    assert_error(code, err, "s_mask.hdr", "negative")


def test_npy_npz_and_v73_cubes_stay_on_disk(tmp_path):
    cube = cube_of(np.int16, (9, 6, 3))
    gt = np.zeros((9, 6), np.uint8)
    gt[1, 2] = 1
    np.save(tmp_path / "a.npy", cube)
    np.savez(tmp_path / "b.npz", data=cube, map=gt)
    np.savez_compressed(tmp_path / "c.npz", data=cube, map=gt)
    write_mat73(tmp_path / "d.mat", data=cube, map=gt)
    for name, on_disk in [("a.npy", True), ("b.npz", True), ("c.npz", False),
                          ("d.mat", True)]:
        scene = data.open_scene(tmp_path / name)
        assert isinstance(scene.cube, data.DiskCube) == on_disk, name
        np.testing.assert_array_equal(scene.cube[2:7], cube[2:7])
        np.testing.assert_array_equal(data.load_scene(tmp_path / name).cube, cube)
        if name != "a.npy":
            np.testing.assert_array_equal(scene.gt, gt)


def _damage(tmp_path, case):
    cube = cube_of(np.int16, (12, 12, 4))
    hdr = write_envi(tmp_path / "s.hdr", cube, wavelength=[1, 2, 3, 4])
    img = tmp_path / "s.img"
    text = hdr.read_text()
    if case == "no data file":
        img.unlink()
    elif case == "short":
        img.write_bytes(img.read_bytes()[:-10])
    elif case == "long":
        img.write_bytes(img.read_bytes() + b"\0" * 8)
    elif case == "no lines":
        hdr.write_text(text.replace("lines = 12\n", ""))
    elif case == "data type":
        hdr.write_text(text.replace("data type = 2", "data type = 7"))
    elif case == "interleave":
        hdr.write_text(text.replace("interleave = bil", "interleave = bxl"))
    elif case == "complex":
        hdr.write_text(text.replace("data type = 2", "data type = 6")
                       .replace("samples = 12", "samples = 3"))
    elif case == "wavelengths":
        hdr.write_text(text.replace("bands = 4", "bands = 2")
                       .replace("samples = 12", "samples = 24"))
    elif case == "not envi":
        hdr.write_text("NOPE\n" + text)
    return hdr


BAD = {"no data file": "without its data file", "short": "truncated",
       "long": "longer than the header says", "no lines": "'lines'",
       "data type": "unknown ENVI data type 7", "interleave": "unknown ENVI interleave",
       "complex": "complex data", "wavelengths": "wavelength list has 4 values for 2",
       "not envi": "not an ENVI header"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_envi_one_line_errors(tmp_path, capsys, case):
    hdr = _damage(tmp_path, case)
    code, err = run_eval(capsys, "--scenes", hdr, "--out", tmp_path / "out")
    assert_error(code, err, hdr, BAD[case])
    assert not (tmp_path / "out" / "results.json").exists()
    with pytest.raises(InputError):
        data.open_scene(hdr)


def test_data_file_given_instead_of_header(tmp_path):
    write_envi(tmp_path / "s.hdr", cube_of(np.int16))
    with pytest.raises(InputError, match="give its header"):
        data.open_scene(tmp_path / "s.img")
