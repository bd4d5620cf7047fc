"""The evaluation job: scenes in, detection maps, AUCs and a report out.

`evaluate(...)` streams scene files, groups consecutive scenes of one shape
into batches (a HAD100 test split is one vmapped call per batch), runs the
chosen detector, scores every map and writes, under `out`:

* results.json: method, bands, device, mean AUC and one entry per scene
  (name, shape, auc, auc_pd_tau, auc_pf_tau, best F1, seconds,
  compile_seconds), written atomically;
* maps/<name>.npy (float32 H x W) and maps/<name>.png (map beside its mask);
* roc.png, the ROC curves of all scored scenes;
* report.md and report.html with the table, maps, ROC curves and box plots;
* features/<name>.npz with spe_f / spa_f when `export` is set (FERD, FERS).

`compare(...)` runs several methods over the same scenes (each scene loaded
once) and writes one comparison under `out`: results.json with one block
per method (each in the single-method format above) and the per-scene AUC
table; maps/<method>/<name>.npy; maps/<name>.png, the maps side by side
with one colour bar; roc/<name>.png, one curve per method;
features/<method>/<name>.npz with `export`; report.md and report.html with
the table, the best of each row marked, and a mean row.
Every method has its own `EvalConfig`: its options stay in one place.

Maps, features and plots are written to a hidden staging folder in `out`
and moved into place only when every scene has been scored: a run that
stops half way (a corrupt scene, Ctrl-C) leaves the outputs of an earlier
run in `out` as they were.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import contextlib
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from fers_jax import data, detectors, metrics, parallel, plan as planning
from fers_jax.errors import InputError
from fers_jax.plan import CLASSICAL, LEARNED, ScenePlan

METHODS = CLASSICAL + LEARNED

# A detector maps a normalised batch (N, H, W, B) and its ScenePlan
# (fers_jax.plan) to maps (N, H, W) and a dict of per-image features to
# export (empty for the classical detectors).
Detector = Callable[..., Tuple[np.ndarray, Dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to run; each field is a command-line option of evaluate.py."""
    method: str = "rx"
    bands: Optional[int] = None
    start_band: int = 0
    precision: str = "auto"
    inner: int = 3
    outer: int = 11
    lam: float = 1e-6
    # LRX/CRD convention (fers_jax.detectors.Convention); border, lrx_form
    # and crd_form None: the convention's own.
    convention: str = "fers_jax"
    border: Optional[str] = None
    lrx_form: Optional[str] = None
    crd_form: Optional[str] = None
    delta: float = 1e-5
    teacher: Optional[str] = None
    student: Optional[str] = None
    fusion: str = "auto"
    batch_size: int = 16
    sensor: str = "aviris_ng"
    cube_key: Optional[str] = None
    gt_key: Optional[str] = None
    drop_bad_bands: bool = False
    export: bool = False
    plots: bool = True
    tile: Any = "auto"
    dtype: str = "float32"
    shard: bool = True
    memory_budget: Optional[float] = None  # GB; None: fers_jax.plan.default_budget


def build_detector(cfg: EvalConfig) -> Tuple[Detector, EvalConfig]:
    """The detector function for `cfg.method`, compiled lazily per shape.

    Whole-image batches of RX, FERD and FERS are sharded over a mesh of
    every device (fers_jax.parallel), or of the first alone when
    `cfg.shard` is off.

    Returns the detector and the config with `bands` filled in where a
    checkpoint decides it.
    """
    mesh = parallel.make_mesh() if cfg.shard else parallel.one_device_mesh()
    if cfg.method == "rx":
        return _rx_detector(cfg, mesh), cfg
    if cfg.method in ("lrx", "crd"):
        return _local_detector(cfg), cfg
    if cfg.method in LEARNED:
        from fers_jax import inference  # pulls in Flax only when needed
        detector, bands = inference.build_detector(cfg, mesh)
        return detector, dataclasses.replace(cfg, bands=bands)
    raise InputError(f"unknown method {cfg.method!r}; choose one of {METHODS}")


