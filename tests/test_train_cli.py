"""train.py: options, one-line errors, a tiny run end to end."""

import json
import subprocess
import sys

import pytest

import train
from conftest import BACKGROUND, REPO
from fers_jax import cli


def test_help_documents_every_option_with_defaults():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--data", "--bands", "--out", "--teacher", "--epochs",
                   "--batch-size", "--steps", "--val", "--select", "--resume",
                   "--imagenet", "--config", "--seed", "--sensor", "--trunk-bn"):
        assert option in out, option
    text = " ".join(out.split())
    assert "(default: 60)" in text and "(default: 16)" in text
    assert "820 for 200 bands" in text


@pytest.mark.parametrize("argv,message", [
    (["stage2", "--bands", "20"], "stage 2 needs --teacher"),
    (["stage1", "--bands", "20", "--config", "tiny", "--imagenet", "x.pth"],
     "--imagenet weights fit only --config full"),
    (["stage1", "--bands", "20", "--batch-size", "0"], "batch_size must be"),
    (["stage1", "--bands", "20", "--config", "tiny", "--patch-size", "30"],
     "divisible by 8"),
])
def test_user_errors_are_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = argv + ["--data", str(BACKGROUND), "--out", str(tmp_path / "run")]
    assert cli.run(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_tiny_run_and_resume_refusal(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["stage1", "--data", str(BACKGROUND), "--bands", "20", "--config",
            "tiny", "--patch-size", "24", "--batch-size", "4", "--steps", "2",
            "--out", str(out), "--quiet"]
    assert cli.run(train.main, argv) == 0
    assert "WARNING: no --imagenet" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2
    assert cli.run(train.main, argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.run(train.main, argv + ["--resume"]) == 0  # already done
