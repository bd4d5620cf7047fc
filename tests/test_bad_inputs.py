"""Bad inputs at every entry point: one clear error, no traceback, no half output.

Entry points: evaluate.py, train.py, `python -m fers_jax.convert`,
`python -m fers_jax.datasets.layout` and the Python API (data.load_scene,
detectors.rx/lrx/crd, checkpoints.load_teacher/load_student,
metrics.roc_auc). Every refusal must name the file (or the option) and the
problem, exit with code 2 (argparse's own errors: 2 with its usage line),
and leave no results.json behind. Most cases call the CLIs in-process
(`cli.run(main, argv)`, the exact code path of the scripts); a few run the
scripts as subprocesses to check what a user sees on the terminal.

Unwritable output folders: the tests run as root, for whom chmod does not
stop writes, so they use a path under a regular *file* (`file/sub`) and a
path in /proc, which no user can create.

Cases already covered elsewhere are not repeated: test_data (ambiguous and
missing keys, truncated .mat/.npz through load_scene, v7.3), test_torch_io
(every damaged or malicious .pt through torch_io.load), test_convert (kind
and band refusals of the converters), test_training (resume with other
settings, interrupted and non-finite runs in-process), test_train_cli
(--batch-size 0, --imagenet with tiny sizes, stage 2 without a teacher).
"""

import argparse
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import evaluate
import train
from conftest import CHECKPOINTS, GOLDEN, REPO, SCENES, BACKGROUND
from fers_jax import (checkpoints, cli, convert, data, detectors, evaluation,
                      metrics)
from fers_jax.datasets import layout
from fers_jax.errors import CheckpointError, InputError
from test_torch_io import RunsCommand, Store, write_zip, zip_with_pickle

STUDENT_PT = GOLDEN / "spa_fen_random_50bands.pt"
FRN_PT = GOLDEN / "frn_random_50bands.pt"
RNG = np.random.default_rng(0)


# --- Helpers -----------------------------------------------------------------

def scene(path, h=12, w=12, b=6, **arrays):
    """A small random scene with one anomaly pixel; `arrays` override keys."""
    gt = np.zeros((h, w), np.uint8)
    gt[3, 4] = 1
    content = {"data": RNG.random((h, w, b)).astype(np.float32), "map": gt}
    content.update(arrays)
    content = {k: v for k, v in content.items() if v is not None}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **content)
    return pathlib.Path(path)


def cut(src, dst, n):
    """dst = the first n bytes of src (a truncated download)."""
    pathlib.Path(dst).write_bytes(pathlib.Path(src).read_bytes()[:n])
    return pathlib.Path(dst)


def junk(dst, head=b""):
    pathlib.Path(dst).write_bytes(head + b"this is not what it claims to be\n" * 20)
    return pathlib.Path(dst)


def call(main, argv, capsys):
    """(exit code, stderr) of a CLI main run as its script runs it."""
    code = cli.run(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_error(code, err, *needles):
    """Exit code 2 and exactly one 'error: ...' line holding every needle."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def run_eval(capsys, *argv, plots=False):
    extra = ["--quiet"] + ([] if plots else ["--no-plots"])
    return call(evaluate.main, list(argv) + extra, capsys)


def script(*argv, env=None):
    """Runs a script or module of the repository as a user would."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO,
                          capture_output=True, env=env, timeout=300)


def assert_script_error(proc, *needles):
    """Exit 2, stderr one line 'error: ...' (UTF-8) with every needle."""
    err = proc.stderr.decode("utf-8")  # strict: a mangled path fails here
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])


def had100(root, png="ok", shape=(12, 12)):
    """A one-image HAD100 root; png: 'ok', 'missing', 'corrupt' or 'small'."""
    (root / "test" / "aviris_ng").mkdir(parents=True)
    (root / "ground_truth" / "aviris_ng").mkdir(parents=True)
    image = root / "test" / "aviris_ng" / "img1.npy"
    np.save(image, RNG.random(shape + (6,)).astype(np.float32))
    target = root / "ground_truth" / "aviris_ng" / "img1.png"
    rgb = np.zeros(shape + (3,), np.uint8)
    rgb[2, 3, 1] = 255
    if png == "ok":
        Image.fromarray(rgb).save(target)
    elif png == "corrupt":
        junk(target, b"\x89PNG\r\n\x1a\n")
    elif png == "small":
        Image.fromarray(rgb[:5, :5]).save(target)
    return root


def orbax_of_kind(folder, kind):
    """A fers_jax checkpoint of `kind` made from the golden PyTorch files."""
    src = {"frn": FRN_PT, "student": STUDENT_PT}[kind]
    variables, config = convert.convert_file(kind, src, 50)
    return checkpoints.save_variables(folder, variables,
                                      checkpoints.model_meta(kind, config))


@pytest.fixture(scope="module")
def frn_orbax(tmp_path_factory):
    return orbax_of_kind(tmp_path_factory.mktemp("orbax") / "frn", "frn")


@pytest.fixture(scope="module")
def pavia_crop(tmp_path_factory):
    """A 20 x 20 crop of pavia-car (102 bands) holding some of its anomalies."""
    s = data.load_scene(SCENES / "pavia-car.mat")
    ys, xs = np.nonzero(s.gt)
    y0, x0 = max(int(ys[0]) - 6, 0), max(int(xs[0]) - 6, 0)
    path = tmp_path_factory.mktemp("pavia") / "pavia_crop.npz"
    np.savez(path, data=s.cube[y0:y0 + 20, x0:x0 + 20],
             map=s.gt[y0:y0 + 20, x0:x0 + 20])
    assert 0 < s.gt[y0:y0 + 20, x0:x0 + 20].sum() < 400
    return path


# --- evaluate.py: damaged and wrong scene files ------------------------------

