"""Faults: failures mid-run, signals, kills, NaN, and same-seed determinism.

Evaluation: a corrupt scene in the middle of a run aborts it with one
clear error (abort, not skip: a results.json that silently lacks a scene
would be read as the full result); results.json is written atomically, so
an earlier one stays byte for byte and no temporary file is left.

Training (train.py stage1 --config tiny on 24x24 patches of the shared
background scenes, 20 bands, run as a user runs it, in subprocesses):

* SIGTERM / SIGINT: the run saves a checkpoint at the next step boundary
  and exits with code 130 and a message; --resume continues from there.
* SIGKILL while a checkpoint is being written: the next run resumes from
  the last complete checkpoint and ends exactly where an uninterrupted run
  ends. To land the kill mid-save every time, the run is started through a
  small wrapper (written below, test-only, no hook in fers_jax) that makes
  Orbax's `CompositeCheckpointHandler.finalize` of the N-th save hang: at
  that point the checkpoint's files are in its temporary folder and not
  yet committed (renamed). The wrapper signals the moment with a marker
  file and the test sends SIGKILL.
* A NaN loss (the same wrapper turns the N-th batch into NaN, so the run
  shares the compiled step of the others) stops training with a one-line
  error and keeps the last good checkpoint.

The subprocesses share a persistent JAX compilation cache in pytest's cache
folder (.pytest_cache), so only the first run of the first session compiles.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

import evaluate
from conftest import BACKGROUND, REPO, SCENES
from fers_jax import checkpoints, cli
from fers_jax.evaluation import write_json_atomic
from fers_jax.training import config, loop

TIMING_FIELDS = ("seconds", "compile_seconds")
WAIT_S = 600  # the first run of a session compiles under a shared CPU

TRAIN = ["stage1", "--data", str(BACKGROUND), "--bands", "20", "--config", "tiny",
         "--patch-size", "24", "--batch-size", "4", "--seed", "5", "--quiet"]

WRAPPER = '''\
"""Runs train.py with faults injected (tests/test_faults.py).

FERS_FAULT_HANG_SAVE=N: the N-th checkpoint save hangs after writing its
  files, before committing them; FERS_FAULT_MARKER is written then.
