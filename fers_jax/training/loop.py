"""The training job: `train_and_evaluate(config)`.

Epoch loop over resumable shuffled batches, one jitted `train_step` per
batch, per-epoch mAUC on validation / test scenes, Orbax checkpoints
(the latest), metrics.jsonl, a progress bar, exact resume, and the
export of the best model (when found) and the final one as fers_jax
checkpoints.

Data parallel over a device mesh (fers_jax.parallel): every batch is split over
the devices (and hosts), the state replicated; one device is a mesh of one.
On many hosts only process 0 writes the run's files (metrics.jsonl, JSON
records); all take part in the Orbax checkpoints.

The run folder `out` holds:
  config.json     the TrainConfig and the task
  metrics.jsonl   {"kind": "step", "step", "epoch", "loss", <terms>,
                  "grad_norm", "param_norm", "time"} per logged step and
                  {"kind": "epoch", "step", "epoch", "val_mauc", "val_auc",
                  "test_mauc", "test_auc", "best"} per epoch
  checkpoints/    Orbax: <step>/state and <step>/meta, the latest
  best/           fers_jax checkpoints for evaluate.py (stage 1: stage1/
                  and teacher/; stage 2: student/, frn/, teacher/) of the
                  best epoch so far, and best_epoch.json (its step, epoch,
                  metric); written whenever validation finds a new best,
                  in a temporary sibling folder renamed into place
  final/          the same checkpoints of the last step
  summary.json    where everything went, the best epoch
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Dict, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from fers_jax import checkpoints as model_checkpoints
from fers_jax import data, input_pipeline, metrics, parallel
from fers_jax.evaluation import write_json_atomic
from fers_jax.errors import FersError, InputError
from fers_jax.datasets import crops
from fers_jax.models import ferd
from fers_jax.training import checkpointing, stage1, stage2
from fers_jax.training.config import TrainConfig
from fers_jax.training.state import (AdamConfig, TrainState, count,
                                     create_train_state, jit_train_step,
                                     jit_train_step_seeds, stack_states,
                                     unstack_state)

# Settings that must not change when a run is resumed.
RESUME_FIELDS = ("stage", "bands", "band_start", "model", "batch_size",
                 "patch_size", "stride", "sensor", "learning_rate", "b1", "b2",
                 "eps", "trunk_bn", "bce_on_logits", "train_trunk",
                 "loss_weights", "augment")


class TrainingError(FersError):
    """Training cannot go on (a non-finite loss, an unusable run folder)."""


def _say(msg: str):
    from tqdm import tqdm
    tqdm.write(msg)


# --- Keys, data, scenes --------------------------------------------------------

def derive_keys(seed: int):
    """(init key, data shuffle seed), both from the one PRNG key of `seed`."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    data_seed = int(jax.random.randint(data_key, (), 0, 2 ** 31 - 1))
    return init_key, data_seed


def training_source(cfg: TrainConfig):
    """The random-access source of training images for cfg.data."""
    paths = [pathlib.Path(p) for p in cfg.data]
    if len(paths) == 1 and (paths[0] / "dataset_info.json").is_file():
        return input_pipeline.tfds_source(paths[0], "train")
    return input_pipeline.scene_source(paths, size=cfg.patch_size,
                                       stride=cfg.stride, sensor=cfg.sensor)


def check_one_batch(cfg: TrainConfig, source, devices: int = 1):
    """Refuses a source without one batch of cfg.batch_size images, saying
    (for patches cut from scenes) which smaller --batch-size, --stride or
    --patch-size would give one (`crops.batch_advice`); before any model is
    built, so the user waits for nothing."""
    n = len(source)
    if n >= cfg.batch_size:
        return
    if isinstance(source, crops.PatchSource):
        size_ok = lambda size: True  # noqa: E731
        if cfg.stage == "stage1":
            config = stage1.task(cfg.bands, cfg.model).config
            size_ok = lambda size: ferd.size_fits(size, config)  # noqa: E731
        raise InputError(crops.batch_advice(
            source.scenes, cfg.patch_size, cfg.stride, cfg.batch_size,
            multiple=devices, size_ok=size_ok))
    fix = f"; use --batch-size {n - n % devices}" if n >= devices else ""
    raise InputError(f"{cfg.data[0]}: the dataset has {n} images: not one "
                     f"batch of {cfg.batch_size}{fix}")


