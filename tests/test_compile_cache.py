"""The scripts' persistent compilation cache (fers_jax.cli): a second run
of the same command loads its compiled programs instead of compiling them,
and gives the same results; FERS_JAX_CACHE=off keeps nothing."""

import json
import os
import subprocess
import sys

from conftest import CHECKPOINTS, REPO, SCENES
from fers_jax import cli


def _evaluate(out, env):
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--scenes",
                    str(SCENES / "pavia-car.mat"), "--method", "ferd",
                    "--bands", "50", "--teacher", str(CHECKPOINTS / "50bands"),
                    "--no-plots", "--out", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True)
    return json.loads((out / "results.json").read_text())


def _env(cache):
    # Every compile cached, however short (JAX's default keeps those of 1 s+).
    return dict(os.environ, FERS_JAX_CACHE=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def test_second_run_reads_the_cache_and_agrees(tmp_path):
    cache = tmp_path / "xla"
    first = _evaluate(tmp_path / "a", _env(cache))
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run kept no compiled program"
    second = _evaluate(tmp_path / "b", _env(cache))
    # Nothing new to compile: the same programs, read back.
    assert sorted(p.name for p in cache.iterdir()) == entries
    # The same executables: the same AUC to the last bit.
    assert [s["auc"] for s in second["scenes"]] == [s["auc"] for s in first["scenes"]]


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FERS_JAX_CACHE", "off")
    assert cli.compilation_cache_dir() is None
    monkeypatch.delenv("FERS_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_dir() == tmp_path / "fers_jax" / "xla"
