"""Training both stages: golden parity, frozen parts, learning, resume, files.

Tiny configurations throughout (configs.ferd_tiny / student_tiny /
frn_tiny, 20 bands, 24x24 patches of the shared background scenes, batch
4), so every run of one stage shares one compiled train step. The stage-2
teacher is the golden tiny stage-1 file (its FEN part).
"""

import functools
import json
import math
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluate
from conftest import BACKGROUND, GOLDEN, SCENES
from fers_jax import checkpoints, convert, data, inference, input_pipeline, losses
from fers_jax.training import config, loop, stage1, stage2, state

BANDS = 20
STAGE1_PT = GOLDEN / "stage1_tiny_random_20bands.pt"
RTOL = 1e-4


def flat(tree):
    return flax.traverse_util.flatten_dict(tree)


def host(tree):
    """A host copy (the jitted step donates its input state)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def assert_trees_equal(a, b):
    """Same structure and bit-identical leaves (tuples and dicts alike)."""
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert [jax.tree_util.keystr(k) for k, _ in fa] == \
        [jax.tree_util.keystr(k) for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))


@pytest.fixture(scope="module")
def batch():
    source = input_pipeline.scene_source([BACKGROUND], size=24)
    with input_pipeline.batches(source, 4, seed=1, bands=BANDS) as b:
        return jnp.asarray(next(b))


@pytest.fixture(scope="module")
def teacher():
    return checkpoints.load_teacher(STAGE1_PT, BANDS)


def stage1_state(key=0):
    task = stage1.task(BANDS, "tiny")
    variables = task.init_variables(jax.random.key(key), (1, 24, 24, BANDS))
    return task, state.create_train_state(variables, task.trainable,
                                          state.AdamConfig().build())


def stage2_state(teacher, key=0, **kwargs):
    model, tv = teacher
    task = stage2.task(model.config, "tiny", **kwargs)
    variables = task.init_variables(jax.random.key(key), (1, 24, 24, BANDS), tv)
    return task, state.create_train_state(variables, task.trainable,
                                          state.AdamConfig().build())


@pytest.fixture(scope="module")
def scene_crop(tmp_path_factory):
    """A 32x32 crop of abu-airport-2 holding some of its anomalies."""
    scene = data.load_scene(SCENES / "abu-airport-2.mat")
    path = tmp_path_factory.mktemp("crop") / "airport_crop.npz"
    np.savez(path, data=scene.cube[30:62, 24:56], map=scene.gt[30:62, 24:56])
    return path


# --- Optimiser and partition --------------------------------------------------

def test_adam_is_torch_adam():
    """optax.adam with these settings takes torch.optim.Adam's steps."""
    lr, b1, b2, eps = 0.005, 0.5, 0.999, 1e-8
    tx = state.AdamConfig().build()
    p = np.array([0.3, -1.0, 2.0], np.float32)
    grads = [np.array([0.1, -2e-9, 3.0], np.float32),
             np.array([-0.2, 1e-3, 0.5], np.float32)]
    opt, params = tx.init(jnp.asarray(p)), jnp.asarray(p)
    m, v, ref = np.zeros(3), np.zeros(3), p.astype(np.float64)
    for t, g in enumerate(grads, 1):
        updates, opt = tx.update(jnp.asarray(g), opt, params)
        params = params + updates
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        # torch: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        ref = ref - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    np.testing.assert_allclose(params, ref, rtol=1e-6)


def test_partition_and_what_trains(teacher):
    task1 = stage1.task(BANDS, "tiny")
    shapes = convert.abstract_variables("stage1", task1.config)["params"]
    train, frozen = state.partition(shapes, task1.trainable)
    assert set(train) == {"convh", "ocbe", "decoder", "deconvh", "classifier"}
    assert set(train["classifier"]) == {"head", "conv3"}
    assert set(frozen) == {"encoder"}
    assert flat(state.merge(train, frozen)).keys() == flat(shapes).keys()

    task2 = stage2.task(teacher[0].config, "tiny")
    params = jax.eval_shape(lambda: task2.init_variables(
        jax.random.key(0), (1, 24, 24, BANDS), teacher[1]))["params"]
    train, frozen = state.partition(params, task2.trainable)
    assert set(train) == {"student", "frn"}
    assert set(train["student"]) == {"to_rgb", "spp"}
    assert set(frozen) == {"teacher", "student"}
    assert set(frozen["student"]) == {"trunk"}


