"""PyTorch -> Flax conversion, Orbax checkpoints and the loaders' refusals."""

import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import CHECKPOINTS, GOLDEN, REPO, fake_variables
from fers_jax import checkpoints, cli, configs, convert, torch_io
from fers_jax.errors import CheckpointError
from fers_jax.models import SpatialStudent

FRN_PT = GOLDEN / "frn_random_50bands.pt"
STUDENT_PT = GOLDEN / "spa_fen_random_50bands.pt"
STAGE1_PT = GOLDEN / "stage1_tiny_random_20bands.pt"


@pytest.fixture(scope="module")
def frn_sd():
    return torch_io.load_state_dict(FRN_PT)


@pytest.fixture(scope="module")
def frn_checkpoint(tmp_path_factory):
    variables, config = convert.convert_file("frn", FRN_PT, 50)
    path = tmp_path_factory.mktemp("ckpt") / "frn"
    checkpoints.save_variables(path, variables,
                               checkpoints.model_meta("frn", config))
    return path, variables, config


def test_reports_missing_unexpected_and_misshaped_keys(frn_sd):
    sd = dict(frn_sd)
    del sd["body.2.bn1.running_var"]
    sd["tail.weight"] = np.zeros((50, 50, 3, 3), np.float32)
    sd["body.0.conv2.weight"] = np.zeros((50, 50, 1, 1), np.float32)
    with pytest.raises(CheckpointError) as err:
        convert.from_torch("frn", sd, 50, source="frn.pt")
    msg = str(err.value)
    assert "missing keys ['body.2.bn1.running_var']" in msg
    assert "unexpected keys ['tail.weight']" in msg
    assert "body.0.conv2.weight: checkpoint (50, 50, 1, 1), model (50, 50, 3, 3)" \
        in msg


def test_wrong_checkpoint_for_kind():
    sd = torch_io.load_state_dict(FRN_PT)
    with pytest.raises(CheckpointError, match="has no 'initial_conv.conv.weight'"):
        convert.from_torch("student", sd, 50, source=str(FRN_PT))


def test_teacher_band_count_refused():
    src = CHECKPOINTS / "100bands"
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_teacher(src, bands=50)
    assert str(err.value) == (f"teacher checkpoint {src} has 100 "
                              "bands, the model/scene uses 50")
    with pytest.raises(CheckpointError, match="has 50 bands, the model/scene "
                       "uses 100"):
        checkpoints.load_student(STUDENT_PT, bands=100)
    with pytest.raises(CheckpointError, match="has 50 bands"):
        convert.convert_file("frn", FRN_PT, config=configs.frn(60))


def test_known_unused_keys_are_skipped():
    # pc.pt's conv3 (teacher) and the OCBE's conv4/bn4 (stage 1) convert
    # without complaint, and only num_batches_tracked is otherwise dropped.
    sd = torch_io.load_state_dict(STAGE1_PT)
    assert "ocbe.conv4.weight" in sd
    variables, config = convert.from_torch("stage1", sd, 20)
    assert config == configs.ferd_tiny(20)
    n_model = sum(np.size(v) for v in jax.tree.leaves(variables))
    n_file = sum(v.size for k, v in sd.items() if not re.match(
        r"ocbe\.(conv4|bn4)\.|.*num_batches_tracked", k))
    assert n_model == n_file


def test_teacher_folder_missing_file(tmp_path):
    shutil.copy(CHECKPOINTS / "50bands" / "convh.pt", tmp_path)
    shutil.copy(CHECKPOINTS / "50bands" / "enc.pt", tmp_path)
    with pytest.raises(CheckpointError, match="has no pc.pt"):
        checkpoints.load_teacher(tmp_path, 50)
    with pytest.raises(CheckpointError, match="neither the published folder"):
        checkpoints.load_teacher(tmp_path / "enc.pt", 50)


def test_orbax_round_trip(frn_checkpoint):
    path, variables, config = frn_checkpoint
    model, loaded = checkpoints.load_frn(path, bands=50)
    assert model.config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    x = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 8, 8, 50)).astype(
        np.float32)
    np.testing.assert_array_equal(model.apply(loaded, x),
                                  model.apply(variables, x))


def test_loader_refuses_wrong_kind_and_bands(frn_checkpoint):
    path = frn_checkpoint[0]
    with pytest.raises(CheckpointError, match="holds a frn checkpoint, not "
                       "student"):
        checkpoints.load_student(path)
    with pytest.raises(CheckpointError, match="has 50 bands, the model/scene "
                       "uses 20"):
        checkpoints.load_frn(path, bands=20)
    with pytest.raises(CheckpointError, match="not a fers_jax checkpoint"):
        checkpoints.load_variables(path / "variables")