def _mat_cut(d):
    return cut(SCENES / "pavia-car.mat", d / "cut.mat", 5000)


def _npz_cut(d):
    return cut(scene(d / "full.npz", 30, 30, 20), d / "cut.npz", 900)


def _npy_cut(d):
    np.save(d / "full.npy", RNG.random((12, 12, 6)))
    return cut(d / "full.npy", d / "cut.npy", 100)


def _npy_pickle(d):
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object),
            allow_pickle=True)
    return d / "objects.npy"


def _mask(values):
    def make(d):
        return scene(d / "mask.npz", map=np.asarray(values))
    return make


def _cube(values):
    def make(d):
        return scene(d / "cube.npz", data=np.asarray(values), map=None)
    return make


def _with_nan(d):
    cube = RNG.random((12, 12, 6))
    cube[4, 5, 2] = np.nan
    cube[1, 1, 1] = np.nan
    return scene(d / "nan.npz", data=cube)


def _with_inf(d):
    cube = RNG.random((12, 12, 6))
    cube[0, 0, 0] = np.inf
    return scene(d / "inf.npz", data=cube)


def _negative_mask(d):
    gt = np.zeros((12, 12))
    gt[2, 2] = -1
    return scene(d / "neg.npz", map=gt)


def _nan_mask(d):
    gt = np.zeros((12, 12))
    gt[2, 2] = np.nan
    return scene(d / "nanmask.npz", map=gt)


SCENE_CASES = {
    # case: (make the file in folder d, extra options, the problem in the message)
    "mat_truncated": (_mat_cut, [], "not a readable MATLAB file"),
    "mat_corrupt": (lambda d: junk(d / "junk.mat"), [], "not a readable MATLAB"),
    "npz_truncated": (_npz_cut, [], "not a readable .npz file"),
    "npz_corrupt": (lambda d: junk(d / "junk.npz"), [], "not a zip archive"),
    "npy_truncated": (_npy_cut, [], "not a readable .npy file"),
    "npy_corrupt": (lambda d: junk(d / "junk.npy"), [], "no NumPy .npy header"),
    "npy_pickled_objects": (_npy_pickle, [], "Object arrays cannot be loaded"),
    "unknown_suffix": (lambda d: junk(d / "scene.tif"), [], "unknown scene format"),
    "wrong_keys": (lambda d: scene(d / "k.npz", data=None, map=None,
                                    labels=np.zeros(5), name=np.array("x")),
                   [], "no 3-D cube found; keys found"),
    "cube_key_missing": (lambda d: scene(d / "k.npz"), ["--cube-key", "radiance"],
                         "no key 'radiance' for the cube"),
    "gt_key_missing": (lambda d: scene(d / "k.npz"), ["--gt-key", "truth"],
                       "no key 'truth' for the mask"),
    "cube_2d": (_cube(np.zeros((12, 12))), [], "no 3-D cube found"),
    "cube_4d": (_cube(np.zeros((2, 12, 12, 6))), [], "no 3-D cube found"),
    "cube_strings": (lambda d: scene(d / "s.npz", data=np.full((4, 4, 2), "a")),
                     ["--cube-key", "data"], "not real numbers"),
    "cube_complex": (_cube(RNG.random((6, 6, 3)) * 1j), [], "not real numbers"),
    "cube_nan": (_with_nan, [], "the cube has 2 NaN or Inf values"),
    "cube_inf": (_with_inf, [], "the cube has 1 NaN or Inf values"),
    "cube_constant": (lambda d: scene(d / "flat.npz", data=np.full((12, 12, 6), 7.0)),
                      [], "the cube is constant"),
    "mask_wrong_shape": (_mask(np.zeros((5, 4))), [], "the mask is (5, 4)"),
    "mask_transposed": (lambda d: scene(d / "t.npz", 12, 10,
                                        map=np.zeros((10, 12))),
                        [], "the mask is (10, 12) but the cube is (12, 10)"),
    "mask_negative": (_negative_mask, [], "negative values"),
    "mask_nan": (_nan_mask, [], "the mask has NaN or Inf"),
    "mask_strings": (_mask(np.full((12, 12), "x")), [], "not numbers"),
    # under a standard name but of no usable shape: refused, not dropped
    "mask_named_but_unusable": (lambda d: scene(d / "g.npz", map=None,
                                                gt=np.zeros((12, 12, 2))),
                                [], "the mask [gt] has shape (12, 12, 2), not "
                                    "(H, W): it cannot be used"),
}


