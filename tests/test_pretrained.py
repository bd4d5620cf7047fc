"""The registry of trained students (fers_jax.pretrained, issue 10): files
round-trip, a shared trunk is stored once, a damaged file or another
teacher is refused, the shipped models load and --list prints their cards."""

import json

import flax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluate
from conftest import CHECKPOINTS, SCENES, fake_variables
from fers_jax import checkpoints, cli, configs, pretrained
from fers_jax.errors import CheckpointError
from fers_jax.models import SpatialStudent

CARD = {"teacher": "t", "teacher_sha256": {}, "data": [], "settings": {},
        "steps": 1, "epoch": 1, "seed": 0, "date": "d", "code_commit": "c"}


def tiny_student(seed):
    config = configs.student_tiny(20)
    return config, fake_variables(SpatialStudent(config),
                                  jnp.zeros((1, 24, 24, 20)), seed=seed)


def test_write_load_roundtrip_and_one_shared_trunk(tmp_path):
    config, a = tiny_student(0)
    _, b = tiny_student(1)
    b["params"]["trunk"] = a["params"]["trunk"]          # same frozen trunk
    b["batch_stats"]["trunk"] = a["batch_stats"]["trunk"]
    ca = pretrained.write_model("a", a, config, CARD, tmp_path)
    cb = pretrained.write_model("b", b, config, CARD, tmp_path)
    assert ca["files"]["trunk"] == cb["files"]["trunk"]
    assert len(list(tmp_path.glob("trunk-*.npz"))) == 1
    model, got = pretrained.load("b", tmp_path)
    assert model.config == config
    want = flax.traverse_util.flatten_dict(b)
    got = flax.traverse_util.flatten_dict(got)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], np.asarray(want[k], np.float32))
    # A changed file is refused by its card's sha256.
    path = tmp_path / "b.npz"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="sha256"):
        pretrained.load("b", tmp_path)


@pytest.mark.parametrize("name,bands", [("fers-50", 50), ("fers-100", 100)])
def test_shipped_model_loads_and_refuses_another_teacher(name, bands):
    assert name in pretrained.names()
    card = pretrained.card(name)
    assert card["bands"] == bands and card["teacher_sha256"]
    model, variables = checkpoints.load_student(name, bands)
    spa_f = model.apply(variables, jnp.ones((1, 32, 32, bands)) * 0.5)["spa_f"]
    assert spa_f.shape == (1, 32, 32, bands) and bool(jnp.all(jnp.isfinite(spa_f)))
    pretrained.check_teacher(name, CHECKPOINTS / f"{bands}bands")
    other = 100 if bands == 50 else 50
    with pytest.raises(CheckpointError, match="not the teacher") as e:
        pretrained.check_teacher(name, CHECKPOINTS / f"{other}bands")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="bands"):
        checkpoints.load_student(name, other)


def test_evaluate_refuses_a_teacher_the_card_does_not_name(tmp_path, capsys):
    code = cli.run(evaluate.main, [
        "--scenes", str(SCENES / "abu-airport-2.mat"), "--method", "fers",
        "--teacher", str(CHECKPOINTS / "100bands"), "--student", "fers-50",
        "--bands", "50", "--out", str(tmp_path / "e"), "--no-plots", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not the teacher fers-50 was trained against" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "e" / "results.json").exists()


def test_list_prints_the_cards(capsys):
    assert pretrained.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("fers-50", "fers-100"):
        assert f"{name}: FERS student" in out
    assert "FERD" in out and "sha256" in out
    pretrained.main(["--json", "fers-50"])
    assert json.loads(capsys.readouterr().out)["name"] == "fers-50"
