"""Training as users run it, fers_jax against the PyTorch baseline.

  epoch   the stage-2 epoch: `train.py stage2` (a subprocess, as a user runs
          it) on ../shared/data/train and background, 100 bands, 32x32
          patches at stride 8, batch 16, --trunk-bn running, the published
          100-band teacher, two epochs; per-step times read from its
          metrics.jsonl. Against the same epochs written as the reference
          trains: a torch DataLoader (shuffle, batch 16, drop_last) over the
          same patches, each image band-selected and normalised in the
          Dataset, and torch_reference.Stage2Step (teacher recomputed for
          every batch under no_grad). Runs alternate, fers_jax then torch,
          --rounds times; medians over the steps of each epoch.
  stage1  the full-size stage-1 step (frozen Wide-ResNet-101-2 encoder,
          OCBE, decoder, de_ConvH, classifier; batch 16 of 64x64 at 100
          bands): fers_jax's jitted step against torch_reference.Stage1Step,
          alternating step by step, both from the same weights.
  seeds   K train states stacked and the pure train_step vmapped over them
          (one program), against K one-seed steps, on the stage-2 epoch's
          sizes (32x32, 100 bands, batch 16, cached spe_f).
  peak    this CPU's float32 matmul rate (jax and torch, 2048^2 matmuls),
          the scale for the GFLOP/s figures.

FLOPs: conv FLOPs (2 x multiply-adds) counted on the torch step
(torch_reference.ConvFlops): forward of every conv, input gradients where
needed, weight gradients of what trains. The reference's work per step
includes the teacher's forward; fers_jax runs it once per image, so its
"effective" GFLOP/s is the reference's work over its time, and its
"executed" GFLOP/s leaves the teacher out.

The machine is shared (2 cores, other jobs): the JSON records the load
average before and after each part; read the figures with it.

Usage:
  python benchmarks/bench_train.py epoch [--rounds 2] [--epochs 2]
  python benchmarks/bench_train.py stage1 [--repeats 3]
  python benchmarks/bench_train.py seeds [--k 4] [--repeats 3]
  python benchmarks/bench_train.py peak
  (each writes benchmarks/results/train_<part>_<host>.json)
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fers_jax import cli, input_pipeline  # noqa: E402

REPO = tr.REPO
DATA = tr.SHARED / "data"
TEACHER = tr.CHECKPOINTS / "100bands"
BANDS, PATCH, STRIDE, BATCH, SEED = 100, 32, 8, 16, 810
RUNS = pathlib.Path(os.environ.get("FERS_BENCH_RUNS", "/tmp/fers_bench_train"))


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# --- The matmul peak ---------------------------------------------------------

def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Best float32 matmul GFLOP/s of jax (jit) and torch on n x n."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    xa = jax.device_put(a)
    f(xa, xa).block_until_ready()
    out = {}
    for name, run in (("jax", lambda: f(xa, xa).block_until_ready()),
                      ("torch", lambda: torch.from_numpy(a) @ torch.from_numpy(a))):
        best = min(_time(run) for _ in range(repeats))
        out[f"{name}_gflop_per_s"] = 2 * n ** 3 / best / 1e9
    out["n"] = n
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- The stage-2 epoch -----------------------------------------------------------

def patch_source():
    return input_pipeline.scene_source([DATA / "train", DATA / "background"],
                                       size=PATCH, stride=STRIDE)


def jax_epochs(epochs: int, out: pathlib.Path, extra=(), cache=None) -> dict:
    """`train.py stage2` for `epochs` epochs; per-step seconds by epoch.
    `cache`: its compilation cache folder (FERS_JAX_CACHE; None: the
    user's)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), "stage2",
           "--data", str(DATA / "train"), str(DATA / "background"),
           "--bands", str(BANDS), "--patch-size", str(PATCH),
           "--stride", str(STRIDE), "--batch-size", str(BATCH),
           "--trunk-bn", "running", "--teacher", str(TEACHER),
           "--epochs", str(epochs), "--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    env = dict(os.environ, **({"FERS_JAX_CACHE": str(cache)} if cache else {}))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in
             (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    times = np.diff([0.0] + [r["time"] for r in steps])
    by_epoch = {}
    for r, t in zip(steps, times):
        by_epoch.setdefault(r["epoch"], []).append(float(t))
    return {"wall_s": wall, "step_times_s": by_epoch,
            "losses": [r["loss"] for r in steps[:3]]}


class _TorchPatches(torch.utils.data.Dataset):
    """The reference's Dataset: one patch, band-selected and normalised, NCHW."""

    def __init__(self, source, bands: int = BANDS):
        self.source, self.bands = source, bands

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        x = self.source[i]["image"][..., :self.bands].astype(np.float32)
        lo, hi = x.min(), x.max()
        x = ((x - lo) / (hi - lo) * 2 - 1) * 0.1
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def torch_models(trunk_bn: str = "running"):
    torch.manual_seed(SEED)
    teacher = tr.load_teacher(TEACHER, BANDS)
    student = tr.SpatialStudent(BANDS)
    tr.spec_init_(student.initial_conv, SEED)
    tr.spec_init_(student.spp, SEED + 1)
    frn = tr.spec_init_(tr.FeatureRestorationNet(BANDS), SEED + 2)
    return tr.Stage2Step(teacher, student, frn, trunk_bn=trunk_bn)


def torch_epochs(epochs: int, source) -> dict:
    """The reference's loop: DataLoader, Stage2Step per batch."""
    step = torch_models()
    loader = torch.utils.data.DataLoader(
        _TorchPatches(source), batch_size=BATCH, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(SEED))
    by_epoch, losses = {}, []
    t_all = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for x in loader:
            m = step(x)
            losses.append(float(m["loss"]))
            t1 = time.perf_counter()
            by_epoch.setdefault(epoch, []).append(t1 - t0)
            t0 = t1
    return {"wall_s": time.perf_counter() - t_all, "step_times_s": by_epoch,
            "losses": losses[:3]}


def stage2_flops(source) -> dict:
    """Conv FLOPs of one reference step and of its teacher forward."""
    step = torch_models()
    x = torch.stack([_TorchPatches(source)[i] for i in range(BATCH)])
    with tr.ConvFlops(step.teacher) as teacher:
        with torch.no_grad():
            step.teacher(x)
    with tr.ConvFlops(step.teacher, step.student, step.frn) as total:
        step(x)
    return {"step_gflop": total.total / 1e9, "teacher_gflop": teacher.total / 1e9}


def run_epoch(args) -> dict:
    source = patch_source()
    flops = stage2_flops(source)
    rounds = []
    # A compilation cache of the benchmark's own: round 0 starts cold, as a
    # first run does; later rounds find its programs, as later runs do.
    cache = RUNS / "xla_cache"
    shutil.rmtree(cache, ignore_errors=True)
    for r in range(args.rounds):
        load0 = bi.loadavg()
        jx = jax_epochs(args.epochs, RUNS / f"epoch_{r}", cache=cache)
        jx["compile_cache"] = "cold" if r == 0 else "warm"
        load1 = bi.loadavg()
        th = torch_epochs(args.epochs, source)
        rounds.append({"fers_jax": jx, "torch": th, "loadavg": [load0, load1,
                                                                 bi.loadavg()]})
        print(f"round {r}: " + ", ".join(
            f"{impl} epoch {e}: {_median(t):.3f} s/step"
            for impl in ("fers_jax", "torch")
            for e, t in rounds[-1][impl]["step_times_s"].items()), flush=True)

    def pooled(impl, epoch, skip=0):
        return [t for rd in rounds for t in rd[impl]["step_times_s"][epoch][skip:]]
    summary = {}
    for e in range(1, args.epochs + 1):
        # fers_jax's first step compiles: left out of the median and the sum.
        j, t = pooled("fers_jax", e, skip=int(e == 1)), pooled("torch", e)
        summary[f"epoch{e}"] = {
            "fers_jax_s_per_step": _median(j), "torch_s_per_step": _median(t),
            "speedup": _median(t) / _median(j),
            "fers_jax_epoch_s": sum(j) / args.rounds,
            "torch_epoch_s": sum(t) / args.rounds}
    # The whole run as a user waits for it: fers_jax's wall includes the
    # process start, compilation, the teacher's features and checkpoints.
    # Torch's wall is its epoch loop alone (models built before the clock).
    torch_wall = statistics.mean(rd["torch"]["wall_s"] for rd in rounds)
    summary["whole_run"] = {"epochs": args.epochs, "torch_wall_s": torch_wall}
    for kind in ("cold", "warm"):
        w = [rd["fers_jax"]["wall_s"] for rd in rounds
             if rd["fers_jax"]["compile_cache"] == kind]
        if w:
            summary["whole_run"][f"fers_jax_{kind}_cache_wall_s"] = statistics.mean(w)
            summary["whole_run"][f"speedup_{kind}_cache"] = torch_wall / statistics.mean(w)
    last = summary[f"epoch{args.epochs}"]
    g = flops
    last["gflop_per_s"] = {
        "torch": g["step_gflop"] / last["torch_s_per_step"],
        "fers_jax_effective": g["step_gflop"] / last["fers_jax_s_per_step"],
        "fers_jax_executed": (g["step_gflop"] - g["teacher_gflop"])
        / last["fers_jax_s_per_step"]}
    return {"images": len(source), "steps_per_epoch": len(source) // BATCH,
            "flops": flops, "summary": summary, "rounds": rounds,
            "note": "epoch 1 of fers_jax computes each image's spe_f (the "
                    "teacher, once per image) and its first step compiles "
                    "(left out of its median); later epochs read spe_f"}


# --- Stage 1 at full size ---------------------------------------------------------

def run_stage1(args) -> dict:
    from fers_jax import configs, convert
    from fers_jax.training import stage1, state
    batch = args.batch or BATCH
    _, crops, _ = bi.scene_inputs(BANDS, batch)  # 64x64 crops, normalised
    x_torch, x_jax = bi.nchw(crops), jax.device_put(crops)
    torch.manual_seed(SEED)
    model = tr.Stage1Net(BANDS)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    variables, cfg = convert.from_torch("stage1", sd, BANDS)
    assert cfg == configs.ferd(BANDS), cfg
    task = stage1.task(BANDS, "full")
    optimizer = state.AdamConfig()
    st = state.create_train_state(variables, task.trainable, optimizer.build())
    del variables, sd
    step_fn = state.jit_train_step(task, optimizer)
    torch_step = tr.Stage1Step(model)
    losses = {"fers_jax": [], "torch": []}

    def jax_step():
        nonlocal st
        st, m = step_fn(st, x_jax)
        bi.block((st, m))
        losses["fers_jax"].append(float(m["loss"]))

    def torch_train_step():
        losses["torch"].append(float(torch_step(x_torch)["loss"]))
    first = {"fers_jax": _time(jax_step)}
    with tr.ConvFlops(model) as counter:
        first["torch"] = _time(torch_train_step)
    times = {"fers_jax": [], "torch": []}
    load = [bi.loadavg()]
    for _ in range(args.repeats):
        times["fers_jax"].append(_time(jax_step))
        times["torch"].append(_time(torch_train_step))
        load.append(bi.loadavg())
        print(f"stage1: fers_jax {times['fers_jax'][-1]:.1f} s, torch "
              f"{times['torch'][-1]:.1f} s", flush=True)
    med = {k: _median(v) for k, v in times.items()}
    return {"batch": batch, "shape": [64, 64], "bands": BANDS,
            "conv_gflop_per_step": counter.total / 1e9,
            "first_step_s": first, "step_times_s": times, "loadavg": load,
            "losses": losses, "summary": {
                "fers_jax_s_per_step": med["fers_jax"],
                "torch_s_per_step": med["torch"],
                "speedup": med["torch"] / med["fers_jax"],
                "gflop_per_s": {k: counter.total / 1e9 / v
                                for k, v in med.items()}}}


# --- K seeds in one program ------------------------------------------------------------

def run_seeds(args) -> dict:
    from fers_jax import checkpoints
    from fers_jax.training import stage2, state
    teacher, tv = checkpoints.load_teacher(TEACHER, BANDS)
    task = stage2.task(teacher.config, "full", trunk_bn="running")
    optimizer = state.AdamConfig()
    states = [state.create_train_state(
        task.init_variables(jax.random.key(k), (1, PATCH, PATCH, BANDS), tv),
        task.trainable, optimizer.build()) for k in range(args.k)]
    source = patch_source()
    (features,) = task.frozen_features(states[0].variables(), chunk=BATCH).values()
    with input_pipeline.batches(source, BATCH * args.k, seed=0,
                                bands=BANDS) as b:
        images = next(b)
    batches = [{"image": images[i * BATCH:(i + 1) * BATCH],
                "spe_f": features(images[i * BATCH:(i + 1) * BATCH])}
               for i in range(args.k)]
    one = state.jit_train_step(task, optimizer)
    stack = lambda trees: jax.tree.map(lambda *a: np.stack(a), *trees)
    # train.py --seeds runs axis 'auto' (unroll on CPU, vmap elsewhere).
    many = {axis: state.jit_train_step_seeds(task, optimizer, axis=axis)
            for axis in ("map", "unroll", "vmap")}
    stacked_batch = jax.device_put(stack(batches))
    singles = [jax.device_put(b) for b in batches]
    stacked = {k: jax.device_put(stack(states)) for k in many}

    def run_singles():
        for i in range(args.k):
            states[i], m = one(states[i], singles[i])
        bi.block((states, m))

    def run_many(kind):
        stacked[kind], m = many[kind](stacked[kind], stacked_batch)
        bi.block((stacked[kind], m))
    first = {"one_seed_x_k": _time(run_singles)}
    for kind in many:
        first[kind] = _time(lambda: run_many(kind))
    times = {k: [] for k in first}
    load = [bi.loadavg()]
    for _ in range(args.repeats):
        times["one_seed_x_k"].append(_time(run_singles))
        for kind in many:
            times[kind].append(_time(lambda: run_many(kind)))
        load.append(bi.loadavg())
        print("seeds: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in
                                    times.items()), flush=True)
    med = {k: _median(v) for k, v in times.items()}
    return {"k": args.k, "batch": BATCH, "shape": [PATCH, PATCH],
            "bands": BANDS, "first_call_s": first, "times_s": times,
            "loadavg": load, "summary": {
                **{f"{k}_s": v for k, v in med.items()},
                **{f"speedup_{k}": med["one_seed_x_k"] / med[k] for k in many}},
            "note": "one_seed_x_k: K calls of the one-seed jitted step, each its "
                    "own state and batch; map / vmap: one call of "
                    "state.jit_train_step_seeds(axis=...) over the K stacked "
                    "states and batches (train.py --seeds runs 'auto': unroll on "
                    "CPU, vmap elsewhere)"}


# --- Main ------------------------------------------------------------------------------

PARTS = {"epoch": run_epoch, "stage1": run_stage1, "seeds": run_seeds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS) + ["peak"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=None,
                   help="stage1: images per step (default 16; the full-size "
                        "step at 16 needs ~18 GB with both frameworks loaded)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--huge-pages", action="store_true",
                   help="restart this process with glibc's huge-page tunable, "
                        "as train.py does (torch and the in-process fers_jax "
                        "steps get it too); without it, only train.py's "
                        "subprocess has it")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.huge_pages:
        cli.restart_with_huge_pages()
    torch.set_num_threads(args.threads)
    env = bi.environment(args.threads)
    # The malloc this process (torch, and fers_jax's in-process steps) ran with.
    env["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
    env["thp_mode"] = cli.thp_mode()
    env["uptime"] = subprocess.run(["uptime"], capture_output=True,
                                   text=True).stdout.strip()
    print(f"# bench_train {args.part}: {env['cpu']} ({env['cpu_count']} cores), "
          f"{env['uptime']}", flush=True)
    record = {"benchmark": f"train_{args.part}", "environment": env,
              "settings": vars(args), "matmul_peak": matmul_peak()}
    print(f"float32 matmul peak: {record['matmul_peak']}", flush=True)
    if args.part != "peak":
        if args.part in ("epoch", "stage1"):
            record["golden_check"] = tr.check_against_golden(verbose=False)
        record.update(PARTS[args.part](args))
    env["loadavg_end"] = bi.loadavg()
    env["uptime_end"] = subprocess.run(["uptime"], capture_output=True,
                                       text=True).stdout.strip()
    out = args.out or bi.RESULTS / f"train_{args.part}_{socket.gethostname()}.json"
    bi.write_json(out, record)
    print(json.dumps(record.get("summary", {}), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