def _local_detector(cfg: EvalConfig) -> Detector:
    """LRX or CRD of a batch in memory, or out of core (x a tiling.LazyImage)
    in blocks of the plan's rows (detectors.lrx_streaming / crd_streaming)."""
    conv = local_convention(cfg)
    if cfg.method == "lrx":
        kw = dict(border=conv.border, form=conv.lrx_form, delta=cfg.delta)
        whole, streamed = detectors.lrx, detectors.lrx_streaming
    else:
        kw = dict(lam=cfg.lam, border=conv.border, form=conv.crd_form)
        whole, streamed = detectors.crd, detectors.crd_streaming

    def detect(x, plan: Optional[ScenePlan] = None, **_):
        if plan is not None and plan.path == "out-of-core":
            known = None if x.normalised else (x.lo, x.hi)  # raw: the pass done
            return streamed(x.cube_view(), cfg.inner, cfg.outer, **kw,
                            block_rows=plan.tile[0], minmax=known)[None], {}
        return np.asarray(whole(x, cfg.inner, cfg.outer, **kw)), {}
    return detect


def local_convention(cfg: EvalConfig) -> detectors.Convention:
    """The LRX/CRD convention of `cfg`: --convention with any of --border,
    --lrx-form, --crd-form replacing its own."""
    return detectors.convention(cfg.convention, border=cfg.border,
                                lrx_form=cfg.lrx_form, crd_form=cfg.crd_form)


def _rx_detector(cfg: EvalConfig, mesh) -> Detector:
    """RX on whole images (a batch sharded over `mesh`), streamed over row
    chunks when the plan tiles (detectors.rx_streaming: the same
    statistics, bounded memory), or from disk when it says out of core."""
    def detect(x, plan: Optional[ScenePlan] = None, **_):
        plan = plan if plan is not None else planning.plan_for(cfg, np.shape(x), in_memory=True)
        if plan.path == "out-of-core":  # x: a tiling.LazyImage
            return np.asarray(detectors.rx_streaming(
                x.cube_view(), plan.rx_precision, plan.chunk_pixels))[None], {}
        if plan.rx == "stream":
            return np.stack([np.asarray(detectors.rx_streaming(xi, plan.rx_precision))
                             for xi in x]), {}
        xs, n = parallel.shard_padded(x, mesh)
        return parallel.to_host(detectors.rx(xs, plan.rx_precision))[:n], {}
    return detect


def _batches(files: Sequence[pathlib.Path], cfgs: Sequence[EvalConfig]
             ) -> Iterator[Tuple[List[data.Scene], Dict[tuple, Any], List[ScenePlan]]]:
    """Yields (scenes, inputs, plans): runs of consecutive same-shape scenes,
    at most batch_size each, with their inputs per selection (bands,
    start_band, scaling) of `cfgs` (`_selection`; each scene is opened once,
    whatever the number of methods) and one plan per config
    (fers_jax.plan.plan_for).

    A scene that some method's plan runs out of core comes alone, its
    reference-normalised inputs `tiling.LazyImage`s (normalised on the fly
    from disk); a flight line (plan.is_flight_line) alone, normalised
    without a float64 copy.
    """
    from fers_jax import tiling
    first = cfgs[0]
    selections = list(dict.fromkeys(_selection(c) for c in cfgs))
    run, inputs, shapes = [], [], None

    def flush():
        batch = _stack(inputs)
        return run, batch, [planning.plan_for(c, batch[_selection(c)].shape)
                            for c in cfgs]

    for f in files:
        scene = data.open_scene(f, first.cube_key, first.gt_key, first.drop_bad_bands)
        raw = {sel: data.select_bands(scene.cube, *sel[:2], scene.path) for sel in selections}
        try:
            plans = [planning.plan_for(c, (1,) + tuple(raw[_selection(c)].shape))
                     for c in cfgs]
        except InputError as e:  # a budget too small for this scene
            raise InputError(f"{scene.path}: {e}") from None
        if any(p.path == "out-of-core" for p in plans):
            if run:
                yield flush()
                run, inputs, shapes = [], [], None
            lazy = {}
            for sel, cube in raw.items():
                rows = _block_rows(cube.shape)
                lo, hi = data.minmax_streamed(cube, rows, scene.path)
                band = max((p.tile[0] + 16 for p in plans if p.tile), default=rows)
                lazy[sel] = tiling.LazyImage(cube, lo, hi, band,
                                             normalised=sel[2] != "cube")
            yield [scene], lazy, plans
            continue
        if planning.is_flight_line(scene.shape):
            x = {sel: (data.normalise_streamed(cube, where=scene.path)
                       if sel[2] != "cube" else _prepare(np.asarray(cube),
                                                         (None, 0, "cube"), scene.path))
                 for sel, cube in raw.items()}
            limit = 1
        else:
            if isinstance(scene.cube, data.DiskCube):
                scene = dataclasses.replace(scene, cube=data.check_cube(
                    np.asarray(scene.cube), scene.cube.where))
            x = {sel: _prepare(scene.cube, sel, scene.path) for sel in selections}
            limit = first.batch_size
        key = tuple(v.shape for v in x.values())
        if inputs and (key != shapes or len(run) >= limit):
            yield flush()
            run, inputs = [], []
        run.append(scene)
        inputs.append(x)
        shapes = key
    if run:
        yield flush()