def _torchvision_state_dict(kind, config, seed=0):
    """Random arrays under torchvision's names for the ImageNet part of
    `config`'s model (what a user's .pth of `kind` holds), plus a key the
    converter must skip."""
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
    rng = np.random.default_rng(seed)
    sd = {"fc.weight": np.zeros((10, 4), np.float32)}
    for (col, *modules, leaf), spec in flat(
            convert.abstract_variables(kind, config)).items():
        value = rng.uniform(0.5, 1.0, spec.shape).astype(np.float32)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        sd[f"{convert.torch_name(kind, modules)}.{leaf_names[leaf]}"] = value
    return sd


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_imagenet_weights_fill_the_frozen_backbone(stage, teacher, monkeypatch):
    if stage == "stage1":
        task = stage1.task(BANDS, "tiny")
        config, sub = task.config, ("encoder",)
        init = lambda path: task.init_variables(  # noqa: E731
            jax.random.key(0), (1, 24, 24, BANDS), path)
    else:
        task = stage2.task(teacher[0].config, "tiny")
        config, sub = task.student, ("student", "trunk")
        init = lambda path: task.init_variables(  # noqa: E731
            jax.random.key(0), (1, 24, 24, BANDS), teacher[1], path)
    sd = _torchvision_state_dict(task.pretrained_kind, config)
    monkeypatch.setattr(convert, "read_torch", lambda kind, src: sd)
    variables = init("imagenet.pth")
    want, _ = convert.from_torch(task.pretrained_kind, sd, config=config)
    for col in ("params", "batch_stats"):
        got = variables[col]
        for name in sub:
            got = got[name]
        np.testing.assert_equal(jax.tree.map(np.asarray, got),
                                want[col][sub[-1]])
    _, frozen = state.partition(variables["params"], task.trainable)
    assert flat(frozen).keys() >= {k for k in flat(variables["params"])
                                   if k[:len(sub)] == sub}


# --- Golden parity ---------------------------------------------------------------

def test_stage1_train_step_golden_parity(golden):
    """One train step on the golden tiny graph: loss terms and gradients."""
    g = golden("stage1_tiny_20bands.npz")
    variables, cfg = convert.convert_file("stage1", STAGE1_PT, BANDS)
    task = stage1.Stage1(cfg)
    optimizer = state.AdamConfig()
    st = state.create_train_state(variables, task.trainable, optimizer.build())
    frozen_before = host(st.frozen)
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1))
    st, measured = state.jit_train_step(task, optimizer)(st, x)
    for term in ("bce", "mse", "cos", "loss"):
        assert abs(float(measured[term]) - g[term]) <= RTOL * abs(g[term]), term

    # Adam's first moment after step 1 is (1 - b1) * grad = grad / 2, exactly
    # (b1 = 0.5): the gradients the train step took, without another pass.
    mu = flat(st.opt_state[0].mu)
    by_torch_name = {f"{convert.torch_name('stage1', k[:-1])}.weight": k
                     for k in mu if k[-1] == "kernel"}
    for ref_name, torch_key in (
            ("grad_convh", "convh.convh.weight"),
            ("grad_pc_conv1", "classifier.conv1.weight"),
            ("grad_dec_layer1_0_conv1", "decoder.layer1.0.conv1.weight")):
        grad = 2 * np.asarray(mu[by_torch_name[torch_key]]).transpose(3, 2, 0, 1)
        ref = g[ref_name]
        assert grad.shape == ref.shape, ref_name
        np.testing.assert_allclose(grad, ref, rtol=RTOL,
                                   atol=RTOL * np.abs(ref).max(), err_msg=ref_name)
    assert_trees_equal(frozen_before, st.frozen)


def test_stage2_step_loss_is_stage2_loss(teacher, batch):
    task, st = stage2_state(teacher)
    spe_f, spa_f, recon, _ = jax.jit(task.forward, static_argnums=2)(
        st.variables(), batch, True)
    total, terms = losses.stage2_loss(spe_f, spa_f, recon, batch)
    _, measured = state.jit_train_step(task, state.AdamConfig())(st, batch)
    for k, v in {"loss": total, **terms}.items():
        np.testing.assert_allclose(measured[k], v, rtol=1e-6, err_msg=k)