@pytest.mark.parametrize("case", sorted(SCENE_CASES))
def test_evaluate_refuses_bad_scene_files(tmp_path, capsys, case):
    make, options, problem = SCENE_CASES[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", path, "--out", out, *options)
    assert_error(code, err, path, problem)
    assert not (out / "results.json").exists()


# --- evaluate.py: options ----------------------------------------------------

OPTION_CASES = {
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size must be at least 1"]),
    "batch_size_negative": (["--batch-size", "-4"], ["--batch-size", "-4"]),
    "bands_zero": (["--bands", "0"], ["{scene}", "band count must be positive"]),
    "bands_too_many": (["--bands", "7"], ["{scene}", "has 6 bands, fewer than the 7"]),
    "start_band_outside": (["--start-band", "6"],
                           ["{scene}", "start band 6 is outside its 6 bands"]),
    "inner_even": (["--method", "lrx", "--inner", "4", "--outer", "7"],
                   ["{scene}", "inner window must be odd"]),
    "inner_not_smaller": (["--method", "crd", "--inner", "7", "--outer", "7"],
                          ["{scene}", "inner window (7) must be smaller"]),
    "outer_larger_than_scene": (["--method", "lrx", "--outer", "13"],
                                ["{scene}", "outer window (13) is larger than the "
                                 "image (12 x 12"]),
    "lambda_negative": (["--method", "crd", "--outer", "5", "--lambda", "-1"],
                        ["{scene}", "lam must be finite and >= 0"]),
    "delta_zero": (["--method", "lrx", "--outer", "5", "--delta", "0"],
                   ["--delta must be > 0"]),
    "ferd_without_teacher": (["--method", "ferd"], ["--method ferd needs --teacher"]),
    "fers_without_student": (["--method", "fers",
                              "--teacher", str(CHECKPOINTS / "50bands")],
                             ["--method fers needs --student"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_evaluate_refuses_bad_options(tmp_path, capsys, case):
    options, needles = OPTION_CASES[case]
    path = scene(tmp_path / "s.npz")
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", path, "--out", out, *options)
    assert_error(code, err, *[n.format(scene=path) for n in needles])
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("options,problem", [
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--method", "svm"], "argument --method: invalid choice: 'svm'"),
])
def test_evaluate_argparse_errors_exit_2_with_usage(tmp_path, capsys, options, problem):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--scenes", str(tmp_path), "--out", str(tmp_path / "o"),
                       *options])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and problem in err and "Traceback" not in err


# --- evaluate.py: folders and outputs ----------------------------------------

def test_missing_path_empty_folder_and_folder_without_scenes(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", tmp_path / "absent", "--out", out)
    assert_error(code, err, tmp_path / "absent", "no such file or folder")
    (tmp_path / "empty").mkdir()
    code, err = run_eval(capsys, "--scenes", tmp_path / "empty", "--out", out)
    assert_error(code, err, tmp_path / "empty", "no scene files found")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("scenes come later\n")
    code, err = run_eval(capsys, "--scenes", tmp_path / "notes", "--out", out)
    assert_error(code, err, tmp_path / "notes", "no scene files found")
    assert not out.exists()  # inputs are checked before the folder is made


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "proc"])
def test_unwritable_output_folder(tmp_path, capsys, where):
    # Root ignores chmod: a path below a regular file, or in /proc, cannot be
    # created by anyone.
    (tmp_path / "file").write_text("a regular file\n")
    out = {"under_a_file": tmp_path / "file" / "sub",
           "is_a_file": tmp_path / "file",
           "proc": pathlib.Path("/proc/fers_jax_out")}[where]
    code, err = run_eval(capsys, "--scenes", scene(tmp_path / "s.npz"), "--out", out)
    assert_error(code, err, out, "cannot create the output folder")
    assert (tmp_path / "file").read_text() == "a regular file\n"


def test_had100_root_faults(tmp_path, capsys):
    root = had100(tmp_path / "missing", png="missing")
    code, err = run_eval(capsys, "--scenes", root, "--out", tmp_path / "o")
    png = root / "ground_truth" / "aviris_ng" / "img1.png"
    assert_error(code, err, root / "test" / "aviris_ng" / "img1.npy",
                 f"without its ground-truth PNG {png}")
    root = had100(tmp_path / "corrupt", png="corrupt")
    code, err = run_eval(capsys, "--scenes", root, "--out", tmp_path / "o")
    assert_error(code, err, root / "ground_truth" / "aviris_ng" / "img1.png",
                 "not a readable PNG")
    root = had100(tmp_path / "small", png="small")
    code, err = run_eval(capsys, "--scenes", root, "--out", tmp_path / "o")
    assert_error(code, err, "img1.png", "the mask is (5, 5) but the cube is (12, 12)")
    root = had100(tmp_path / "ok")
    code, err = run_eval(capsys, "--scenes", root, "--sensor", "aviris",
                         "--out", tmp_path / "o")
    assert_error(code, err, root, "test/aviris", "no scene files found")
    assert not (tmp_path / "o" / "results.json").exists()
    # the complete root works, and its train split needs no masks
    (root / "train" / "aviris_ng").mkdir(parents=True)
    np.save(root / "train" / "aviris_ng" / "bg.npy", np.ones((4, 4, 2)) * [1, 2])
    assert data.load_scene(root / "train" / "aviris_ng" / "bg.npy").gt is None
    code, err = run_eval(capsys, "--scenes", root, "--out", tmp_path / "o")
    assert code == 0, err
    row, = json.loads((tmp_path / "o" / "results.json").read_text())["scenes"]
    assert row["name"] == "img1" and 0 <= row["auc"] <= 1


# --- Things that must work ---------------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("rx", []), ("lrx", ["--outer", "5"]), ("crd", ["--outer", "5"])])
def test_constant_bands_still_work(tmp_path, capsys, method, options):
    # A dead detector band makes the covariance singular: the pseudo-inverse
    # drops it and the maps stay finite, the AUC defined.
    # Its own generator: the module's RNG state depends on the tests before.
    cube = np.random.default_rng(2).random((12, 12, 6))
    cube[..., 2] = 0.25
    cube[..., 4] = 0.0
    cube[3, 4, [0, 1, 3, 5]] += 0.5  # the anomaly, in the live bands
    path = scene(tmp_path / "deadband.npz", data=cube)
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", path, "--method", method,
                         "--out", out, *options)
    assert code == 0, err
    row, = json.loads((out / "results.json").read_text())["scenes"]
    score_map = np.load(out / "maps" / "deadband.npy")
    assert np.isfinite(score_map).all() and score_map.std() > 0
    assert 0.5 < row["auc"] <= 1