def _block_rows(shape) -> int:
    """Rows per block of a streamed pass: about 32 MB of float32."""
    return max(1, (32 << 20) // max(1, 4 * int(shape[1]) * int(shape[2])))


def _selection(cfg: EvalConfig) -> tuple:
    """The input a method needs: (bands, start_band, scaling)."""
    scaling = (local_convention(cfg).scaling if cfg.method in ("lrx", "crd")
               else "reference")
    return cfg.bands, cfg.start_band, scaling


def _prepare(cube, sel: tuple, where) -> np.ndarray:
    """The input of a selection: bands chosen, then the reference's
    normalisation, or (LRX/CRD scaling "cube") the float64 cube as it is,
    min-max scaled over the whole cube by the detector itself."""
    x = data.select_bands(cube, *sel[:2], where)
    if sel[2] == "cube":
        x = np.asarray(x, np.float64)
        if x.size and x.max() == x.min():
            raise InputError(f"{where}: the cube is constant (every value "
                             f"{float(x.flat[0])}): nothing to normalise or detect")
        return x
    return data.normalise(x, where)


def prepare_input(cube, cfg: EvalConfig, where="cube") -> np.ndarray:
    """What `cfg`'s detector gets for one cube (H, W, B), as evaluate.py
    prepares it."""
    return _prepare(cube, _selection(cfg), where)


def _stack(inputs: List[Dict[tuple, np.ndarray]]) -> Dict[tuple, np.ndarray]:
    return {sel: np.stack([x[sel] for x in inputs]) for sel in inputs[0]}


def _timed(detector: Detector, batch, plan: ScenePlan, seen_shapes: set, **kw):
    """Runs the detector; returns outputs, run seconds and compile seconds.

    The first batch of a new shape is run twice: the first call pays tracing
    and compilation, the second is what every later batch of that shape costs.
    A flight line (fers_jax.plan.is_flight_line) or a scene out of core is
    run once: its seconds include the compilation, reported as 0.
    """
    def once():
        start = time.perf_counter()
        maps, extras = detector(batch, plan, **kw)
        return maps, extras, time.perf_counter() - start
    key = tuple(batch.shape)
    maps, extras, first = once()
    if (key in seen_shapes or plan.path == "out-of-core"
            or planning.is_flight_line(batch.shape[1:3])):
        seen_shapes.add(key)
        return maps, extras, first, 0.0
    seen_shapes.add(key)
    maps, extras, second = once()
    return maps, extras, second, max(first - second, 0.0)


def device_description() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)}"


def write_json_atomic(path: pathlib.Path, obj) -> None:
    """Writes JSON through a temporary file and a rename: never half a file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def prepare_out_dir(out) -> pathlib.Path:
    """Creates the output folder, or says plainly why it cannot be used."""
    out = pathlib.Path(out)
    try:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror})") from None
    if not os.access(out, os.W_OK) or not os.access(out / "maps", os.W_OK):
        raise InputError(f"{out}: the output folder is not writable")
    return out


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def safe_name(name) -> str:
    """A scene name made into one plain file name inside the output folder.

    Names become maps/<name>.npy|png and features/<name>.npz, and they can
    come from data (a dataset's stored names, a `Scene` built in code), so
    path separators and control characters become '_' and leading dots go:
    no name reaches outside `out`, none is hidden, '.' or '..'. Other
    characters (accents, CJK) are kept; the name is cut to 200 UTF-8 bytes.
    """
    name = _UNSAFE_CHARS.sub("_", str(name)).strip().lstrip(".")
    name = name.encode("utf-8")[:200].decode("utf-8", "ignore")
    return name or "scene"


def _unique_name(name: str, taken: set) -> str:
    name = safe_name(name)
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


@contextlib.contextmanager
def _staging(out: pathlib.Path):
    """A hidden folder in `out` for a run's files, removed if the run fails."""
    stage = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: pathlib.Path, out: pathlib.Path) -> None:
    """Moves every file of `stage` to the same place under `out` (each move
    atomic, os.replace)."""
    for src in sorted(p for p in stage.rglob("*") if p.is_file()):
        dst = out / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