def test_full_sizes_trace():
    """The published sizes build and differentiate (shapes only, no compute)."""
    from fers_jax import configs
    from fers_jax.models import SpectralTeacher
    tx = state.AdamConfig().build()
    x = jax.ShapeDtypeStruct((16, 64, 64, 50), jnp.float32)
    key = jax.random.key(0)
    task1 = stage1.task(50, "full")
    teacher_cfg = configs.ferd(50)
    task2 = stage2.task(teacher_cfg, "full")
    teacher_vars = jax.eval_shape(SpectralTeacher(teacher_cfg).init, key, x)
    for task, init, terms in (
            (task1, lambda k: task1.init_variables(k, x.shape),
             {"bce", "mse", "cos"}),
            (task2, lambda k: task2.init_variables(k, x.shape, teacher_vars),
             {"cc", "cos", "var", "l1", "mse", "ssim"})):
        st = jax.eval_shape(
            lambda k: state.create_train_state(init(k), task.trainable, tx), key)
        new, measured = jax.eval_shape(
            functools.partial(state.train_step, task.loss_fn, tx), st, x)
        assert jax.tree.structure(new) == jax.tree.structure(st)
        assert set(measured) == terms | {"loss", "grad_norm", "param_norm"}
    assert set(st.frozen["student"]["trunk"]) >= {"conv1", "layer3_5"}


# --- Frozen, learning, NaN guard at the step level -------------------------------

def _run_steps(task, st, batch, n):
    step = state.jit_train_step(task, state.AdamConfig())
    history = []
    for _ in range(n):
        st, measured = step(st, batch)
        history.append(float(measured["loss"]))
    return st, history


def test_stage1_frozen_stays_frozen_and_loss_falls(batch):
    task, st = stage1_state()
    before = host(st.to_dict())
    assert "encoder" not in st.opt_state[0].mu  # no Adam state for it
    st, history = _run_steps(task, st, batch, 20)
    assert_trees_equal(before["frozen"], st.frozen)
    assert_trees_equal(before["batch_stats"]["encoder"], st.batch_stats["encoder"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                           before["params"], host(st.params))
    assert all(jax.tree.leaves(changed))  # every trainable leaf moved
    assert int(st.step) == 20
    assert np.mean(history[-3:]) < 0.5 * history[0], history


def test_stage2_frozen_stays_frozen_and_loss_falls(teacher, batch):
    task, st = stage2_state(teacher)
    before = host(st.to_dict())
    st, history = _run_steps(task, st, batch, 20)
    assert_trees_equal(before["frozen"], st.frozen)
    assert_trees_equal(before["batch_stats"]["teacher"], st.batch_stats["teacher"])
    # The reference's quirk: the frozen trunk's BatchNorm statistics move.
    trunk_before = before["batch_stats"]["student"]["trunk"]["bn1"]["mean"]
    assert not np.array_equal(trunk_before,
                              st.batch_stats["student"]["trunk"]["bn1"]["mean"])
    assert set(st.opt_state[0].mu) == {"student", "frn"}
    assert set(st.opt_state[0].mu["student"]) == {"to_rgb", "spp"}
    assert np.mean(history[-3:]) < 0.5 * history[0], history


def test_stage2_trunk_running_statistics_option(teacher, batch):
    """trunk_bn='running': the student's statistics pass through the loss
    untouched (read off the traced program, no compilation needed)."""
    for trunk_bn, untouched in (("running", True), ("batch", False)):
        task, st = stage2_state(teacher, trunk_bn=trunk_bn)
        jaxpr = jax.make_jaxpr(task.loss_fn)(st.params, st.frozen,
                                             st.batch_stats, batch).jaxpr
        n_in = len(jax.tree.leaves((st.params, st.frozen)))
        stats_in = jaxpr.invars[n_in:n_in + len(jax.tree.leaves(st.batch_stats))]
        stats_out = jaxpr.outvars[-len(stats_in):]  # aux = (terms, batch_stats)
        paths = [jax.tree_util.keystr(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(st.batch_stats)[0]]
        for path, a, b in zip(paths, stats_in, stats_out):
            if "'teacher'" in path:
                assert a is b, path
            elif "'trunk'" in path:
                assert (a is b) == untouched, (trunk_bn, path)
            else:  # the restoration net always trains its BatchNorm
                assert a is not b, path


def test_non_finite_step_keeps_the_state(batch):
    task, st = stage1_state()
    before = host(st.to_dict())
    st, measured = state.jit_train_step(task, state.AdamConfig())(
        st, batch.at[0, 0, 0, 0].set(jnp.nan))
    assert not math.isfinite(float(measured["loss"]))
    assert_trees_equal(before, host(st.to_dict()))


# --- The loop: resume, signals, NaN, files, evaluate -------------------------------

def tiny_config(stage, out, **kwargs):
    if stage == "stage2":
        kwargs.setdefault("teacher", str(STAGE1_PT))
    return config.tiny(stage, [str(BACKGROUND)], BANDS, str(out), **kwargs)


def final_state(out):
    """(state tree as saved, meta) of the latest checkpoint in run `out`."""
    import orbax.checkpoint as ocp
    ckpts = checkpointing_for(out)
    step = ckpts.latest_step()
    got = ckpts.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    ckpts.close()
    return got["state"], got["meta"]


def checkpointing_for(out):
    from fers_jax.training import checkpointing
    return checkpointing.Checkpoints(out / "checkpoints")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wrap_step(monkeypatch, at_call, action):
    """Makes the loop's train step do `action(batch)` before call `at_call`."""
    real = loop.jit_train_step
    calls = {"n": 0}

    def wrapped(task, optimizer, mesh=None):
        step = real(task, optimizer, mesh)

        def run(st, batch):
            calls["n"] += 1
            if calls["n"] == at_call:
                batch = action(batch)
            return step(st, batch)
        return run
    monkeypatch.setattr(loop, "jit_train_step", wrapped)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, scene_crop):
    """12 steps (an epoch is 10) in one go: the reference for resuming."""
    out = tmp_path_factory.mktemp("straight")
    summary = loop.train_and_evaluate(tiny_config(
        "stage1", out, steps=12, val=(str(scene_crop),)))
    return out, summary


def test_resume_is_exact(straight_run, tmp_path):
    out, _ = straight_run
    loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=7))
    with pytest.raises(loop.TrainingError, match="--resume"):
        loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=12))
    loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=12, resume=True))
    want, want_meta = final_state(out)
    got, got_meta = final_state(tmp_path)
    assert_trees_equal(want, got)
    assert got_meta["data"] == want_meta["data"]
    got = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 13))
    want = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_then_resume_is_exact(signum, straight_run, tmp_path,
                                                 monkeypatch):
    out, _ = straight_run

    def interrupt(batch):
        signal.raise_signal(signum)
        return batch
    _wrap_step(monkeypatch, 5, interrupt)
    handler = signal.getsignal(signum)
    summary = loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=12))
    assert summary["interrupted"] == signal.Signals(signum).name
    assert summary["step"] == 5 and final_state(tmp_path)[1]["step"] == 5
    assert signal.getsignal(signum) is handler
    monkeypatch.undo()
    loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=12, resume=True))
    assert_trees_equal(final_state(out)[0], final_state(tmp_path)[0])