def eval_scenes(cfg: TrainConfig):
    """(validation scenes, test scenes) for the per-epoch mAUC."""
    load = functools.partial(input_pipeline.load_eval_scenes, bands=cfg.bands,
                             band_start=cfg.band_start, sensor=cfg.sensor)
    test = cfg.test or tuple(p for p in cfg.data
                             if data.is_had100_root(pathlib.Path(p)))
    return (load(cfg.val) if cfg.val else [], load(test) if test else [])


def selection(cfg: TrainConfig, val: list, test: list) -> str:
    """Which mAUC picks the best epoch: 'val', 'test' or 'none'."""
    select = cfg.select or ("val" if val else "test" if test else "none")
    if select == "val" and not val:
        raise InputError("--select val needs validation scenes (--val PATH)")
    if select == "test" and not test:
        raise InputError("--select test needs test scenes (--test PATH, or a "
                         "HAD100 root in --data)")
    return select


def frozen_features(task, state: TrainState, cfg: TrainConfig, part) -> dict:
    """The task's frozen, input-only features (stage 2: the teacher's spe_f),
    computed once per training image by the input pipeline ({} for none)."""
    make = getattr(task, "frozen_features", None)
    if make is None:
        return {}
    return make(state.variables(), chunk=cfg.batch_size // part[1],
                folder=cfg.feature_cache)


# --- Task and initial state ------------------------------------------------------

def check_imagenet(cfg: TrainConfig):
    if cfg.imagenet is not None and cfg.model != "full":
        raise InputError("--imagenet weights fit only --config full (the tiny "
                         "sizes have no ImageNet counterpart)")


def build_task(cfg: TrainConfig, key, shape):
    """(task, initial variables) for cfg.stage at cfg.model sizes."""
    check_imagenet(cfg)
    if cfg.stage == "stage1":
        task = stage1.task(cfg.bands, cfg.model, bce_on_logits=cfg.bce_on_logits)
        variables = task.init_variables(key, shape, cfg.imagenet)
    else:
        teacher, teacher_vars = model_checkpoints.load_teacher(cfg.teacher,
                                                               cfg.bands)
        task = stage2.task(teacher.config, cfg.model, trunk_bn=cfg.trunk_bn,
                           train_trunk=cfg.train_trunk,
                           weights=cfg.stage2_weights)
        variables = task.init_variables(key, shape, teacher_vars, cfg.imagenet)
    if cfg.imagenet is None:
        what = ("encoder" if cfg.stage == "stage1" else "student trunk")
        why = ("no ImageNet weights exist at the tiny sizes" if cfg.model == "tiny"
               else "the reference uses ImageNet weights")
        _say(f"WARNING: no --imagenet weights: the frozen {what} "
             f"({task.pretrained_name}) keeps its random initialisation; {why}")
    return task, variables


# --- Validation --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _features_fn(task):
    return jax.jit(task.features)


def score_scenes(task, variables, scenes, mesh=None,
                 scale: Optional[dict] = None) -> Dict[str, float]:
    """{scene name: ROC AUC} of the task's detection map on each scene.

    Scenes of one size go through in batches of one per device of `mesh`
    (default: a single device), sharded over it. With a dict `scale`, the
    features' scale per scene is added to it ({name: feature_scale(...)}).
    """
    mesh = mesh or parallel.one_device_mesh()
    features = _features_fn(task)
    by_shape = {}
    for scene in scenes:
        by_shape.setdefault(scene.x.shape, []).append(scene)
    aucs = {}
    for group in by_shape.values():
        for i in range(0, len(group), mesh.size):
            chunk = group[i:i + mesh.size]
            x, n = parallel.shard_padded(np.stack([s.x for s in chunk]), mesh)
            feats = features(variables, x)
            maps = parallel.to_host(task.detection_map(x, feats))
            if scale is not None:
                host = {k: parallel.to_host(v)[:n] for k, v in feats.items()}
                for j, scene in enumerate(chunk):
                    scale[scene.name] = feature_scale(
                        {k: v[j] for k, v in host.items()})
            for scene, score_map in zip(chunk, maps[:n]):
                aucs[scene.name] = metrics.roc_auc(score_map, scene.gt,
                                                   scene.name)
    return {scene.name: aucs[scene.name] for scene in scenes}