def test_mask_values_above_zero_are_anomalies(tmp_path, capsys):
    # Decision (documented in data.check_mask): 0 = background, any value > 0
    # = anomaly (0/1, 0/255 images, label maps 1, 2, ...); negatives refused.
    cube = RNG.random((12, 12, 6))
    labels = np.zeros((12, 12))
    labels[1, 1], labels[5, 6], labels[9, 9], labels[2, 7] = 1, 2, 255, 0.5
    for where in [(1, 1), (5, 6), (9, 9), (2, 7)]:
        cube[where] += 1.0
    path = scene(tmp_path / "labels.npz", data=cube, map=labels)
    got = data.load_scene(path)
    assert got.gt.dtype == np.uint8 and set(np.unique(got.gt)) == {0, 1}
    np.testing.assert_array_equal(got.gt, labels > 0)
    binary = scene(tmp_path / "binary.npz", data=cube, map=labels > 0)
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", path, binary, "--out", out)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["scenes"]
    assert rows[0]["auc"] == rows[1]["auc"] > 0.9
    # an (H, W, 1) mask is a mask too (named: automatic search wants 2-D)
    assert data.load_scene(scene(tmp_path / "c.npz", map=labels[..., None]),
                           gt_key="map").gt.sum() == 4


def test_non_ascii_paths_work_and_print(tmp_path, capsys):
    folder = tmp_path / "données" / "场景"
    path = scene(folder / "scène_1.npz")
    out = folder / "résultats"
    code, err = run_eval(capsys, "--scenes", folder, "--out", out, plots=True)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["scenes"][0]["name"] == "scène_1"
    assert results["scenes"][0]["path"] == str(path)
    assert (out / "maps" / "scène_1.npy").is_file()
    assert "scène_1" in (out / "report.html").read_text(encoding="utf-8")
    broken = junk(folder / "abîmé.mat")
    code, err = run_eval(capsys, "--scenes", broken, "--out", out)
    assert_error(code, err, broken, "not a readable MATLAB file")


# --- evaluate.py: checkpoints ------------------------------------------------

def _teacher_folder_with(d, **files):
    folder = d / "teacher"
    folder.mkdir()
    for name, make in files.items():
        make(folder / name)
    return folder


def _unrelated_pt(path):
    store = Store()
    obj = {"fc.weight": store.tensor(np.ones((3, 4), np.float32)),
           "fc.bias": store.tensor(np.zeros(3, np.float32))}
    return write_zip(path, obj, store)


CHECKPOINT_CASES = {
    # case: (options, made by fn(tmp) -> path, problem)
    "teacher_missing": ("--teacher", lambda d: d / "nothing", "does not exist"),
    "teacher_empty_folder": ("--teacher", lambda d: _teacher_folder_with(d),
                             "has no convh.pt"),
    "teacher_is_a_student_file": ("--teacher", lambda d: STUDENT_PT,
                                  "is neither the published folder"),
    "teacher_random_pt": ("--teacher", lambda d: _unrelated_pt(d / "net.pt"),
                          "is neither the published folder"),
    "teacher_truncated_pt": ("--teacher", lambda d: _teacher_folder_with(
        d, **{"convh.pt": lambda p: cut(CHECKPOINTS / "50bands" / "convh.pt", p, 4000)}),
        "truncated or corrupt zip"),
    "student_is_the_teacher_folder": ("--student", lambda d: CHECKPOINTS / "50bands",
                                      "is a folder; expected a .pt/.pth file"),
    "student_random_pt": ("--student", lambda d: _unrelated_pt(d / "net.pt"),
                          "has no 'initial_conv.conv.weight': not a student"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_evaluate_refuses_wrong_checkpoints(tmp_path, capsys, case):
    option, make, problem = CHECKPOINT_CASES[case]
    ckpt = make(tmp_path)
    method = ["--method", "fers", "--teacher", str(CHECKPOINTS / "50bands")] \
        if option == "--student" else ["--method", "ferd"]
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", scene(tmp_path / "s.npz", b=50),
                         "--out", out, "--bands", "50", *method, option, ckpt)
    assert_error(code, err, ckpt, problem)
    assert not (out / "results.json").exists()


def test_fers_jax_checkpoint_of_another_kind(tmp_path, capsys, frn_orbax):
    s = scene(tmp_path / "s.npz", b=50)
    code, err = run_eval(capsys, "--scenes", s, "--method", "ferd", "--teacher",
                         frn_orbax, "--out", tmp_path / "o")
    assert_error(code, err, frn_orbax, "holds a frn checkpoint, not teacher or stage1")
    code, err = run_eval(capsys, "--scenes", s, "--method", "fers", "--teacher",
                         CHECKPOINTS / "50bands", "--student", frn_orbax,
                         "--out", tmp_path / "o")
    assert_error(code, err, frn_orbax, "holds a frn checkpoint, not student")


def test_band_counts_against_the_checkpoint(tmp_path, capsys, pavia_crop):
    # pavia-car has 102 bands: 100 from band 0 (or 2) fit the 100-band
    # teacher, 100 from band 3 and 200 bands do not; a 100-band teacher is
    # no 50-band one.
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", pavia_crop, "--method", "ferd",
                         "--teacher", CHECKPOINTS / "100bands", "--bands", "100",
                         "--start-band", "2", "--out", out)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["scenes"][0]["auc"] > 0.5
    code, err = run_eval(capsys, "--scenes", pavia_crop, "--method", "ferd",
                         "--teacher", CHECKPOINTS / "100bands", "--start-band", "3",
                         "--out", tmp_path / "o3")
    assert_error(code, err, pavia_crop, "has 102 bands, fewer than the 100 asked "
                                        "for from band 3")
    code, err = run_eval(capsys, "--scenes", pavia_crop, "--method", "ferd",
                         "--teacher", CHECKPOINTS / "200bands", "--bands", "200",
                         "--out", tmp_path / "o200")
    assert_error(code, err, pavia_crop, "has 102 bands, fewer than the 200")
    code, err = run_eval(capsys, "--scenes", pavia_crop, "--method", "ferd",
                         "--teacher", CHECKPOINTS / "100bands", "--bands", "50",
                         "--out", tmp_path / "o50")
    assert_error(code, err, CHECKPOINTS / "100bands", "has 100 bands",
                 "uses 50")
    for o in ("o3", "o200", "o50"):
        assert not (tmp_path / o / "results.json").exists()


