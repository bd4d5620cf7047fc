"""The accelerator check's measurements (run by benchmarks/device_check.sh).

On the default JAX device (a GPU when one is there), with full float32
matmul precision (jax_default_matmul_precision 'highest', set by the
script), it records:

- AUCs on the shipped scenes (../shared/data/scenes) of RX (all bands),
  FERD (published 100-band teacher) and FERS (50 bands, published teacher,
  the golden random student, product fusion) against the reference's
  (../shared/reference/golden/scene_maps/auc.json), as the CPU tests check
  them (RX and FERD within 1e-4, FERS within 1e-3);
- seconds per ABU-size scene (100x100) of FERD and FERS, compiled, median
  of --repeats (the paper: 0.2285 s per scene on its GPU);
- a batch of 100 64x64 crops through FERS (seconds, images/s);
- stage-2 steps per second (full sizes, batch 16 of 64x64 at 100 bands,
  --trunk-bn running; the teacher recomputed, and spe_f read from the
  batch as train.py feeds it) and stage-1 steps per second (full sizes,
  batch 16 of 64x64 at 100 bands);

and writes them, with the parity tests' outcome (--pytest-junit), as JSON.
--dry-run runs the same code at tiny sizes on one scene (RX and FERD;
FERS in the small batch only), for CI on CPU.
fers_jax only: torch is not needed here.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ET

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FERS_SHARED", REPO.parent / "shared"))
SCENES = SHARED / "data" / "scenes"
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints" / "saved_models"
PAPER_S_PER_SCENE = 0.2285

sys.path.insert(0, str(REPO))
from fers_jax import checkpoints, data, evaluation, metrics  # noqa: E402
from fers_jax.training import stage1, stage2, state  # noqa: E402

# (method, bands, teacher, student, AUC key, tolerance)
METHODS = {
    "rx": (None, None, None, "grx_allbands", 1e-4),
    "ferd": (100, CHECKPOINTS / "100bands", None, "ferd_100bands", 1e-4),
    "fers": (50, CHECKPOINTS / "50bands", GOLDEN / "spa_fen_random_50bands.pt",
             "fers_50bands_random_student", 1e-3),
}


def timed(fn, repeats):
    """(first call s, median s of `repeats` more), every result waited on."""
    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0
    first = once()
    return first, statistics.median(once() for _ in range(max(1, repeats)))


def scenes_part(names, methods, repeats):
    want = json.loads((GOLDEN / "scene_maps" / "auc.json").read_text())
    out = {}
    for method in methods:
        bands, teacher, student, key, tol = METHODS[method]
        detect, _ = evaluation.build_detector(evaluation.EvalConfig(
            method=method, bands=bands, teacher=teacher and str(teacher),
            student=student and str(student), plots=False))
        rows = {}
        for name in names:
            scene = data.load_scene(SCENES / f"{name}.mat")
            x = data.prepare(scene, bands)[None]
            first, median = timed(lambda: detect(x)[0], repeats)
            auc = metrics.roc_auc(detect(x)[0][0], scene.gt, name)
            rows[name] = {"shape": list(x.shape[1:]), "auc": auc,
                          "reference_auc": want[name][key],
                          "auc_ok": abs(auc - want[name][key]) <= tol,
                          "first_call_s": first, "s_per_scene": median}
        abu = [r["s_per_scene"] for r in rows.values() if r["shape"][:2] == [100, 100]]
        out[method] = {"scenes": rows, "tolerance": tol,
                       "s_per_abu_scene": statistics.median(abu) if abu else None}
        if method != "rx" and abu:
            out[method]["speedup_vs_paper"] = PAPER_S_PER_SCENE / out[method]["s_per_abu_scene"]
    return out


def crops_part(n, size, repeats):
    bands, teacher, student, _, _ = METHODS["fers"]
    scene = data.load_scene(SCENES / "abu-airport-2.mat")
    cube = data.select_bands(scene.cube, bands)
    rng = np.random.default_rng(0)
    h, w = cube.shape[:2]
    x = np.stack([data.normalise(cube[i:i + size, j:j + size])
                  for i, j in zip(rng.integers(0, h - size + 1, n),
                                  rng.integers(0, w - size + 1, n))])
    detect, _ = evaluation.build_detector(evaluation.EvalConfig(
        method="fers", bands=bands, teacher=str(teacher), student=str(student),
        plots=False))
    first, median = timed(lambda: detect(x)[0], repeats)
    return {"images": n, "size": size, "bands": bands, "first_call_s": first,
            "s_per_batch": median, "images_per_s": n / median}


def step_rate(task, variables, batch, repeats):
    optimizer = state.AdamConfig()
    variables = jax.tree.map(np.array, variables)  # the step donates its state
    st = state.create_train_state(variables, task.trainable, optimizer.build())
    step = state.jit_train_step(task, optimizer)
    holder = {"st": st}

    def once():
        holder["st"], m = step(holder["st"], batch)
        return holder["st"], m
    first, median = timed(once, repeats)
    return {"first_step_s": first, "s_per_step": median,
            "steps_per_s": 1 / median}


def steps_part(size, batch, model, repeats):
    """Full sizes: the published 100-band teacher; tiny: the golden tiny
    stage-1 file's teacher (20 bands)."""
    bands, teacher = ((100, CHECKPOINTS / "100bands") if model == "full" else
                      (20, GOLDEN / "stage1_tiny_random_20bands.pt"))
    x = np.random.default_rng(0).uniform(-0.1, 0.1, (batch, size, size, bands)
                                         ).astype(np.float32)
    teacher, tv = checkpoints.load_teacher(teacher, bands)
    task2 = stage2.task(teacher.config, model, trunk_bn="running")
    v2 = task2.init_variables(jax.random.key(0), (1, size, size, bands), tv)
    spe_f = task2.frozen_features(v2, chunk=batch)["spe_f"](x)
    task1 = stage1.task(bands, model)
    v1 = task1.init_variables(jax.random.key(0), (1, size, size, bands))
    out = {"batch": batch, "size": size, "bands": bands, "model": model,
           "stage2_spe_f_from_batch": step_rate(
               task2, v2, {"image": x, "spe_f": spe_f}, repeats),
           "stage1": step_rate(task1, v1, x, repeats)}
    if model == "full":  # one compilation more: not in the dry run
        out["stage2_teacher_recomputed"] = step_rate(task2, v2, x, repeats)
    return out