# --- spa_f's scale and the collapse guard -------------------------------------------

# A student whose spa_f is this small against spe_f (max |spa_f| / max |spe_f|
# over the validation scenes) is collapsed: x + spe_f + spa_f is then x +
# spe_f to float32 rounding, and FERS is FERD (sum fusion) or the zero
# student's product (product fusion). Measured (issue 10): collapsed students
# sit at 4e-9 (train-mode trunk BN) and 4e-5 (faded, epoch 30); students with
# signal at 8e-3 (50 bands, epoch 11) and 0.8 (100 bands).
COLLAPSE_RATIO = 1e-3


def feature_scale(feats) -> dict:
    """Scale of one image's features: max |.|, std, fraction of exact zeros
    of spa_f, max |.| and std of spe_f (host arrays (H, W, B))."""
    spa, spe = (np.asarray(feats[k], np.float64) for k in ("spa_f", "spe_f"))
    return {"spa_max": float(np.abs(spa).max()), "spa_std": float(spa.std()),
            "spa_zero": float(np.mean(spa == 0)),
            "spa_dead_channels": int(np.sum(np.all(spa == 0, axis=(0, 1)))),
            "spe_max": float(np.abs(spe).max()), "spe_std": float(spe.std())}


def summarise_scale(per_scene: dict) -> dict:
    """The epoch record's spa_f scale over scenes: max of the maxima, mean of
    the stds and zero fractions, and `spa_ratio` = max |spa_f| / max |spe_f|
    (the collapse guard's measure)."""
    rows = list(per_scene.values())
    spa_max = max(r["spa_max"] for r in rows)
    spe_max = max(r["spe_max"] for r in rows)
    return {"spa_max": spa_max,
            "spa_std": float(np.mean([r["spa_std"] for r in rows])),
            "spa_zero": float(np.mean([r["spa_zero"] for r in rows])),
            "spa_dead_channels": max(r["spa_dead_channels"] for r in rows),
            "spe_max": spe_max,
            "spe_std": float(np.mean([r["spe_std"] for r in rows])),
            "spa_ratio": spa_max / spe_max if spe_max > 0 else 0.0}


def collapsed(scale: Optional[dict]) -> bool:
    """True where the student's spa_f carries no signal (COLLAPSE_RATIO)."""
    return scale is not None and scale["spa_ratio"] < COLLAPSE_RATIO


def validate(task, state: TrainState, val, test, mesh=None) -> dict:
    """The per-epoch record's scores: val_mauc, val_auc, test_mauc, test_auc,
    and, for stage 2, `scale` (summarise_scale over the scored scenes)."""
    variables = state.variables()
    record = {}
    per_scene = {} if task.name == "stage2" else None
    for name, scenes in (("val", val), ("test", test)):
        if scenes:
            aucs = score_scenes(task, variables, scenes, mesh, per_scene)
            record[f"{name}_mauc"] = float(np.mean(list(aucs.values())))
            record[f"{name}_auc"] = aucs
    if per_scene:
        record["scale"] = summarise_scale(per_scene)
    return record


# --- Metrics file ------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as training goes.

    Opening it keeps only the records up to `keep_until_step` (what the
    restored checkpoint had seen), so a resumed run's file reads as if the
    run had never stopped. With `write` False (hosts other than the first)
    it neither reads nor writes.
    """

    def __init__(self, path: pathlib.Path, keep_until_step: int,
                 write: bool = True):
        self.path = path
        self._file = None
        if not write:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if record.get("step", math.inf) <= keep_until_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def write(self, record: dict):
        if self._file is not None:
            self._file.write(json.dumps(_finite_or_none(record)) + "\n")
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()


def _finite_or_none(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- Signals -----------------------------------------------------------------------

class StopRequests(contextlib.AbstractContextManager):
    """Turns SIGINT / SIGTERM into a request to stop at the next step boundary.

    A second signal of the same kind acts as usual (KeyboardInterrupt,
    termination). Outside the main thread nothing is installed.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# --- The run -----------------------------------------------------------------------