def test_resume_refuses_other_settings(straight_run, tmp_path):
    out, _ = straight_run
    with pytest.raises(loop.InputError, match="batch_size: 4 -> 2"):
        loop.train_and_evaluate(tiny_config("stage1", out, steps=14, resume=True,
                                            batch_size=2))
    with pytest.raises(loop.InputError, match="augment: False -> True"):
        loop.train_and_evaluate(tiny_config("stage1", out, steps=14, resume=True,
                                            augment=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                  monkeypatch):
    _wrap_step(monkeypatch, 5, lambda b: b * jnp.nan)
    with pytest.raises(loop.TrainingError,
                       match="non-finite loss or gradient at step 5 .*last "
                             "good checkpoint is step 3"):
        loop.train_and_evaluate(tiny_config("stage1", tmp_path, steps=12,
                                            checkpoint_every=3))
    saved, _ = final_state(tmp_path)
    assert int(saved["step"]) == 3
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(saved))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 5 and records[-1]["non_finite"]
    assert records[-1]["loss"] is None


def test_stage1_run_validates_and_exports_a_teacher(straight_run):
    out, summary = straight_run
    (epoch,) = [r for r in read_jsonl(out / "metrics.jsonl")
                if r["kind"] == "epoch"]
    assert epoch["step"] == 10 and 0 < epoch["val_mauc"] <= 1
    assert summary["best"]["step"] == 10
    saved, _ = final_state(out)
    want = stage1.task(BANDS, "tiny").teacher(
        {"params": state.merge(saved["params"], saved["frozen"]),
         "batch_stats": saved["batch_stats"]})[1]
    # What evaluate.py --method ferd --teacher <dir> loads, from either export.
    for kind in ("stage1", "teacher"):
        assert checkpoints.read_meta(summary["final"][kind])["kind"] == kind
        _, got = checkpoints.load_teacher(summary["final"][kind], BANDS)
        np.testing.assert_equal(jax.tree.map(np.asarray, got), want)