def junit(path):
    if not path or not pathlib.Path(path).is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors",
                                                "skipped")}
    counts["passed"] = counts["failures"] == counts["errors"] == 0
    counts["time_s"] = float(suite.get("time", 0))
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes, one scene: a CPU check of this script")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--pytest-junit", default=None)
    p.add_argument("--out", default=None, help="the JSON (default: "
                   "benchmarks/results/device_<device name>.json)")
    args = p.parse_args(argv)
    dry = args.dry_run
    repeats = args.repeats or (1 if dry else 5)
    device = jax.devices()[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device.device_kind).strip("_")
    t0 = time.perf_counter()
    record = {
        "benchmark": "device_check", "dry_run": dry,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": {"platform": device.platform, "kind": device.device_kind,
                   "count": jax.device_count()},
        "jax": jax.__version__,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "parity_tests": junit(args.pytest_junit),
        "paper_s_per_scene": PAPER_S_PER_SCENE}
    names = ["abu-airport-2"] if dry else [
        "abu-airport-2", "abu-beach-2", "abu-urban-3", "sandiego-2", "pavia-car"]
    # The dry run leaves FERS out of the scenes (its 100x100 student would
    # compile for a minute on CPU); the FERS batch still runs it, small.
    methods = ("rx", "ferd") if dry else tuple(METHODS)
    parts = {"scenes": lambda: scenes_part(names, methods, repeats),
             "fers_batch": lambda: crops_part(4 if dry else 100,
                                              32 if dry else 64, repeats),
             "train_steps": lambda: (steps_part(24, 4, "tiny", repeats) if dry
                                     else steps_part(64, 16, "full", repeats))}
    record["part_seconds"] = {}
    for key, part in parts.items():
        t1 = time.perf_counter()
        record[key] = part()
        record["part_seconds"][key] = time.perf_counter() - t1
        print(f"  {key}: {record['part_seconds'][key]:.1f} s", flush=True)
    record["auc_ok"] = all(r["auc_ok"] for m in record["scenes"].values()
                           for r in m["scenes"].values())
    record["seconds"] = time.perf_counter() - t0
    out = pathlib.Path(args.out or REPO / "benchmarks" / "results" /
                       f"device_{name}{'_dry_run' if dry else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    s = record["scenes"]
    fers = s.get("fers", {}).get("s_per_abu_scene") or float("nan")
    print(f"{device.device_kind}: FERD {s['ferd']['s_per_abu_scene']:.4f} s/scene, "
          f"FERS {fers:.4f} s/scene (paper "
          f"{PAPER_S_PER_SCENE}); FERS batch {record['fers_batch']['images_per_s']:.1f}"
          f" img/s; stage 2 {record['train_steps']['stage2_spe_f_from_batch']['steps_per_s']:.2f}"
          f" steps/s, stage 1 {record['train_steps']['stage1']['steps_per_s']:.2f}"
          f" steps/s; AUCs {'ok' if record['auc_ok'] else 'DIFFER'}; wrote {out}")
    return 0 if record["auc_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