def _prepare_out(cfg: TrainConfig) -> pathlib.Path:
    out = pathlib.Path(cfg.out).expanduser()  # as given: messages name it
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the run folder "
                         f"({e.strerror})") from None
    return out


def _check_resume(meta: dict, cfg: TrainConfig, select: str, where):
    saved = meta.get("train_config", {})
    now = cfg.to_dict()
    # A field newer than the run folder counts as its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}"
               for k in RESUME_FIELDS if saved.get(k, defaults[k]) != now[k]]
    for key, value in (("seed", cfg.run_seed), ("select", select)):
        if meta.get(key) != value:
            changed.append(f"{key}: {meta.get(key)!r} -> {value!r}")
    if changed:
        raise InputError(f"cannot resume from {where}: the run was made with "
                         f"other settings ({'; '.join(changed)})")


def _restore_or_start(cfg, select, ckpts, state):
    """(state, meta or None): the latest checkpoint when resuming."""
    latest = ckpts.latest_step()
    if latest is not None and not cfg.resume:
        raise TrainingError(f"{ckpts.directory} already holds checkpoints "
                            f"(latest step {latest}); pass --resume to "
                            f"continue that run or choose another --out")
    if latest is None:
        if cfg.resume:
            _say(f"no checkpoint in {ckpts.directory}: starting from step 0")
        return state, None
    meta = ckpts.restore_meta(latest)
    _check_resume(meta, cfg, select, f"{ckpts.directory}/{latest}")
    state, meta = ckpts.restore(latest, state)
    _say(f"resumed at step {latest} (epoch {meta['data']['epoch'] + 1}) from "
         f"{ckpts.directory}")
    return state, meta