@dataclasses.dataclass
class _Method:
    """One method of a run: its config, detector and what it has scored."""
    cfg: EvalConfig
    detector: Detector
    rows: list = dataclasses.field(default_factory=list)
    seen_shapes: set = dataclasses.field(default_factory=set)

    @property
    def label(self) -> str:
        return self.cfg.method


def _method(cfg: EvalConfig) -> _Method:
    detector, cfg = build_detector(cfg)
    return _Method(cfg, detector)


def evaluate(scene_paths: Iterable, out, cfg: EvalConfig,
             progress: bool = True) -> dict:
    """Runs one method over scenes and writes its results under `out`.

    Returns:
      The results dict, as written to out/results.json.
    """
    files = data.find_scene_files(scene_paths, sensor=cfg.sensor)
    method = _method(cfg)
    out = prepare_out_dir(out)
    curves = {}

    def scored(scene, name, maps, stage):
        score_map = maps[method.label]
        if method.rows[-1]["auc"] is not None:
            curves[name] = metrics.roc_curve(score_map, scene.gt)
        from fers_jax import plots
        plots.save_map(stage / "maps" / f"{name}.png", score_map,
                       scene.gt, title=f"{name} ({cfg.method})",
                       max_side=PREVIEW_MAX_SIDE)
    with _staging(out) as stage:
        _score(files, [method], stage, progress, scored if cfg.plots else None)
        results = _summary(method.cfg, method.rows)
        if cfg.plots and curves:
            from fers_jax import plots
            plots.save_roc(stage / "roc.png", curves, title=f"ROC ({cfg.method})")
        _publish(stage, out)
    write_json_atomic(out / "results.json", results)
    from fers_jax import report
    report.write_report(out, results)
    return results


def compare(scene_paths: Iterable, out, cfgs: Sequence[EvalConfig],
            progress: bool = True) -> dict:
    """Runs several methods over the same scenes; one comparison under `out`.

    Args:
      cfgs: one EvalConfig per method (distinct methods). Scenes are found,
        loaded and batched by the first one's sensor, keys and batch size;
        plots and export follow it too.

    Returns:
      The comparison dict, as written to out/results.json: `methods` (their
      order), `scenes` (name, shape, path, `auc` per method, `best`: the
      methods with the row's best AUC at 4 digits), `mean_auc` per method,
      `best_mean`, and `results`: each method's block in the single-method
      format (`evaluate`'s results.json).
    """
    cfgs = list(cfgs)
    labels = [c.method for c in cfgs]
    if not cfgs or len(set(labels)) != len(labels):
        raise InputError(f"methods to compare must be distinct, got {labels}")
    files = data.find_scene_files(scene_paths, sensor=cfgs[0].sensor)
    methods = [_method(c) for c in cfgs]
    out = prepare_out_dir(out)
    plots_on = cfgs[0].plots

    def scored(scene, name, maps, stage):
        from fers_jax import plots
        plots.save_maps(stage / "maps" / f"{name}.png", maps, scene.gt,
                        title=name, max_side=PREVIEW_MAX_SIDE)
        if metrics.check_scorable(scene.gt) is None:
            (stage / "roc").mkdir(exist_ok=True)
            plots.save_roc(stage / "roc" / f"{name}.png",
                           {m: metrics.roc_curve(v, scene.gt)
                            for m, v in maps.items()}, title=f"ROC: {name}")
    with _staging(out) as stage:
        _score(files, methods, stage, progress, scored if plots_on else None)
        results = comparison(
            {m.label: _summary(m.cfg, m.rows) for m in methods})
        _publish(stage, out)
    write_json_atomic(out / "results.json", results)
    from fers_jax import report
    report.write_comparison_report(out, results)
    return results