FERS_FAULT_NAN_BATCH=N: the N-th training batch is all NaN.
"""
import os, pathlib, runpy, sys, time

hang_at = int(os.environ.get("FERS_FAULT_HANG_SAVE", "0"))
nan_at = int(os.environ.get("FERS_FAULT_NAN_BATCH", "0"))
if hang_at:
    import orbax.checkpoint as ocp
    original = ocp.CompositeCheckpointHandler.finalize
    saves = [0]

    def finalize(self, directory, *args, **kwargs):
        saves[0] += 1
        if saves[0] == hang_at:
            pathlib.Path(os.environ["FERS_FAULT_MARKER"]).write_text(str(directory))
            time.sleep(3600)
        return original(self, directory, *args, **kwargs)
    ocp.CompositeCheckpointHandler.finalize = finalize
if nan_at:
    import numpy as np
    from fers_jax import input_pipeline
    original_next = input_pipeline.Batches.__next__
    batches = [0]

    def next_batch(self):
        batch = original_next(self)
        batches[0] += 1
        return batch * np.nan if batches[0] == nan_at else batch
    input_pipeline.Batches.__next__ = next_batch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# --- Evaluation --------------------------------------------------------------

def _scene(path, seed):
    rng = np.random.default_rng(seed)
    gt = np.zeros((12, 12), np.uint8)
    gt[4, 5] = 1
    np.savez(path, data=rng.random((12, 12, 6)), map=gt)
    return path


def _eval(*argv):
    return cli.run(evaluate.main, [str(a) for a in argv] + ["--quiet", "--no-plots"])


def test_corrupt_scene_mid_run_aborts_and_keeps_earlier_results(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    _scene(scenes / "a_good.npz", 0)
    _scene(scenes / "c_good.npz", 1)
    out = tmp_path / "out"
    assert _eval("--scenes", scenes, "--out", out) == 0
    before = (out / "results.json").read_bytes()
    map_before = (out / "maps" / "a_good.npy").read_bytes()
    # A corrupt file after the good ones, then the run again with new
    # data in the first scene: it stops at the bad scene with one error,
    # and nothing it had done (the first scene's new map included) replaces
    # the earlier results.
    (scenes / "d_corrupt.npz").write_bytes(
        (scenes / "a_good.npz").read_bytes()[:700])
    _scene(scenes / "a_good.npz", 7)
    capsys.readouterr()
    # (batch size 1: the first scene is scored before the corrupt last one is read)
    assert _eval("--scenes", scenes, "--out", out, "--batch-size", 1) == 2
    err = capsys.readouterr().err
    assert f"error: {scenes / 'd_corrupt.npz'}: not a readable .npz file" in err
    assert "Traceback" not in err
    assert (out / "results.json").read_bytes() == before
    assert (out / "maps" / "a_good.npy").read_bytes() == map_before
    assert not list(out.glob(".results.json.*"))
    assert not list(out.glob(".staging-*"))
    # Without an earlier run there is no results.json at all.
    assert _eval("--scenes", scenes, "--out", tmp_path / "fresh") == 2
    assert not (tmp_path / "fresh" / "results.json").exists()
    assert not list((tmp_path / "fresh").glob(".results.json.*"))


def test_results_json_is_replaced_atomically(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"mean_auc": 0.9})
    before = path.read_bytes()
    with pytest.raises(ValueError):  # NaN is not JSON: the write fails midway
        write_json_atomic(path, {"mean_auc": 0.8, "scenes": [float("nan")]})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def _without_timing(results):
    results = json.loads(json.dumps(results))
    for row in results["scenes"]:
        for key in TIMING_FIELDS:
            assert row.pop(key) >= 0
    return results


@pytest.mark.parametrize("method,options,scenes", [
    ("rx", [], [SCENES / "pavia-car.mat", SCENES / "abu-beach-2.mat"]),
    ("crd", ["--outer", "5"], None),
])
def test_evaluation_is_deterministic(tmp_path, method, options, scenes):
    if scenes is None:
        scenes = [_scene(tmp_path / "s1.npz", 3), _scene(tmp_path / "s2.npz", 4)]
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        # The default --memory-budget is a reading of free RAM (recorded in
        # results.json); determinism is for the same settings, so fix it.
        assert _eval("--scenes", *scenes, "--method", method, *options,
                     "--memory-budget", "8", "--out", out) == 0
        runs.append((out, json.loads((out / "results.json").read_text())))
    (out0, res0), (out1, res1) = runs
    assert _without_timing(res0) == _without_timing(res1)
    for row in res0["scenes"]:
        name = f"{row['name']}.npy"
        assert (out0 / "maps" / name).read_bytes() == (out1 / "maps" / name).read_bytes()


# --- Training: same seed, same parameters (in-process) -----------------------

def _final_variables(out):
    variables, _ = checkpoints.load_variables(pathlib.Path(out) / "final" / "stage1")
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(jax.device_get(variables)).items()}


def _assert_same_variables(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_training_same_seed_gives_identical_parameters(tmp_path):
    def run(name, seed):
        out = tmp_path / name
        loop.train_and_evaluate(config.tiny("stage1", [str(BACKGROUND)], 20,
                                            str(out), steps=3, seed=seed))
        return _final_variables(out)
    first, second, other = run("a", 11), run("b", 11), run("c", 12)
    _assert_same_variables(first, second)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


# --- Training: signals, SIGKILL mid-save, NaN (subprocesses) -----------------

@pytest.fixture(scope="module")
def env(request, tmp_path_factory):
    if getattr(request.config, "cache", None) is not None:
        cache = request.config.cache.mkdir("fers_jax_jax_cache")
    else:  # -p no:cacheprovider: a cache for this session only
        cache = tmp_path_factory.mktemp("jax_cache")
    wrapper = tmp_path_factory.mktemp("wrapper") / "faulty_train.py"
    wrapper.write_text(WRAPPER)
    return {"env": {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"},
            "wrapper": wrapper}


def _start(env, out, *options, faults=None):
    """Starts train.py (through the fault wrapper when `faults` are given)."""
    argv = [str(REPO / "train.py"), *TRAIN, "--out", str(out), *map(str, options)]
    if faults:
        argv = [str(env["wrapper"])] + argv
    return subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**env["env"], **(faults or {})})


def _finish(proc, timeout=WAIT_S):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode() + err.decode(), err.decode()


def _wait_for(predicate, proc, what):
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (code {proc.returncode}) before "
                                 f"{what}: {_finish(proc)[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {WAIT_S} s")
        time.sleep(0.1)


def _steps(out):
    """(complete checkpoint steps, names of uncommitted temporary folders)."""
    folder = pathlib.Path(out) / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return (sorted(int(n) for n in names if n.isdigit()),
            sorted(n for n in names if not n.isdigit()))


def _resumed_at(text):
    """The step train.py says it resumed from, or None."""
    found = re.search(r"^resumed \w+ step (\d+)\b", text, re.MULTILINE)
    return int(found[1]) if found else None


def _metric_steps(out):
    lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    """6 steps, a checkpoint every 2, uninterrupted: what a resume must give."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code, text, _ = _finish(_start(env, out, "--steps", "6", "--checkpoint-every", "2"))
    assert code == 0, text
    return out


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(
        env, straight, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "in_save"
    proc = _start(env, out, "--steps", "6", "--checkpoint-every", "2",
                  faults={"FERS_FAULT_HANG_SAVE": "2",
                          "FERS_FAULT_MARKER": str(marker)})
    _wait_for(marker.exists, proc, "second checkpoint save")
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    complete, partial = _steps(out)
    assert complete == [2]
    assert partial and all(n.startswith("4.") for n in partial), partial

    code, text, err = _finish(_start(env, out, "--steps", "6",
                                     "--checkpoint-every", "2", "--resume"))
    assert code == 0, text
    assert _resumed_at(text) == 2 and "Traceback" not in err
    assert _steps(out) == ([6], [])  # the half-written step 4 is gone
    assert _metric_steps(out) == list(range(1, 7))
    _assert_same_variables(_final_variables(out), _final_variables(straight))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(env, tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(env, out, "--steps", "100000", "--checkpoint-every", "2")
    _wait_for(lambda: _steps(out)[0], proc, "first checkpoint")
    proc.send_signal(sig)
    code, text, err = _finish(proc, timeout=300)
    assert code == 130, text
    assert "Traceback" not in err and "error:" not in err, text
    (step,), partial = _steps(out)
    assert partial == []
    assert f"{sig.name}: stopped at step {step}; checkpoint saved in " in text
    assert "continue with --resume" in text
    assert _metric_steps(out) == list(range(1, step + 1))
    assert not (out / "summary.json").exists()
    if sig != signal.SIGTERM:
        return
    code, text, _ = _finish(_start(env, out, "--steps", str(step + 2),
                                   "--checkpoint-every", "2", "--resume"))
    assert code == 0, text
    assert _resumed_at(text) == step
    assert json.loads((out / "summary.json").read_text())["step"] == step + 2
    assert _metric_steps(out) == list(range(1, step + 3))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
        env, tmp_path):
    out = tmp_path / "run"
    code, text, err = _finish(_start(env, out, "--steps", "8",
                                     "--checkpoint-every", "2",
                                     faults={"FERS_FAULT_NAN_BATCH": "3"}))
    assert code == 2, text
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert re.match(r"error: non-finite loss\b.* at step 3 \(epoch 1\): loss=nan",
                    errors[0]), errors[0]
    assert errors[0].endswith(f"the last good checkpoint is step 2 in "
                              f"{out / 'checkpoints'}"), errors[0]
    assert _steps(out) == ([2], [])
    records = [json.loads(line) for line in
               (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["non_finite"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    # the kept checkpoint is good: the run resumes from it (with clean data)
    code, text, _ = _finish(_start(env, out, "--steps", "4", "--resume"))
    assert code == 0 and _resumed_at(text) == 2, text
    assert all(np.isfinite(v).all() for v in _final_variables(out).values())