class _Run:
    """What one call of train_and_evaluate holds while it runs."""

    def __init__(self, cfg: TrainConfig, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.part = parallel.process_part(cfg.batch_size, mesh)
        self.primary = jax.process_index() == 0
        self.seed = cfg.run_seed
        init_key, self.data_seed = derive_keys(self.seed)
        check_imagenet(cfg)  # settings first, then the data
        self.source = training_source(cfg)
        check_one_batch(cfg, self.source, mesh.size)
        self.val, self.test = eval_scenes(cfg)
        self.select = selection(cfg, self.val, self.test)
        self.out = _prepare_out(cfg)
        probe = input_pipeline.batches(self.source, 1, seed=0, bands=cfg.bands,
                                       band_start=cfg.band_start, shuffle=False)
        shape = (1,) + probe.load([0]).shape[1:]
        probe.close()
        self.task, variables = build_task(cfg, init_key, shape)
        self.optimizer = AdamConfig(cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps)
        self.state = parallel.replicate(create_train_state(
            variables, self.task.trainable, self.optimizer.build()), mesh)
        del variables
        self.ckpts = checkpointing.Checkpoints(self.out / "checkpoints")
        try:
            self.state, meta = _restore_or_start(cfg, self.select, self.ckpts,
                                                 self.state)
            self.best = meta.get("best") if meta else None
            _recover_best(self)
            if meta:
                _reconcile_best(self)
        except BaseException:
            self.ckpts.close()
            raise
        self.batches = input_pipeline.batches(
            self.source, cfg.batch_size, seed=self.data_seed, bands=cfg.bands,
            band_start=cfg.band_start, state=meta["data"] if meta else None,
            part=self.part, augment=cfg.augment, features=frozen_features(self.task, self.state,
                                                     cfg, self.part))
        self.total = cfg.steps or cfg.epochs * self.batches.steps_per_epoch
        self.log = MetricsLog(self.out / "metrics.jsonl", int(self.state.step),
                              write=self.primary)
        if self.primary:
            write_json_atomic(self.out / "config.json", self.describe())

    def describe(self) -> dict:
        return {"train_config": self.cfg.to_dict(), "task": self.task.describe(),
                "seed": self.seed, "data_seed": self.data_seed,
                "select": self.select, "out": str(self.out.resolve())}

    def meta(self) -> dict:
        return {**self.describe(), "step": int(self.state.step),
                "epoch": self.batches.state["epoch"], "data": self.batches.state,
                "best": self.best}

    def save(self):
        self.ckpts.save(self.state, self.meta())

    def close(self):
        self.batches.close()
        self.log.close()
        self.ckpts.close()


# --- The best model: best/, replaced atomically -----------------------------------

BEST = "best"
BEST_RECORD = "best_epoch.json"  # in best/: run.best of the model it holds


def _sync(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _best_tmp(out: pathlib.Path) -> pathlib.Path:
    return out / f".{BEST}.tmp"


def _best_old(out: pathlib.Path) -> pathlib.Path:
    return out / f".{BEST}.old"


def _export_best(run: _Run, state: TrainState):
    """Writes `state`'s model and run.best to best/: all processes export
    into a temporary sibling folder, then process 0 alone renames it into
    place, so best/ is never half written (see `_recover_best`)."""
    tmp, best = _best_tmp(run.out), run.out / BEST
    if run.primary:
        shutil.rmtree(tmp, ignore_errors=True)
    _sync(f"fers_jax best export {run.best['step']} start")
    run.task.export(state.variables(), tmp)
    if run.primary:
        write_json_atomic(tmp / BEST_RECORD, _finite_or_none(run.best))
    _sync(f"fers_jax best export {run.best['step']} written")
    if run.primary:
        _replace_folder(tmp, best)
    _sync(f"fers_jax best export {run.best['step']} done")


def _replace_folder(new: pathlib.Path, dest: pathlib.Path):
    """dest := new by renames; a kill between them leaves dest's previous
    contents complete in .<dest>.old, where `_recover_best` finds them."""
    old = _best_old(dest.parent)
    if dest.exists():
        if not ((dest / BEST_RECORD).is_file() or (dest.is_dir() and all(
                model_checkpoints.is_checkpoint(p) for p in dest.iterdir()))):
            raise TrainingError(f"{dest} is not a best model folder written by "
                                f"training; refusing to replace it")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _recover_best(run: _Run):
    """Mends what a kill during `_export_best` left: the previous best/
    back in place if the new one never arrived, no temporary folders."""
    if run.primary:
        best, old = run.out / BEST, _best_old(run.out)
        if old.is_dir() and not best.exists():
            os.replace(old, best)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(_best_tmp(run.out), ignore_errors=True)
    _sync("fers_jax best recovered")


def _best_step_on_disk(run: _Run) -> Optional[int]:
    """The step of the model in best/ by its record (process 0 reads it,
    every process gets its answer), None if there is none."""
    step = -1
    if run.primary:
        try:
            record = json.loads((run.out / BEST / BEST_RECORD).read_text())
            step = int(record["step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
    return None if step < 0 else step


def _reconcile_best(run: _Run):
    """On resume: makes best/ hold the model of the restored run.best where
    it does not (a run folder from before best/ was written at each new
    best), from the restored state or a checkpoint still on disk."""
    if run.best is None or _best_step_on_disk(run) == run.best["step"]:
        return
    step = run.best["step"]
    if step == int(run.state.step):
        state = run.state
    elif step in run.ckpts.all_steps():
        state, _ = run.ckpts.restore(step, run.state)
    else:
        _say(f"WARNING: {run.out / BEST} does not hold the best epoch so far "
             f"(step {step}) and its checkpoint is gone; best/ is written again "
             f"when validation finds a new best")
        return
    _export_best(run, state)


def train_and_evaluate(cfg: TrainConfig, mesh=None) -> dict:
    """Trains cfg.stage as configured; returns (and writes) the summary.

    `mesh` is the devices to train on (parallel.make_mesh; default: all of
    them): cfg.batch_size must be divisible by their number.

    Raises TrainingError on a non-finite loss (the checkpoints on disk stay
    those of the last good steps). SIGINT / SIGTERM save a checkpoint at the
    next step boundary and return a summary with "interrupted" set.
    """
    if cfg.seeds is not None:
        return train_seeds(cfg, mesh)
    run = _Run(cfg, mesh or parallel.make_mesh())
    try:
        _announce(run)
        interrupted = _train(run)
        if interrupted:
            summary = {"interrupted": interrupted, "step": int(run.state.step),
                       "checkpoints": str(run.ckpts.directory.resolve())}
        else:
            summary = _finish(run)
    finally:
        run.close()
    return summary


def _announce(run: _Run):
    cfg, task = run.cfg, run.task
    _say(f"{task.name} ({cfg.model}): {len(run.source)} training images, "
         f"{run.batches.steps_per_epoch} steps of {cfg.batch_size} per epoch, "
         f"{run.total} steps; seed {run.seed} (data {run.data_seed}); "
         f"{count(run.state.params):,} trainable and "
         f"{count(run.state.frozen):,} frozen parameters; best epoch by "
         f"{run.select} mAUC" + ("" if run.select != "none" else " (none)"))


def _train(run: _Run) -> Optional[str]:
    """The step loop. Returns the signal's name if one stopped it."""
    from tqdm import tqdm
    cfg = run.cfg
    step_fn = jit_train_step(run.task, run.optimizer, run.mesh)
    start = time.perf_counter()
    step = int(run.state.step)
    with StopRequests() as stop, tqdm(
            total=run.total, initial=min(step, run.total), unit="step",
            desc=run.task.name, disable=not cfg.progress,
            dynamic_ncols=True) as bar:
        while step < run.total:
            epoch = run.batches.state["epoch"] + 1
            batch = next(run.batches)
            run.state, measured = step_fn(run.state,
                                          parallel.shard_batch(batch, run.mesh))
            measured = _ordered(jax.device_get(measured))
            if not (math.isfinite(measured["loss"])
                    and math.isfinite(measured["grad_norm"])):
                _stop_non_finite(run, step + 1, epoch, measured)
            step = int(run.state.step)
            if step % cfg.log_every == 0 or step == run.total:
                run.log.write({"kind": "step", "step": step, "epoch": epoch,
                               **measured,
                               "time": round(time.perf_counter() - start, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{measured['loss']:.4g}", epoch=epoch)
            epoch_done = run.batches.state["step_in_epoch"] == 0
            if epoch_done:
                _end_of_epoch(run, step, epoch)
            if (epoch_done or step == run.total or stop.requested
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                run.save()
            if stop.requested:
                _say(f"{stop.requested}: stopped at step {step}; checkpoint "
                     f"saved in {run.ckpts.directory}; continue with --resume")
                return stop.requested
    return None


def _ordered(measured) -> dict:
    """Floats, loss first and the norms last (for reading metrics.jsonl)."""
    last = ("grad_norm", "param_norm")
    keys = ["loss"] + sorted(k for k in measured if k not in ("loss",) + last)
    return {k: float(measured[k]) for k in keys + list(last)}


def _stop_non_finite(run: _Run, step: int, epoch: int, measured: dict):
    run.log.write({"kind": "step", "step": step, "epoch": epoch, **measured,
                   "non_finite": True})
    last = run.ckpts.latest_step()
    kept = (f"the last good checkpoint is step {last} in {run.ckpts.directory}"
            if last is not None else "no checkpoint had been written yet")
    terms = ", ".join(f"{k}={v:.4g}" for k, v in measured.items())
    raise TrainingError(f"non-finite loss or gradient at step {step} (epoch "
                        f"{epoch}): {terms}; training stopped, {kept}")


def _end_of_epoch(run: _Run, step: int, epoch: int):
    """Validation, the epoch record, the best epoch (exported to best/).

    A new best is exported before the epoch's checkpoint is saved, so the
    best epoch that any checkpoint records is already in best/ (a kill in
    between replays the epoch on resume and exports it again).
    """
    if not (run.val or run.test):
        return
    t0 = time.perf_counter()
    record = validate(run.task, run.state, run.val, run.test, run.mesh)
    metric = record.get(f"{run.select}_mauc")
    is_collapsed = collapsed(record.get("scale"))
    improved = (metric is not None and not is_collapsed
                and (run.best is None or metric >= run.best["metric"]))
    if improved:
        run.best = {"step": step, "epoch": epoch, "metric": metric,
                    "select": run.select}
        _export_best(run, run.state)
    run.log.write({"kind": "epoch", "step": step, "epoch": epoch, **record,
                   "best": improved, "collapsed": is_collapsed,
                   "seconds": round(time.perf_counter() - t0, 3)})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                       if k.endswith("_mauc"))
    if "scale" in record:
        scores += (f", spa_f max {record['scale']['spa_max']:.3g} "
                   f"(spe_f {record['scale']['spe_max']:.3g})")
    _say(f"epoch {epoch} (step {step}): {scores}" + (" (best)" if improved else "")
         + (" (collapsed: not selectable)" if is_collapsed else ""))


def _finish(run: _Run) -> dict:
    """Exports the final model; writes summary.json (with where best/ is:
    the best epoch's model was exported when validation found it)."""
    summary = {"interrupted": None, "step": int(run.state.step),
               "epoch": run.batches.state["epoch"], "select": run.select,
               "best": run.best, "checkpoints": str(run.ckpts.directory.resolve()),
               "final": run.task.export(run.state.variables(), run.out / "final")}
    if run.best is not None:
        if _best_step_on_disk(run) == run.best["step"]:
            summary["best_export"] = {name: str((run.out / BEST / name).resolve())
                                      for name in summary["final"]}
        else:  # only after a resume that _reconcile_best could not mend
            summary["best_export"] = None
            _say(f"WARNING: {run.out / BEST} does not hold the best epoch "
                 f"(step {run.best['step']}); no best model exported")
    if run.primary:
        write_json_atomic(run.out / "summary.json", summary)
    _say(f"done: step {summary['step']}; final model in {run.out / 'final'}"
         + (f"; best epoch {run.best['epoch']} ({run.select} mAUC "
            f"{run.best['metric']:.4f}) in {run.out / 'best'}"
            if run.best else ""))
    return summary


# --- Seeds as an axis: `--seeds K` (issue 10) -------------------------------------
#
# K replicas, seeds cfg.run_seed .. cfg.run_seed + K - 1, each an ordinary
# one-seed run in OUT/seed_<s>/ (its own config.json, metrics.jsonl,
# checkpoints/, best/, final/, summary.json: a one-seed run of that seed could
# resume it), trained together by one jitted step over their stacked
# states and batches (each replica draws its own batch order from its seed).
# OUT/seeds.json gathers the replicas' best epochs: mean and std of the metric.

SEEDS_RECORD = "seeds.json"


def seed_configs(cfg: TrainConfig):
    """The one-seed TrainConfig of each replica of a `seeds` run."""
    out = pathlib.Path(cfg.out)
    return [dataclasses.replace(cfg, seed=s, seeds=None,
                                out=str(out / f"seed_{s}"))
            for s in range(cfg.run_seed, cfg.run_seed + cfg.seeds)]


def train_seeds(cfg: TrainConfig, mesh=None) -> dict:
    """train_and_evaluate for cfg.seeds replicas in one program (see above).

    All replicas take the same steps (they share the source and batch size);
    resuming needs every replica's latest checkpoint at the same step.
    A non-finite loss in any replica stops all of them (each keeps its last
    good checkpoint). Returns {"seeds": [...], "runs": [per-seed summaries],
    "interrupted", "step", "best_metric_mean", "best_metric_std"}.
    """
    if jax.process_count() > 1:
        raise InputError("--seeds trains on one host; run one seed per "
                         "process on many hosts")
    mesh = mesh or parallel.make_mesh()
    runs = []
    try:
        for c in seed_configs(cfg):
            runs.append(_Run(c, mesh))
        steps = {int(r.state.step) for r in runs}
        if len(steps) != 1:
            raise TrainingError(
                f"cannot resume {cfg.out}: its seeds' latest checkpoints are "
                f"at different steps ({', '.join(f'seed {r.seed}: step {int(r.state.step)}' for r in runs)})")
        for r in runs:
            _announce(r)
        interrupted = _train_seeds(runs)
        summaries = []
        for r in runs:
            if interrupted:
                summaries.append({"interrupted": interrupted,
                                  "step": int(r.state.step),
                                  "checkpoints": str(r.ckpts.directory)})
            else:
                summaries.append(_finish(r))
    finally:
        for r in runs:
            r.close()
    metrics_ = [r.best["metric"] for r in runs if r.best is not None]
    summary = {"interrupted": interrupted, "step": int(runs[0].state.step),
               "seeds": [r.seed for r in runs], "runs": summaries,
               "best": [r.best for r in runs],
               "best_metric_mean": float(np.mean(metrics_)) if metrics_ else None,
               "best_metric_std": (float(np.std(metrics_, ddof=1))
                                   if len(metrics_) > 1 else None)}
    if not interrupted:
        write_json_atomic(pathlib.Path(cfg.out).expanduser().resolve()
                          / SEEDS_RECORD, _finite_or_none(summary))
        if metrics_:
            _say(f"{len(runs)} seeds: best {runs[0].select} mAUC "
                 f"{summary['best_metric_mean']:.4f}"
                 + (f" +- {summary['best_metric_std']:.4f}"
                    if summary["best_metric_std"] is not None else ""))
    return summary


def _train_seeds(runs) -> Optional[str]:
    """`_train` for stacked replicas: one step (state.jit_train_step_seeds) per batch of each."""
    from tqdm import tqdm
    first = runs[0]
    cfg = first.cfg
    step_fn = jit_train_step_seeds(first.task, first.optimizer, first.mesh)
    sharding = parallel.seed_step_shardings(first.mesh)["in_shardings"][1]
    stacked = stack_states([r.state for r in runs])
    step = int(first.state.step)
    start = time.perf_counter()

    def sync_states():
        for k, r in enumerate(runs):
            r.state = unstack_state(stacked, k)

    with StopRequests() as stop, tqdm(
            total=first.total, initial=min(step, first.total), unit="step",
            desc=f"{first.task.name} x{len(runs)} seeds",
            disable=not cfg.progress, dynamic_ncols=True) as bar:
        while step < first.total:
            epoch = first.batches.state["epoch"] + 1
            batch = jax.device_put(jax.tree.map(
                lambda *xs: np.stack(xs), *[next(r.batches) for r in runs]),
                sharding)
            stacked, measured = step_fn(stacked, batch)
            measured = jax.device_get(measured)
            per_seed = [_ordered({k: v[i] for k, v in measured.items()})
                        for i in range(len(runs))]
            bad = [i for i, m in enumerate(per_seed)
                   if not (math.isfinite(m["loss"])
                           and math.isfinite(m["grad_norm"]))]
            if bad:
                sync_states()
                _stop_non_finite(runs[bad[0]], step + 1, epoch, per_seed[bad[0]])
            step += 1
            elapsed = round(time.perf_counter() - start, 3)
            if step % cfg.log_every == 0 or step == first.total:
                for r, m in zip(runs, per_seed):
                    r.log.write({"kind": "step", "step": step, "epoch": epoch,
                                 **m, "time": elapsed})
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean([m['loss'] for m in per_seed]):.4g}",
                            epoch=epoch)
            epoch_done = first.batches.state["step_in_epoch"] == 0
            save = (epoch_done or step == first.total or stop.requested
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0))
            if epoch_done or save:
                sync_states()
            if epoch_done:
                for r in runs:
                    _end_of_epoch(r, step, epoch)
            if save:
                for r in runs:
                    r.save()
            if stop.requested:
                _say(f"{stop.requested}: stopped at step {step}; checkpoints "
                     f"saved in each seed's folder; continue with --resume")
                return stop.requested
    sync_states()
    return None