def _scripted_validation(monkeypatch, maucs):
    """Makes the loop's validation report val_mauc maucs[step] (so the best
    epoch is known in advance); returns {step: host copy of the variables
    validated}."""
    seen = {}

    def fake(task, st, val, test, mesh=None):
        step = int(st.step)
        seen[step] = host(st.variables())
        return {"val_mauc": maucs[step], "val_auc": {"x": maucs[step]}}
    monkeypatch.setattr(loop, "validate", fake)
    return seen


def test_best_survives_resume_after_the_best_epoch(scene_crop, tmp_path,
                                                   monkeypatch):
    """Best epoch 1 of 3; interrupted in epoch 3, resumed, finished: best/
    holds epoch 1's model (Orbax's keep-best forgets the metrics of
    checkpoints written before a restart and may delete that step)."""
    seen = _scripted_validation(monkeypatch, {10: 0.9, 20: 0.5, 30: 0.4})
    cfg = dict(steps=30, val=(str(scene_crop),))

    def interrupt(batch):
        signal.raise_signal(signal.SIGTERM)
        return batch
    _wrap_step(monkeypatch, 25, interrupt)
    summary = loop.train_and_evaluate(tiny_config("stage1", tmp_path, **cfg))
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 25
    assert checkpoints.is_checkpoint(tmp_path / "best" / "stage1")
    monkeypatch.setattr(loop, "jit_train_step", state.jit_train_step)

    summary = loop.train_and_evaluate(tiny_config("stage1", tmp_path,
                                                  resume=True, **cfg))
    assert summary["step"] == 30
    assert summary["best"]["step"] == 10 and summary["best"]["epoch"] == 1
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best"] == summary["best"]
    assert on_disk["best_export"]["stage1"] == str(tmp_path / "best" / "stage1")
    assert [r["best"] for r in read_jsonl(tmp_path / "metrics.jsonl")
            if r["kind"] == "epoch"] == [True, False, False]
    got, meta = checkpoints.load_variables(tmp_path / "best" / "stage1",
                                           "stage1")
    assert_trees_equal(jax.tree.map(np.asarray, got), seen[10])
    _, teacher = checkpoints.load_teacher(tmp_path / "best" / "teacher", BANDS)
    want = stage1.task(BANDS, "tiny").teacher(seen[10])[1]
    assert_trees_equal(jax.tree.map(np.asarray, teacher), want)
    # Nothing left over from the atomic replacement.
    assert sorted(p.name for p in tmp_path.iterdir()
                  if p.name.startswith(".best")) == []

    # A run folder without best/ (as the old code left it) whose best step's
    # checkpoint is gone: the run still finishes, saying so.
    import shutil
    shutil.rmtree(tmp_path / "best")
    summary = loop.train_and_evaluate(tiny_config("stage1", tmp_path,
                                                  resume=True, **cfg))
    assert summary["step"] == 30 and summary["best"]["step"] == 10
    assert summary["best_export"] is None
    assert not (tmp_path / "best").exists()