# --- Security: no code from checkpoints, no writes outside --out -------------

def test_malicious_teacher_is_refused_end_to_end(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil_teacher"
    folder.mkdir()
    zip_with_pickle(folder / "convh.pt", pickle.dumps(
        {"state_dict": RunsCommand(f"touch {marker}")}, protocol=2))
    for name in ("enc.pt", "pc.pt"):
        (folder / name).write_bytes((CHECKPOINTS / "50bands" / name).read_bytes())
    out = tmp_path / "out"
    proc = script("evaluate.py", "--scenes", scene(tmp_path / "s.npz", b=50),
                  "--method", "ferd", "--teacher", folder, "--out", out, "--quiet")
    assert_script_error(proc, folder / "convh.pt", "refused",
                        "a checkpoint must never run code")
    assert not marker.exists()
    assert not (out / "results.json").exists()


def test_convert_refuses_malicious_pt_and_writes_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = zip_with_pickle(tmp_path / "spa_fen.pt", pickle.dumps(
        RunsCommand(f"touch {marker}"), protocol=2))
    code, err = call(convert.main, [evil, "--kind", "student", "--out",
                                    tmp_path / "ckpt"], capsys)
    assert_error(code, err, evil, "refused")
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name,expected", [
    ("../../escaped", "_.._escaped"), ("..", "scene"), ("a/b\\c", "a_b_c"),
    (".hidden", "hidden"), ("", "scene"), ("x\x00y\n", "x_y_"),
    ("场景 é", "场景 é")])
def test_safe_name(name, expected):
    assert evaluation.safe_name(name) == expected


def test_scene_names_cannot_write_outside_out(tmp_path, capsys, monkeypatch):
    # Names normally are file stems, but a dataset can store any name: make
    # open_scene (evaluation's loader) return hostile ones and check where
    # the files land.
    real = data.open_scene
    names = iter(["../../escaped", "..", "/etc/passwd"])

    def hostile(path, *args, **kwargs):
        s = real(path, *args, **kwargs)
        return data.Scene(next(names), s.cube, s.gt, s.path)
    monkeypatch.setattr(data, "open_scene", hostile)
    work = tmp_path / "a" / "b"
    for i in range(3):
        scene(work / "in" / f"s{i}.npz")
    before = set(tmp_path.rglob("*"))
    out = work / "out"
    code, err = run_eval(capsys, "--scenes", work / "in", "--out", out, plots=True)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["scenes"]
    assert [r["name"] for r in rows] == ["_.._escaped", "scene", "_etc_passwd"]
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p == out or out in p.parents for p in new)
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(
        f"{r['name']}.{ext}" for r in rows for ext in ("npy", "png"))


def test_a_file_named_dot_dot(tmp_path, capsys):
    path = scene(tmp_path / "...npz")  # its stem is '..'
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", path, "--out", out)
    assert code == 0, err
    assert (out / "maps" / "scene.npy").is_file()


# --- evaluate.py as a user runs it -------------------------------------------

def test_evaluate_script_one_line_error(tmp_path):
    broken = junk(tmp_path / "broken.mat")
    proc = script("evaluate.py", "--scenes", broken, "--out", tmp_path / "o")
    assert_script_error(proc, broken, "not a readable MATLAB file")


def test_evaluate_script_prints_non_ascii_paths_in_any_locale(tmp_path):
    (tmp_path / "données" / "场景").mkdir(parents=True)
    broken = junk(tmp_path / "données" / "场景" / "abîmé.npz")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    for locale in ({"LANG": "C.UTF-8"}, {"LC_ALL": "C"}):
        proc = script("evaluate.py", "--scenes", broken, "--out", tmp_path / "o",
                      env={**env, **locale})
        assert_script_error(proc, broken, "not a zip archive")


# --- python -m fers_jax.convert ----------------------------------------------