def _score(files, methods: List[_Method], stage: pathlib.Path, progress: bool,
           scored: Optional[Callable] = None) -> None:
    """Runs every method on every batch of scenes; appends their rows and
    writes the maps (maps/<name>.npy for one method, maps/<method>/<name>.npy
    for several) and features into `stage`. `scored(scene, name, {method:
    map}, stage)` is called after each scene, for its figures."""
    single = len(methods) == 1
    names = set()
    folder = {m.label: stage / "maps" / ("" if single else m.label)
              for m in methods}
    for f in folder.values():
        f.mkdir(parents=True, exist_ok=True)

    def detect(scenes, inputs, plans, spill):
        outputs = {}
        for m, plan in zip(methods, plans):
            batch = inputs[_selection(m.cfg)]
            if plan.path != "out-of-core" and not isinstance(batch, np.ndarray):
                batch = np.asarray(batch)  # this method fits in memory
            (spill / m.label).mkdir(parents=True, exist_ok=True)
            try:
                outputs[m.label] = _timed(
                    m.detector, batch, plan, m.seen_shapes, spill_dir=spill / m.label,
                    progress=progress and plan.path != "whole")
            except InputError as e:  # e.g. a window larger than this scene
                more = f" (and {len(scenes) - 1} more)" if len(scenes) > 1 else ""
                which = "" if single else f"{m.label}: "
                raise InputError(f"{scenes[0].path}{more}: {which}{e}") from None
        return outputs

    def write(scene, i, n, plans, outputs):
        name = _unique_name(scene.name, names)
        maps = {}
        for m, plan in zip(methods, plans):
            all_maps, extras, seconds, compile_s = outputs[m.label]
            maps[m.label] = np.asarray(all_maps[i], np.float32)
            m.rows.append({
                "name": name, "shape": list(scene.shape),
                **metrics.scene_metrics(all_maps[i], scene.gt, scene.path),
                "seconds": seconds / n,
                "compile_seconds": compile_s if i == 0 else 0.0,
                "plan": {"path": plan.path, "tile": plan.tile,
                         "fusion": plan.fusion, "rx": plan.rx,
                         "rx_precision": plan.rx_precision},
                "path": scene.path, **_wavelengths(scene, m.cfg)})
            save_npy_blocks(folder[m.label] / f"{name}.npy", maps[m.label])
            if extras:
                _export(stage, name if single else f"{m.label}/{name}",
                        {k: v[i] for k, v in extras.items()})
        if scored is not None:
            scored(scene, name, maps, stage)

    desc = "+".join(m.label for m in methods)
    # As a context: a failure mid-run closes the bar first, so that the
    # error is printed on a line of its own.
    with _progress(len(files), desc, progress) as bar:
        for scenes, inputs, plans in _batches(files, [m.cfg for m in methods]):
            # Out of core, RX inputs and exported features are spilled here
            # (a folder per method) until the batch's outputs are written.
            spill = stage / ".spill"
            try:
                outputs = detect(scenes, inputs, plans, spill)
                for i, scene in enumerate(scenes):
                    write(scene, i, len(scenes), plans, outputs)
                    bar.update(1)
            finally:
                shutil.rmtree(spill, ignore_errors=True)


def comparison(blocks: Dict[str, dict]) -> dict:
    """The comparison record of several methods' results (`compare`)."""
    labels = list(blocks)
    first = blocks[labels[0]]
    scenes = []
    for k, row in enumerate(first["scenes"]):
        aucs = {m: blocks[m]["scenes"][k]["auc"] for m in labels}
        scenes.append({"name": row["name"], "shape": row["shape"],
                       "path": row["path"], "auc": aucs, "best": _best(aucs)})
    means = {m: blocks[m]["mean_auc"] for m in labels}
    return {"methods": labels, "device": first["device"], "scenes": scenes,
            "mean_auc": means, "best_mean": _best(means), "results": blocks}


def _best(values: Dict[str, Optional[float]]) -> list:
    """The keys whose value is the highest at the 4 digits reports show."""
    shown = {k: round(v, 4) for k, v in values.items() if v is not None}
    top = max(shown.values(), default=None)
    return [k for k, v in shown.items() if v == top]


PREVIEW_MAX_SIDE = 1024  # larger maps get a downsampled PNG preview


def save_npy_blocks(path, a: np.ndarray, rows: int = 256) -> None:
    """np.save's .npy, written a block of rows at a time (no full-size
    temporary, whatever `a` is: an array or a memory map)."""
    with open(path, "wb") as f:
        _write_npy(f, a, np.dtype(a.dtype), rows)


def _write_npy(f, a, dtype: np.dtype, rows: int) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype),
              "fortran_order": False, "shape": tuple(a.shape)}
    np.lib.format.write_array_header_1_0(f, header)
    for r in range(0, a.shape[0], rows):
        f.write(np.ascontiguousarray(a[r:r + rows], dtype).tobytes())