def test_best_export_replaces_best_atomically(tmp_path, monkeypatch):
    """best/ is replaced whole or not at all: an export that fails half way
    or a kill between the renames leaves the previous best/ (mended by
    _recover_best on the next start)."""
    import os
    import types
    from fers_jax import configs
    meta = checkpoints.model_meta("teacher", configs.ferd_tiny(BANDS))

    class Task:
        fail = False

        def export(self, variables, folder):
            a = checkpoints.save_variables(folder / "a", variables, meta)
            if self.fail:
                raise OSError("disk full")
            return {"a": str(a), "b": str(checkpoints.save_variables(
                folder / "b", variables, meta))}

    def variables_of(value):
        return types.SimpleNamespace(
            variables=lambda: {"params": {"w": np.full(3, value, np.float32)}})

    def held(name="a"):
        return float(checkpoints.load_variables(
            tmp_path / "best" / name)[0]["params"]["w"][0])

    def leftovers():
        return sorted(p.name for p in tmp_path.iterdir()
                      if p.name.startswith(".best"))

    run = types.SimpleNamespace(primary=True, out=tmp_path, task=Task(),
                                best={"step": 10, "epoch": 1, "metric": 0.9})
    loop._export_best(run, variables_of(1.0))
    assert loop._best_step_on_disk(run) == 10 and held("b") == 1.0

    run.best, run.task.fail = {"step": 20, "epoch": 2, "metric": 0.95}, True
    with pytest.raises(OSError, match="disk full"):
        loop._export_best(run, variables_of(2.0))
    assert loop._best_step_on_disk(run) == 10 and held() == held("b") == 1.0
    loop._recover_best(run)
    assert leftovers() == []

    real_replace = os.replace

    def killed_between_renames(src, dst):
        if os.path.basename(src) == ".best.tmp":
            raise KeyboardInterrupt  # the kill
        real_replace(src, dst)
    run.task.fail = False
    monkeypatch.setattr(os, "replace", killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        loop._export_best(run, variables_of(2.0))
    monkeypatch.undo()
    assert not (tmp_path / "best").exists()
    loop._recover_best(run)
    assert loop._best_step_on_disk(run) == 10 and held() == 1.0
    assert leftovers() == []

    loop._export_best(run, variables_of(2.0))
    assert loop._best_step_on_disk(run) == 20 and held() == held("b") == 2.0
    assert leftovers() == []
    # A best/ that training did not write is left alone.
    (tmp_path / "best" / "best_epoch.json").unlink()
    (tmp_path / "best" / "mine.txt").write_text("")
    (tmp_path / "new").mkdir()
    with pytest.raises(loop.TrainingError, match="refusing to replace"):
        loop._replace_folder(tmp_path / "new", tmp_path / "best")
    assert (tmp_path / "best" / "mine.txt").is_file() and held() == 2.0


def test_stage2_run_files_and_evaluate(scene_crop, tmp_path):
    out = tmp_path / "run"
    summary = loop.train_and_evaluate(tiny_config(
        "stage2", out, steps=12, val=(str(scene_crop),)))
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "cc", "cos", "var", "mse", "ssim", "grad_norm",
                "param_norm", "epoch"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["step"] == 10 and epoch["best"]
    assert set(epoch["val_auc"]) == {"airport_crop"}
    # spa_f's scale against spe_f's is tracked each epoch (the collapse guard).
    scale = epoch["scale"]
    assert scale["spe_max"] > 0 and scale["spa_max"] >= 0
    assert scale["spa_ratio"] == pytest.approx(scale["spa_max"] / scale["spe_max"])
    assert epoch["collapsed"] == (scale["spa_ratio"] < loop.COLLAPSE_RATIO)
    assert summary["select"] == "val" and summary["best"]["step"] == 10
    assert sorted(checkpointing_for(out).all_steps()) == [12]  # the latest
    assert json.loads((out / "best" / "best_epoch.json").read_text()) == \
        summary["best"]
    for name in ("config.json", "summary.json"):
        assert (out / name).is_file()
    for folder in ("final", "best"):
        for part in ("student", "frn", "teacher"):
            assert checkpoints.is_checkpoint(out / folder / part)

    evaluate.main(["--scenes", str(scene_crop), "--method", "fers",
                   "--teacher", str(out / "best" / "teacher"),
                   "--student", str(out / "best" / "student"),
                   "--bands", str(BANDS), "--out", str(tmp_path / "eval"),
                   "--no-plots", "--quiet"])
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    # The same map as the epoch's validation, through evaluate.py's loaders.
    assert result["mean_auc"] == pytest.approx(epoch["val_mauc"], abs=1e-4)


def test_had100_root_trains_on_train_and_selects_on_test(tmp_path):
    """A HAD100 root: train/<sensor> to learn from, its test split scored
    each epoch and (the reference's choice) picking the best epoch."""
    from fers_jax.datasets import layout
    root = tmp_path / "HAD100Dataset"
    layout.write_layout([SCENES / "abu-airport-2.mat"], root, size=24,
                        bands=BANDS)
    n_train = len(list((root / "train" / "aviris_ng").glob("*.npy")))
    n_test = len(list((root / "test" / "aviris_ng").glob("*.npy")))
    summary = loop.train_and_evaluate(config.tiny(
        "stage1", [str(root)], BANDS, str(tmp_path / "run"), epochs=1))
    assert summary["select"] == "test"
    assert summary["step"] == n_train // 4 == summary["best"]["step"]
    (epoch,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                if r["kind"] == "epoch"]
    assert len(epoch["test_auc"]) == n_test and "val_mauc" not in epoch


def test_feature_scale_and_the_collapse_threshold():
    """The guard's measure on known arrays: a student at 1e-4 of the
    teacher's scale is collapsed, one at 1e-2 is not."""
    rng = np.random.default_rng(0)
    spe = np.clip(rng.normal(size=(8, 8, 3)) * 10, -40, 40)
    spe[0, 0, 0] = 50.0
    alive = np.clip(rng.normal(size=(8, 8, 3)), 0, 0.4)
    alive[0, 0, 0] = 0.5                      # max 0.5: ratio 1e-2
    alive[..., 2] = 0.0                       # one dead channel
    one = loop.feature_scale({"spa_f": alive, "spe_f": spe})
    assert one["spa_max"] == 0.5 and one["spe_max"] == 50.0
    assert one["spa_dead_channels"] == 1
    assert one["spa_zero"] == pytest.approx(np.mean(alive == 0))
    two = loop.feature_scale({"spa_f": alive * 1e-2, "spe_f": spe})
    both = loop.summarise_scale({"a": one, "b": two})
    assert both["spa_ratio"] == pytest.approx(1e-2)
    assert not loop.collapsed(both)
    assert loop.collapsed(loop.summarise_scale({"b": two}))      # 1e-4
    assert loop.collapsed(loop.summarise_scale(
        {"z": loop.feature_scale({"spa_f": 0 * alive, "spe_f": spe})}))
    assert not loop.collapsed(None)           # stage 1: nothing to guard


def test_collapsed_epoch_is_never_selected(scene_crop, tmp_path, monkeypatch):
    """The best val mAUC at a collapsed epoch (spa_ratio under the threshold)
    is recorded but not selected: best/ holds the best live epoch."""
    maucs = {10: 0.7, 20: 0.9, 30: 0.8}
    ratios = {10: 0.5, 20: loop.COLLAPSE_RATIO / 10, 30: 0.2}
    seen = {}

    def fake(task, st, val, test, mesh=None):
        step = int(st.step)
        seen[step] = host(st.variables())
        return {"val_mauc": maucs[step], "val_auc": {"x": maucs[step]},
                "scale": {"spa_ratio": ratios[step], "spa_max": ratios[step],
                          "spe_max": 1.0}}
    monkeypatch.setattr(loop, "validate", fake)
    summary = loop.train_and_evaluate(tiny_config(
        "stage2", tmp_path, steps=30, val=(str(scene_crop),)))
    assert summary["best"]["step"] == 30
    epochs = [r for r in read_jsonl(tmp_path / "metrics.jsonl")
              if r["kind"] == "epoch"]
    assert [r["collapsed"] for r in epochs] == [False, True, False]
    assert [r["best"] for r in epochs] == [True, False, True]
    got, _ = checkpoints.load_variables(tmp_path / "best" / "student",
                                        "student")
    want = {col: tree["student"] for col, tree in seen[30].items()}
    assert_trees_equal(jax.tree.map(np.asarray, got), want)


def test_seeds_replica_equals_its_one_seed_run(scene_crop, tmp_path):
    """--seeds 2: replica k (seed s+k, stepped with the other) follows a
    one-seed run of seed s+k over the same 12 steps (an epoch and a bit,
    validation included), to float32 rounding amplified by training. Not
    bit for bit on every backend: vmapped convolutions (the accelerators'
    seed axis) sum in another order, Adam moves a
    weight whose gradient is at rounding level by +-lr on the sign of that
    rounding, and the cross-covariance divides near-dead channels by a tiny
    std. Measured (tiny sizes, lr 5e-3): step-1 losses equal to 1e-7, the
    largest parameter difference 2e-5..2e-4 after one step, 2e-3 after 8,
    up to 2e-2 in a few weights after 12. Tolerance: step-1 loss rel 1e-5
    (same init, same first batch), losses of steps 1-8 rel 5e-2 (measured
    up to 1.0e-2 here); after 12
    steps under 5% of all parameters more than 2.5e-3 (half an Adam step)
    apart and a mean absolute difference under 1e-3. Another seed's replica
    or batch order differs by the init's scale (~0.07 on average) and fails."""
    cfg = dict(steps=12, val=(str(scene_crop),))
    summary = loop.train_and_evaluate(tiny_config(
        "stage2", tmp_path / "k", seed=3, seeds=2, **cfg))
    assert summary["seeds"] == [3, 4] and not summary["interrupted"]
    record = json.loads((tmp_path / "k" / "seeds.json").read_text())
    metric = [b["metric"] for b in record["best"]]
    assert record["best_metric_mean"] == pytest.approx(np.mean(metric))
    for seed in (3, 4):
        one = tmp_path / f"one_{seed}"
        loop.train_and_evaluate(tiny_config("stage2", one, seed=seed, **cfg))
        rep = tmp_path / "k" / f"seed_{seed}"
        got, meta_got = final_state(rep)
        want, meta_want = final_state(one)
        assert meta_got["seed"] == seed and meta_got["data"] == meta_want["data"]
        diffs = []
        for part in ("params", "batch_stats"):
            fg, fw = (jax.tree_util.tree_leaves_with_path(t[part])
                      for t in (got, want))
            assert [k for k, _ in fg] == [k for k, _ in fw] and fg
            diffs += [np.abs(np.asarray(a) - np.asarray(b)).ravel()
                      for (_, a), (_, b) in zip(fg, fw)]
        diffs = np.concatenate(diffs)
        assert np.mean(diffs > 2.5e-3) < 0.05, (seed, np.mean(diffs > 2.5e-3))
        assert np.mean(diffs) < 1e-3, (seed, np.mean(diffs))
        rg, rw = (read_jsonl(d / "metrics.jsonl") for d in (rep, one))
        assert [r["step"] for r in rg] == [r["step"] for r in rw]
        assert rg[0]["loss"] == pytest.approx(rw[0]["loss"], rel=1e-5)
        for a, b in zip(rg, rw):
            if a["kind"] == "step" and a["step"] <= 8:
                assert a["loss"] == pytest.approx(b["loss"], rel=5e-2)
        assert json.loads((rep / "summary.json").read_text())["best"]["step"] \
            == json.loads((one / "summary.json").read_text())["best"]["step"]
        for part in ("student", "frn", "teacher"):
            assert checkpoints.is_checkpoint(rep / "best" / part)
            assert checkpoints.is_checkpoint(rep / "final" / part)


@pytest.mark.parametrize("axis", ["map", "unroll", "vmap"])
def test_seeds_step_equals_one_seed_steps(teacher, batch, axis):
    """One K=2 step (each seed axis) against the one-seed step of each
    replica on its own batch: same losses and parameters to float32
    rounding. vmap batches the convolutions (another summation order); map
    and unroll run each replica's own ops. Measured (tiny sizes): largest
    parameter difference 0 (unroll), 3e-7 (map); vmap 1.3e-5 for replica 0,
    and for replica 1 2 of 10,103 parameters above 1e-4 (up to 7.5e-3, on
    one machine; 3.9e-5 on another). Adam's first step divides each gradient
    by its own size (+ eps), so a near-zero gradient's rounding can move a
    parameter by up to lr either way: for vmap the test bounds the share of
    parameters off by more than 1e-4, and the largest difference by 2 lr.
    Another replica's parameters differ by the init's scale (~0.07)."""
    pairs = [stage2_state(teacher, key=k) for k in (0, 1)]
    task = pairs[0][0]
    states = [p[1] for p in pairs]
    batches = [batch, batch[::-1]]
    stacked = state.stack_states(states)        # before the donating steps
    one = state.jit_train_step(task, state.AdamConfig())
    want = [one(st, b) for st, b in zip(states, batches)]
    many = state.jit_train_step_seeds(task, state.AdamConfig(), axis=axis)
    got_state, got_m = many(stacked, jnp.stack(batches))
    for k, (st_k, m_k) in enumerate(want):
        np.testing.assert_allclose(got_m["loss"][k], m_k["loss"], rtol=1e-5)
        got_k = state.unstack_state(got_state, k)
        diffs = np.concatenate([
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(jax.tree.leaves(got_k.params),
                            jax.tree.leaves(st_k.params))])
        if axis == "vmap":
            assert np.mean(diffs > 1e-4) < 1e-3, (axis, k, np.mean(diffs > 1e-4))
            assert diffs.max() <= 2 * state.AdamConfig().learning_rate, (axis, k)
        else:
            assert diffs.max() < 1e-4, (axis, k)


def test_stage2_false_alarm_term_in_the_step(teacher, batch):
    """--loss-weights fa=W: the step's loss is stage2_loss with the term, at
    the task's resolved fusion (product at this test's 50 bands or fewer)."""
    task, st = stage2_state(teacher, weights=losses.Stage2Weights(fa=0.3))
    spe_f, spa_f, recon, _ = jax.jit(task.forward, static_argnums=2)(
        st.variables(), batch, True)
    total, terms = losses.stage2_loss(spe_f, spa_f, recon, batch, task.weights,
                                      inference.resolve_fusion("auto", BANDS))
    _, measured = state.jit_train_step(task, state.AdamConfig())(st, batch)
    assert "fa" in measured
    for k, v in {"loss": total, **terms}.items():
        np.testing.assert_allclose(measured[k], v, rtol=1e-5, err_msg=k)