def test_save_refuses_to_overwrite(frn_checkpoint, tmp_path):
    path, variables, config = frn_checkpoint
    meta = checkpoints.model_meta("frn", config)
    with pytest.raises(CheckpointError, match="exists"):
        checkpoints.save_variables(path, variables, meta)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a fers_jax checkpoint"):
        checkpoints.save_variables(tmp_path, variables, meta, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_stage1_checkpoint_serves_the_teacher(tmp_path):
    variables, config = convert.convert_file("stage1", STAGE1_PT)
    checkpoints.save_variables(tmp_path / "s1", variables,
                               checkpoints.model_meta("stage1", config))
    teacher, tv = checkpoints.load_teacher(tmp_path / "s1", bands=20)
    assert set(tv["params"]) == {"convh", "encoder", "head"}
    np.testing.assert_array_equal(
        tv["params"]["head"]["conv2"]["bias"],
        variables["params"]["classifier"]["head"]["conv2"]["bias"])
    with pytest.raises(CheckpointError, match="holds a stage1 checkpoint"):
        checkpoints.load_frn(tmp_path / "s1")


def test_cli(tmp_path, capsys):
    out = tmp_path / "teacher50"
    args = ["--kind", "teacher", str(CHECKPOINTS / "50bands"), "--bands",
            "50", "--out", str(out)]
    assert cli.run(convert.main, args) == 0
    assert checkpoints.read_meta(out)["kind"] == "teacher"
    assert checkpoints.read_meta(out)["config"]["bands"] == 50
    assert cli.run(convert.main, args) == 2  # exists
    assert "exists" in capsys.readouterr().err
    wrong = ["--kind", "student", str(FRN_PT), "--out", str(tmp_path / "x")]
    assert cli.run(convert.main, wrong) == 2
    assert "not a student checkpoint" in capsys.readouterr().err
    model, variables = checkpoints.load_teacher(out, 50)
    assert model.config == configs.ferd(50)


def _torchvision_resnet34(student_sd):
    """torchvision names for the golden student's trunk, plus the parts of a
    real resnet34 .pth that the student does not use."""
    stem = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2",
            "6": "layer3"}
    sd = {}
    for k, v in student_sd.items():
        m = re.match(r"get_features\.(\d)\.(.*)", k)
        if m:
            sd[f"{stem[m[1]]}.{m[2]}"] = v
    sd["layer4.0.conv1.weight"] = np.zeros((512, 256, 3, 3), np.float32)
    sd["fc.weight"] = np.zeros((1000, 512), np.float32)
    sd["fc.bias"] = np.zeros((1000,), np.float32)
    return sd


def test_imagenet_resnet34_into_student():
    student_sd = torch_io.load_state_dict(STUDENT_PT)
    trunk, _ = convert.from_torch("resnet34", _torchvision_resnet34(student_sd))
    full, config = convert.from_torch("student", student_sd, 50)
    jax.tree.map(np.testing.assert_array_equal, trunk["params"]["trunk"],
                 full["params"]["trunk"])
    fresh = fake_variables(SpatialStudent(config),
                           np.zeros((1, 16, 16, 50), np.float32))
    merged = convert.insert_pretrained(fresh, trunk)
    jax.tree.map(np.testing.assert_array_equal, merged["batch_stats"]["trunk"],
                 full["batch_stats"]["trunk"])
    assert merged["params"]["spp"] is fresh["params"]["spp"]


def test_imagenet_wrn101_into_encoder():
    sd = torch_io.load_state_dict(STAGE1_PT)
    stage1, config = convert.from_torch("stage1", sd, 20)
    wrn = {k[len("encoder."):]: v for k, v in sd.items()
           if k.startswith("encoder.")}
    wrn.update({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                "bn1.weight": np.ones(64, np.float32),
                "layer4.0.conv1.weight": np.zeros((512, 1024, 1, 1), np.float32),
                "fc.bias": np.zeros(1000, np.float32)})
    enc, _ = convert.from_torch("wrn101", wrn, config=config)
    assert set(enc["params"]) == {"encoder"}
    jax.tree.map(np.testing.assert_array_equal, enc, {
        col: {"encoder": tree["encoder"]} for col, tree in stage1.items()})
    del wrn["layer3.0.conv3.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \['layer3.0.conv3"):
        convert.from_torch("wrn101", wrn, config=config)


def test_package_reads_pt_files_only_through_torch_io():
    sources = [REPO / "fers_jax" / f for f in
               ("convert.py", "checkpoints.py", "configs.py")]
    sources += sorted((REPO / "fers_jax" / "models").glob("*.py"))
    for path in sources:
        text = pathlib.Path(path).read_text()
        assert not re.search(r"^\s*(import|from)\s+torch\b", text, re.M), path