def _wavelengths(scene: data.Scene, cfg: EvalConfig) -> dict:
    """The wavelengths of the bands a method used (ENVI scenes), for results.json."""
    if scene.wavelengths is None:
        return {}
    used = list(scene.wavelengths)[cfg.start_band:]
    if cfg.bands is not None:
        used = used[:cfg.bands]
    return {"wavelengths": used, "wavelength_units": scene.wavelength_units}


def _export(out: pathlib.Path, name: str, features: Dict[str, Any]) -> None:
    """features/<name>.npz: np.savez's format, each array (or a data.DiskCube
    of a scene out of core) written a block of rows at a time."""
    path = out / "features" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz_blocks(path, features)


def save_npz_blocks(path, arrays: Dict[str, Any], rows: int = 256) -> None:
    """np.savez (uncompressed) of float32 arrays, each written `rows` rows at
    a time into its zip member (an array, a memory map or a data.DiskCube:
    no full-size copy)."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, a in arrays.items():
            with z.open(f"{k}.npy", "w", force_zip64=True) as f:
                _write_npy(f, a, np.dtype(np.float32), rows)


def _summary(cfg: EvalConfig, rows: list) -> dict:
    aucs = [r["auc"] for r in rows if r["auc"] is not None]
    paths = sorted({r["plan"]["path"] for r in rows})
    return {"method": cfg.method, "bands": cfg.bands, "start_band": cfg.start_band,
            "paths": paths, "memory_budget_gb": cfg.memory_budget,
            "device": device_description(),
            "mean_auc": float(np.mean(aucs)) if aucs else None,
            "scored_scenes": len(aucs),
            "config": dataclasses.asdict(cfg), "scenes": rows}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="scene", disable=not enabled,
                dynamic_ncols=True)


def configs_from_args(args) -> List[EvalConfig]:
    """One config per --method (several: a comparison), each checked."""
    methods = args.method
    methods = ["rx"] if not methods else (
        [methods] if isinstance(methods, str) else list(methods))
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise InputError(f"--method lists {', '.join(twice)} more than once")
    return [config_from_args(argparse.Namespace(**{**vars(args), "method": m}))
            for m in methods]


def config_from_args(args) -> EvalConfig:
    """Builds the config from parsed options, checking what argparse cannot."""
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.method in LEARNED and not cfg.teacher:
        raise InputError(f"--method {cfg.method} needs --teacher CKPT")
    if cfg.method == "fers" and not cfg.student:
        raise InputError("--method fers needs --student CKPT")
    local_convention(cfg)  # checks --convention, --border, --*-form
    if not (np.isfinite(cfg.delta) and cfg.delta > 0):
        raise InputError(f"--delta must be > 0, got {cfg.delta}")
    if not (isinstance(cfg.tile, str) and cfg.tile.strip().lower() == "auto"):
        tile = planning.parse_tile(cfg.tile)
        cfg = dataclasses.replace(cfg, tile=list(tile) if tile else "off")
    if cfg.memory_budget is None:
        cfg = dataclasses.replace(cfg, memory_budget=round(
            planning.default_budget() / 1e9, 3))
    elif not cfg.memory_budget > 0:
        raise InputError(f"--memory-budget must be positive (GB), got {cfg.memory_budget}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    return cfg


def format_comparison(results: dict) -> str:
    """The comparison's AUC table for the terminal; * marks a row's best."""
    methods = results["methods"]
    width = max(8, *(len(m) + 1 for m in methods))

    def cells(values, best):
        return "".join(
            f"{('-' if values[m] is None else f'{values[m]:.4f}') + ('*' if m in best else ' '):>{width + 1}}"
            for m in methods)
    lines = [f"{'scene':<24}" + "".join(f"{m:>{width}} " for m in methods)]
    lines += [f"{r['name']:<24}" + cells(r["auc"], r["best"])
              for r in results["scenes"]]
    lines.append(f"{'mean':<24}" + cells(results["mean_auc"], results["best_mean"]))
    lines.append(f"AUC per scene (* best of the row) on {results['device']}")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    """A short table for the terminal."""
    lines = [f"{'scene':<24} {'shape':<16} {'AUC':>8} {'seconds':>9}"]
    for r in results["scenes"]:
        auc = f"{r['auc']:.4f}" if r["auc"] is not None else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<24} {shape:<16} {auc:>8} {r['seconds']:>9.4f}")
    mean = results["mean_auc"]
    lines.append(f"{results['method']} mean AUC: "
                 + (f"{mean:.4f}" if mean is not None else "- (no scene with a mask)")
                 + f" on {results['device']}")
    return "\n".join(lines)