CONVERT_CASES = {
    "missing_src": (lambda d: [d / "absent.pt", "--kind", "frn"], "does not exist"),
    "teacher_folder_as_student": (lambda d: [CHECKPOINTS / "50bands", "--kind",
                                             "student"], "is a folder"),
    "student_file_as_teacher": (lambda d: [STUDENT_PT, "--kind", "teacher"],
                                "must be a folder holding convh.pt"),
    "frn_file_as_student": (lambda d: [FRN_PT, "--kind", "student"],
                            "not a student checkpoint"),
    "band_mismatch": (lambda d: [CHECKPOINTS / "50bands", "--kind", "teacher",
                                 "--bands", "100"], "has 50 bands"),
    "truncated_pt": (lambda d: [cut(FRN_PT, d / "frn.pt", 3000), "--kind", "frn"],
                     "truncated or corrupt zip"),
    "random_pt": (lambda d: [_unrelated_pt(d / "net.pt"), "--kind", "frn"],
                  "not a frn checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_refuses(tmp_path, capsys, case):
    make, problem = CONVERT_CASES[case]
    argv = make(tmp_path)
    code, err = call(convert.main, argv + ["--out", tmp_path / "ckpt"], capsys)
    assert_error(code, err, argv[0], problem)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc", "not_a_checkpoint"])
def test_convert_unwritable_or_foreign_out(tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious\n")
    out = {"under_a_file": tmp_path / "file" / "ckpt",
           "proc": pathlib.Path("/proc/fers_jax_ckpt"),
           "not_a_checkpoint": tmp_path / "mine"}[where]
    args = [FRN_PT, "--kind", "frn", "--out", out]
    code, err = call(convert.main, args + (["--overwrite"] if where == "not_a_checkpoint"
                                           else []), capsys)
    problem = {"under_a_file": "cannot create the checkpoint folder (Not a directory)",
               "proc": "cannot create the checkpoint folder",
               "not_a_checkpoint": "is not a fers_jax checkpoint; refusing to replace"}
    assert_error(code, err, out, problem[where])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious\n"


def test_convert_script_one_line_error(tmp_path):
    proc = script("-m", "fers_jax.convert", junk(tmp_path / "w.pt"), "--kind", "frn",
                  "--out", tmp_path / "o")
    assert_script_error(proc, tmp_path / "w.pt", "is not a PyTorch checkpoint")


# --- python -m fers_jax.datasets.layout --------------------------------------

def test_layout_refuses_bad_inputs(tmp_path, capsys):
    s = scene(tmp_path / "s.npz", 24, 24)
    (tmp_path / "file").write_text("x")
    code, err = call(layout.main, ["--scenes", tmp_path / "absent", "--out",
                                   tmp_path / "o"], capsys)
    assert_error(code, err, tmp_path / "absent", "no such file or folder")
    code, err = call(layout.main, ["--scenes", s, "--size", "8", "--out",
                                   tmp_path / "file" / "o"], capsys)
    assert_error(code, err, tmp_path / "file", "cannot write the layout")
    code, err = call(layout.main, ["--scenes", s, "--size", "8", "--sensor",
                                   "../../elsewhere", "--out", tmp_path / "o"], capsys)
    assert_error(code, err, "'../../elsewhere'", "must be a plain folder name")
    assert not (tmp_path / "elsewhere").exists()


# --- train.py ----------------------------------------------------------------

def _train_argv(tmp_path, *options, data=BACKGROUND):
    return ["stage1", "--data", data, "--bands", "20", "--config", "tiny",
            "--patch-size", "24", "--quiet", "--out", tmp_path / "run", *options]


TRAIN_CASES = {
    "data_missing": (lambda d: ["--data", d / "absent"], "{d}/absent", "no such file"),
    "data_empty_folder": (lambda d: ["--data", d / "empty"], "{d}/empty",
                          "no scene files found"),
    "data_corrupt": (lambda d: ["--data", junk(d / "x.npz")], "{d}/x.npz",
                     "not a zip archive"),
    "bands_beyond_data": (lambda d: ["--bands", "500"], "jasper-ridge.npz",
                          "has 198 bands, fewer than the 500"),
    "bands_zero": (lambda d: ["--bands", "0"], "bands", "must be a positive integer"),
    "patch_larger_than_scenes": (lambda d: ["--patch-size", "500"], "samson.npz",
                                 "no background patches"),
    "val_without_anomalies": (lambda d: ["--val", BACKGROUND / "samson.npz"],
                              "samson.npz", "the mask has no anomaly pixels"),
    "val_corrupt": (lambda d: ["--val", junk(d / "v.mat")], "{d}/v.mat",
                    "not a readable MATLAB file"),
    "out_under_a_file": (lambda d: ["--out", d / "file" / "run"], "{d}/file/run",
                         "cannot create the run folder"),
    "loss_weights_stage1": (lambda d: ["--loss-weights", "l1=0"], "--loss-weights",
                            "is a stage-2 option"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses(tmp_path, capsys, case):
    make, where, problem = TRAIN_CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    code, err = call(train.main, _train_argv(tmp_path, *make(tmp_path)), capsys)
    assert_error(code, err, where.format(d=tmp_path), problem)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("teacher,problem", [
    (STUDENT_PT, "is neither the published folder"),
    (CHECKPOINTS / "50bands", "has 50 bands, the model/scene uses 20"),
])
def test_train_stage2_teacher_faults(tmp_path, capsys, teacher, problem):
    argv = _train_argv(tmp_path, "--teacher", teacher)
    argv[0] = "stage2"
    code, err = call(train.main, argv, capsys)
    assert_error(code, err, teacher, problem)


def test_train_script_one_line_error(tmp_path):
    proc = script("train.py", *_train_argv(tmp_path, data=tmp_path / "absent"))
    assert_script_error(proc, tmp_path / "absent", "no such file or folder")


def test_train_stage2_fa_with_seeds_refused(tmp_path, capsys):
    argv = _train_argv(tmp_path, "--teacher", CHECKPOINTS / "50bands",
                       "--loss-weights", "fa=1", "--seeds", "2")
    argv[0] = "stage2"
    code, err = call(train.main, argv, capsys)
    assert_error(code, err, "--loss-weights fa with --seeds", "train each seed")
    assert not (tmp_path / "run").exists()


def test_train_stage2_bad_loss_weights(tmp_path, capsys):
    argv = _train_argv(tmp_path, "--teacher", CHECKPOINTS / "50bands",
                       "--loss-weights", "var=0.5,l1=lots")
    argv[0] = "stage2"
    code, err = call(train.main, argv, capsys)
    assert_error(code, err, "--loss-weights", "l1='lots' is not a number")


# --- Python API --------------------------------------------------------------

def test_load_scene_api(tmp_path):
    with pytest.raises(InputError, match="a folder, not a scene file"):
        data.load_scene(tmp_path)
    with pytest.raises(InputError, match="scene file not found"):
        data.load_scene(tmp_path / "absent.mat")
    with pytest.raises(InputError, match=r"junk\.npz: not a readable \.npz file"):
        data.load_scene(junk(tmp_path / "junk.npz"))


@pytest.mark.parametrize("detector", ["rx", "lrx", "crd"])
def test_detectors_refuse_what_they_cannot_score(detector):
    fn = {"rx": detectors.rx,
          "lrx": lambda c: detectors.lrx(c, 3, 5),
          "crd": lambda c: detectors.crd(c, 3, 5)}[detector]
    with pytest.raises(InputError, match=r"expected \(H, W, B\) or \(N, H, W, B\)"):
        fn(np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"expected .* got shape \(1, 1, 8, 8, 3\)"):
        fn(np.zeros((1, 1, 8, 8, 3)))
    cube = RNG.random((8, 8, 3))
    cube[2, 2, 1] = np.nan
    with pytest.raises(InputError, match="the cube has 1 NaN or Inf values"):
        fn(cube)
    with pytest.raises(InputError, match="the cube has 1 NaN or Inf values"):
        fn(jnp.asarray(np.where(np.isnan(cube), np.inf, cube)))
    with pytest.raises(InputError, match="not real numbers"):
        fn(np.full((8, 8, 3), "a"))


def test_detector_windows_and_settings():
    cube = RNG.random((8, 8, 3))
    with pytest.raises(InputError, match="inner window must be an int"):
        detectors.lrx(cube, 3.0, 5)
    with pytest.raises(InputError, match="chunk must be a positive int"):
        detectors.crd(cube, 3, 5, chunk=0)
    with pytest.raises(InputError, match="RX precision must be one of"):
        detectors.rx(cube, "float16")


def test_roc_auc_api():
    score = RNG.random((4, 6))
    gt = np.zeros((4, 6))
    gt[1, 2] = 1
    assert 0 <= metrics.roc_auc(score, gt) <= 1
    with pytest.raises(InputError, match="no ground-truth mask"):
        metrics.roc_auc(score, None)
    with pytest.raises(InputError, match=r"the map is \(4, 6\) but the mask is \(6, 4\)"):
        metrics.roc_auc(score, gt.T)
    with pytest.raises(InputError, match=r"the map is \(4, 6, 2\)"):
        metrics.roc_auc(np.stack([score, score], -1), gt)
    with pytest.raises(InputError, match="NaN or Inf"):
        metrics.roc_auc(np.where(gt > 0, np.nan, score), gt)
    with pytest.raises(InputError, match="no anomaly pixels"):
        metrics.roc_auc(score, np.zeros((4, 6)))
    with pytest.raises(InputError, match="holds <U1, not real numbers"):
        metrics.roc_auc(np.full((4, 6), "a"), gt)


def test_checkpoint_loaders_api(frn_orbax):
    with pytest.raises(CheckpointError, match="no teacher checkpoint given"):
        checkpoints.load_teacher(None)
    with pytest.raises(CheckpointError, match="100bands has 100 bands, the "
                                              "model/scene uses 50"):
        checkpoints.load_teacher(CHECKPOINTS / "100bands", 50)
    with pytest.raises(CheckpointError, match="enc.pt has no 'initial_conv"):
        checkpoints.load_student(CHECKPOINTS / "100bands" / "enc.pt")
    with pytest.raises(CheckpointError, match="holds a frn checkpoint, not student"):
        checkpoints.load_student(frn_orbax)


def test_mask_of_shape_h_w_1_under_a_standard_name_is_used(tmp_path):
    gt = np.zeros((12, 12, 1), np.uint8)
    gt[2, 5] = 1
    s = data.load_scene(scene(tmp_path / "g.npz", map=None, gt=gt))
    assert s.gt.shape == (12, 12) and s.gt[2, 5] == 1 and s.gt.sum() == 1


# --- What a new user hit: run folders, batch advice, paths as typed ----------

def _run_folder(root, kind, exports=("final",), scale=None):
    """A train.py run folder's layout: <root>/<export>/<kind> checkpoints
    (the golden student or the 50-band teacher); `scale` {export: factor}
    multiplies one export's variables, to tell the exports apart."""
    src = {"student": STUDENT_PT, "teacher": CHECKPOINTS / "50bands"}[kind]
    variables, config = convert.convert_file(kind, src, 50)
    (root / "checkpoints").mkdir(parents=True)
    for export in exports:
        factor = (scale or {}).get(export, 1.0)
        checkpoints.save_variables(
            root / export / kind, jax.tree.map(lambda a: a * factor, variables),
            checkpoints.model_meta(kind, config))
    return root


def test_evaluate_and_train_take_a_run_folder(tmp_path, capsys, pavia_crop):
    run = _run_folder(tmp_path / "s1", "teacher")
    out = tmp_path / "out"
    code, err = run_eval(capsys, "--scenes", pavia_crop, "--method", "ferd",
                         "--teacher", run, "--bands", "50", "--out", out)
    assert code == 0, err
    assert f"teacher: using {run / 'final' / 'teacher'} (from {run})" in err
    assert json.loads((out / "results.json").read_text())["scenes"][0]["auc"] > 0.5
    # train.py stage 2 resolves it the same way (its band check names it)
    argv = _train_argv(tmp_path, "--teacher", run)
    argv[0] = "stage2"
    code, err = call(train.main, argv, capsys)
    assert_error(code, err, run / "final" / "teacher",
                 "has 50 bands, the model/scene uses 20")


def test_run_folder_prefers_best_and_says_so(tmp_path, capsys):
    run = _run_folder(tmp_path / "s2", "student", ("best", "final"),
                      scale={"final": 2.0})
    _, got = checkpoints.load_student(run)
    assert f"student: using {run / 'best' / 'student'}" in capsys.readouterr().err
    _, best = checkpoints.load_student(run / "best" / "student")
    _, final = checkpoints.load_student(run / "final" / "student")
    leaves = lambda v: jax.tree.leaves(v)  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(got), leaves(best)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(got), leaves(final)))
    # an export folder names its part too
    _, got = checkpoints.load_student(run / "final")
    assert all(np.array_equal(a, b) for a, b in zip(leaves(got), leaves(final)))


def test_run_folder_without_a_finished_model(tmp_path, capsys):
    run = tmp_path / "s2"
    (run / "checkpoints").mkdir(parents=True)
    s = scene(tmp_path / "s.npz", b=50)
    code, err = run_eval(capsys, "--scenes", s, "--method", "fers", "--teacher",
                         CHECKPOINTS / "50bands", "--student", run,
                         "--out", tmp_path / "o")
    assert_error(code, err, run, "is a train.py run folder with no student model "
                                 "in best/ or final/")
    # a stage-1 run holds no student
    run1 = _run_folder(tmp_path / "s1", "teacher")
    with pytest.raises(CheckpointError, match="with no student model"):
        checkpoints.load_student(run1)


def test_train_says_which_settings_give_one_batch(tmp_path, capsys):
    import re
    import time
    from fers_jax.datasets import crops
    argv = _train_argv(tmp_path, "--patch-size", "64", "--batch-size", "16")
    start = time.perf_counter()
    code, err = call(train.main, argv, capsys)
    line = assert_error(code, err, BACKGROUND / "jasper-ridge.npz",
                        BACKGROUND / "samson.npz", "not one batch of 16")
    assert time.perf_counter() - start < 30  # before any model is built
    scenes = data.load_scenes([BACKGROUND])
    patches = lambda size, stride: len(crops.PatchSource(  # noqa: E731
        scenes, size, stride))
    n = int(re.search(r"give (\d+) background patches of 64x64 at stride 64",
                      line).group(1))
    assert n == patches(64, None) < 16
    assert f"--batch-size {n}" in line
    stride = int(re.search(r"--stride (\d+) \((\d+) patches\)", line).group(1))
    assert patches(64, stride) >= 16 > max(patches(64, t)
                                           for t in range(stride + 1, 64))
    size, count = map(int, re.search(r"--patch-size (\d+) \((\d+) patches\)",
                                     line).groups())
    assert size % 8 == 0  # what the stage-1 graph takes (pad 4)
    assert count == patches(size, None) >= 16
    assert all(patches(p, None) < 16 for p in range(size + 8, 64, 8))
    # the data set is in the message too when no setting helps
    code, err = call(train.main, _train_argv(
        tmp_path, "--patch-size", "64", "--batch-size", "10000"), capsys)
    assert_error(code, err, f"give {n} background patches",
                 f"not one batch of 10000; use --batch-size {n}")


def test_messages_name_paths_through_a_symbolic_link(tmp_path, capsys):
    """With the shared data behind a link (as ../shared may be), messages
    name the link's path as typed, not its target."""
    link = tmp_path / "shared"
    link.symlink_to(CHECKPOINTS.parents[2].resolve(), target_is_directory=True)
    ckpts = link / CHECKPOINTS.relative_to(CHECKPOINTS.parents[2])
    target = str(CHECKPOINTS.resolve())

    def named(err, *needles):
        line = assert_error(2, err, *needles)
        assert target not in line, line
    code, err = run_eval(capsys, "--scenes", scene(tmp_path / "s.npz", b=50),
                         "--out", tmp_path / "o", "--method", "fers", "--bands",
                         "50", "--teacher", ckpts / "50bands", "--student",
                         ckpts / "50bands")
    assert code == 2
    named(err, ckpts / "50bands", "is a folder")
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_teacher(ckpts / "100bands", 50)
    assert str(e.value).startswith(f"teacher checkpoint {ckpts / '100bands'} has")
    code, err = call(convert.main, [ckpts / "50bands", "--kind", "teacher",
                                    "--bands", "100", "--out", tmp_path / "c"],
                     capsys)
    named(err, ckpts / "50bands", "has 50 bands")
    argv = _train_argv(tmp_path, "--teacher", ckpts / "50bands")
    argv[0] = "stage2"
    code, err = call(train.main, argv, capsys)
    named(err, ckpts / "50bands", "has 50 bands")
    scenes = link / SCENES.relative_to(CHECKPOINTS.parents[2])
    code, err = run_eval(capsys, "--scenes", scenes / "pavia-car.mat", "--bands",
                         "500", "--out", tmp_path / "o")
    assert code == 2
    line = assert_error(code, err, scenes / "pavia-car.mat", "fewer than the 500")
    assert str(SCENES.resolve()) not in line


# --- --help: every option explained, with its default ------------------------

class _Parser(Exception):
    pass


def _parser_of(main, monkeypatch, argv=()):
    """The ArgumentParser that `main` builds, caught as it parses."""
    def capture(self, args=None, namespace=None):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parser) as e:
        main(list(argv))
    monkeypatch.undo()
    return e.value.args[0]


@pytest.mark.parametrize("name", ["evaluate.py", "train.py", "fers_jax.convert",
                                  "fers_jax.datasets.layout"])
def test_help_explains_every_option_and_its_default(name, monkeypatch):
    main = {"evaluate.py": evaluate.main, "train.py": train.main,
            "fers_jax.convert": convert.main,
            "fers_jax.datasets.layout": layout.main}[name]
    parser = _parser_of(main, monkeypatch)
    assert issubclass(parser.formatter_class, cli.HelpFormatter), name
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, (name, label)
        if not action.option_strings:
            continue  # positional: nothing to default
        text = " ".join(formatter._expand_help(action).split())
        assert "default" in text or "required" in text, (name, label, text)
        assert "(default: None)" not in text, (name, label, text)
        if action.required:
            assert text.endswith("(required)"), (name, label, text)
        elif isinstance(action, (argparse._StoreTrueAction,
                                 argparse._StoreFalseAction)):
            assert text.endswith("(default: off)"), (name, label, text)
        elif action.default not in (None, (), []):
            assert f"(default: {action.default})" in text, (name, label, text)


def test_help_runs_as_a_user_runs_it():
    proc = script("evaluate.py", "--help")
    assert proc.returncode == 0
    out = " ".join(proc.stdout.decode().split())
    assert ("--batch-size BATCH_SIZE scenes of one size scored in one call "
            "(default: 16)") in out
    assert "--out DIR output folder (required)" in out
