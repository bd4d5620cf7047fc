"""benchmarks/summarise_runs.py's held-out selection (issue 10): each scene
is scored at the epoch the *other* scenes pick, so a run's figure cannot
profit from choosing its epoch on the scene it is scored on."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "summarise_runs.py"


@pytest.fixture(scope="module")
def summarise():
    spec = importlib.util.spec_from_file_location("summarise_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _epoch(e, aucs, collapsed=False):
    return {"kind": "epoch", "epoch": e, "step": 10 * e, "collapsed": collapsed,
            "val_auc": dict(zip("abc", aucs)), "val_mauc": sum(aucs) / 3,
            "scale": {"spa_max": 1.0}}


def test_held_out_picks_by_the_other_scenes(summarise):
    records = [_epoch(1, [0.9, 0.5, 0.5]), _epoch(2, [0.5, 0.8, 0.8]),
               _epoch(3, [0.6, 0.7, 0.9])]  # each scene alone picks 1, 2, 3
    held, picked = summarise.held_out(records)
    # a: b+c means 0.5, 0.8, 0.8 -> epoch 3 (ties: later); b: a+c 0.7, 0.65,
    # 0.75 -> 3; c: a+b 0.7, 0.65, 0.65 -> 1.
    assert picked == {"a": 3, "b": 3, "c": 1}
    assert held == pytest.approx((0.6 + 0.7 + 0.5) / 3)


def test_summary_skips_collapsed_epochs(summarise, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [_epoch(1, [0.6, 0.6, 0.6]), _epoch(2, [0.9, 0.9, 0.9], True),
               _epoch(3, [0.7, 0.7, 0.7])]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"seed": 0}))
    row = summarise.best_of(run, 8)
    assert (row["epoch"], row["held_out_mauc"]) == (3, pytest.approx(0.7))
    assert row["last_epoch_mauc"] == pytest.approx(0.7)
    assert row["collapsed_epochs"] == [2]
