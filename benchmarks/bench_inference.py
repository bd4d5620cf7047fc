"""FERD and FERS inference, fers_jax vs a PyTorch baseline of the same graph.

End to end: features from the networks, then the RX map (SPEC 6), on

  (a) a real 100x100 scene (abu-airport-2): FERD with the published
      100-band teacher (first 100 bands, float64 NumPy-style RX); FERS with
      the published 50-band teacher and the golden random student (first 50
      bands, product fusion with the float32 batched RX);
  (b) a batch of 64x64 crops of the same scene (a 4x4 grid of offsets by
      default, each normalised alone, as the reference normalises per
      image), same two methods.

Implementations timed:

  fers_jax batched  one jitted feature call on the whole batch, then the
                    vmapped RX (fers_jax.inference / fers_jax.detectors)
  fers_jax loop     the same functions one image at a time
  torch loop        the reference's test loop: one image at a time, features
                    then RX (benchmarks/torch_reference.py)
  torch batched     the PyTorch networks on the whole batch, then RX (per
                    image in NumPy for FERD, as the reference; batched torch
                    RX normalised per image for FERS)

The baseline is checked against the golden outputs first
(torch_reference.check_against_golden), and every case compares the
fers_jax and torch maps (and, on the full scene, the golden scene maps).

Timing: warm-up calls first (they include XLA compilation, reported as
`first_call_s`), then the median of --repeats repeats; JAX results are
waited on with block_until_ready; torch runs under inference_mode with
torch.set_num_threads(--threads). Features and RX are timed separately
within each repeat. GFLOP/s counts conv FLOPs only (2 * multiply-adds,
counted over the torch modules on the actual shapes, see
torch_reference.ConvFlops) divided by the feature time.

Usage:
  python benchmarks/bench_inference.py [--repeats 5] [--crops 16] [--out F]
"""

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_reference as tr  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import torch  # noqa: E402

from fers_jax import data, inference, metrics  # noqa: E402

SCENE = tr.SHARED / "data" / "scenes" / "abu-airport-2.mat"
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# --- Shared helpers (bench_train_step.py imports them too) ------------------

def loadavg() -> List[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> Dict:
    """Versions, machine and load: enough to compare runs across machines."""
    import flax
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True,
                                cwd=tr.REPO, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "flax": flax.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": threads,
        "thread_env": {k: os.environ.get(k) for k in (
            "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "XLA_FLAGS")},
        "loadavg_start": loadavg(),
    }


def _version(package):
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def block(tree):
    """Waits for every JAX array in `tree`; leaves other leaves alone."""
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def run_timed(stages: Callable[[], Tuple[Dict[str, float], object]],
              repeats: int, warmup: int) -> Tuple[Dict, object]:
    """Calls `stages()` warmup + repeats times.

    `stages()` returns ({stage: seconds}, output). Returns (timing, the last
    output): timing has the median per stage and of the total, the fastest
    total, the first call's total (with compilation) and the 1/5/15-min load
    averages before and after the measured repeats.
    """
    first = None
    for i in range(warmup):
        t, _ = stages()
        if i == 0:
            first = sum(t.values())
    before = loadavg()
    runs = []
    for _ in range(repeats):
        t, output = stages()
        runs.append(t)
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["total"] = statistics.median(sum(r.values()) for r in runs)
    out["min_total"] = min(sum(r.values()) for r in runs)
    out["first_call_s"] = first
    out["repeats"] = repeats
    out["loadavg_before"] = before
    out["loadavg_after"] = loadavg()
    return out, output


def xla_gflop(jitted, *args) -> float:
    """XLA's own FLOP count (all ops, GFLOP) of a jitted call, or nan.

    From the lowered program's cost analysis: nothing runs or compiles, so
    donated arguments stay valid.
    """
    try:
        cost = jitted.lower(*args).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan"))) / 1e9
    except Exception:  # noqa: BLE001 - informative only
        return float("nan")


def write_json(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# --- Inputs -----------------------------------------------------------------

def scene_inputs(bands: int, crops: int, size: int = 64):
    """(scene (1, H, W, B), crops (n, size, size, B), gt (H, W)), NHWC,
    each image normalised on its own as the reference does."""
    scene = data.load_scene(SCENE)
    cube = data.select_bands(scene.cube, bands)
    full = data.normalise(cube)[None]
    h, w, _ = cube.shape
    side = int(np.ceil(np.sqrt(crops)))
    rows = np.linspace(0, h - size, side).astype(int)
    cols = np.linspace(0, w - size, side).astype(int)
    offsets = [(r, c) for r in rows for c in cols][:crops]
    batch = np.stack([data.normalise(cube[r:r + size, c:c + size])
                      for r, c in offsets])
    return full, batch, scene.gt


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --- The two methods in both frameworks -------------------------------------

class Method:
    """One method (FERD or FERS) in fers_jax and torch, stage by stage.

    Each `*_stages` call runs features then RX on a batch and returns
    ({'features': s, 'rx': s}, maps (N, H, W) as numpy).
    """

    def __init__(self, name: str, bands: int):
        self.name, self.bands = name, bands
        teacher_dir = tr.CHECKPOINTS / f"{bands}bands"
        student = tr.GOLDEN / "spa_fen_random_50bands.pt" if name == "fers" else None
        self.jax_extractor = inference.feature_extractor(teacher_dir, student, bands)
        self.torch_teacher = tr.load_teacher(teacher_dir, bands)
        self.torch_student = (tr.load_student(student, bands)
                              if student is not None else None)

    # fers_jax
    def jax_maps(self, x, feats):
        if self.name == "ferd":
            return inference.ferd_map(x, feats["spe_f"], "float64")
        return inference.fers_map(x, feats["spe_f"], feats["spa_f"], "auto")

    def jax_stages(self, x):
        t0 = time.perf_counter()
        feats = block(self.jax_extractor(x))
        t1 = time.perf_counter()
        maps = block(self.jax_maps(x, feats))
        t2 = time.perf_counter()
        return {"features": t1 - t0, "rx": t2 - t1}, np.asarray(maps)

    # torch
    def torch_features(self, x):
        spe_f = self.torch_teacher(x)
        spa_f = self.torch_student(x)[0] if self.torch_student is not None else None
        return spe_f, spa_f

    def torch_maps(self, x, spe_f, spa_f):
        if self.name == "ferd":
            return tr.ferd_map(x, spe_f)
        return tr.fers_product_map(x, spe_f, spa_f).numpy()

    def torch_stages(self, x):
        with torch.inference_mode():
            t0 = time.perf_counter()
            spe_f, spa_f = self.torch_features(x)
            t1 = time.perf_counter()
            maps = self.torch_maps(x, spe_f, spa_f)
            t2 = time.perf_counter()
        return {"features": t1 - t0, "rx": t2 - t1}, maps

    def conv_flops(self, x_nchw) -> int:
        modules = [self.torch_teacher] + ([self.torch_student]
                                          if self.torch_student else [])
        with torch.inference_mode(), tr.ConvFlops(*modules) as counter:
            self.torch_features(x_nchw)
        return counter.forward


def looped(stages_fn, images: list):
    """One image at a time; stage times summed over the images."""
    def run():
        total, maps = {"features": 0.0, "rx": 0.0}, []
        for image in images:
            t, m = stages_fn(image)
            total = {k: total[k] + t[k] for k in total}
            maps.append(m)
        return total, np.concatenate(maps)
    return run


def bench_case(method: Method, label: str, x: np.ndarray, repeats: int,
               warmup: int, impls: List[str]) -> Tuple[List[Dict], Dict]:
    """Times each implementation on the batch x (N, H, W, B).

    Returns (one row per implementation, {impl: maps (N, H, W)}).
    """
    xt = nchw(x)
    xj = jax.device_put(x)
    flops = method.conv_flops(xt)
    # Inputs already on the device (one array per image for the loops), so
    # the loops time compute, not host-to-device copies.
    runners = {
        "fers_jax batched": lambda: lambda: method.jax_stages(xj),
        "fers_jax loop": lambda: looped(
            method.jax_stages, [jax.device_put(x[i:i + 1]) for i in range(len(x))]),
        "torch loop": lambda: looped(
            method.torch_stages, [xt[i:i + 1] for i in range(len(x))]),
        "torch batched": lambda: lambda: method.torch_stages(xt),
    }
    rows, maps = [], {}
    for impl in impls:
        result, maps[impl] = run_timed(runners[impl](), repeats, warmup)
        n = x.shape[0]
        rows.append({
            "case": label, "method": method.name, "bands": method.bands,
            "images": n, "shape": list(x.shape[1:3]), "impl": impl,
            "features_s": result["features"], "rx_s": result["rx"],
            "total_s": result["total"], "min_total_s": result["min_total"],
            "images_per_s": n / result["total"],
            "conv_gflop": flops / 1e9,
            "features_gflop_per_s": flops / 1e9 / result["features"],
            "first_call_s": result["first_call_s"], "repeats": repeats,
            "loadavg_before": result["loadavg_before"],
            "loadavg_after": result["loadavg_after"],
        })
    ref = maps.get("torch loop", maps.get("torch batched"))
    for row in rows:
        m = maps[row["impl"]]
        row["max_rel_diff_vs_torch"] = float(np.abs(m - ref).max() / np.abs(ref).max())
    for row in rows:
        if row["impl"] == "fers_jax batched":
            row["xla_gflop"] = xla_gflop(method.jax_extractor.forward, xj)
    return rows, maps


# --- Report -----------------------------------------------------------------

COLUMNS = [  # (key, header, format)
    ("case", "case", "{:<14}"), ("method", "meth", "{:<4}"),
    ("impl", "impl", "{:<16}"), ("features_s", "feat s", "{:>8.3f}"),
    ("rx_s", "rx s", "{:>7.3f}"), ("total_s", "total s", "{:>8.3f}"),
    ("images_per_s", "img/s", "{:>7.2f}"), ("conv_gflop", "GFLOP", "{:>7.1f}"),
    ("features_gflop_per_s", "GFLOP/s", "{:>7.1f}"),
    ("first_call_s", "1st call", "{:>8.2f}"),
    ("max_rel_diff_vs_torch", "vs torch", "{:>8.1e}"),
]


def table(rows: List[Dict]) -> str:
    """Fixed-width text table; the last column is the 1-min loadavg."""
    def cell(fmt, value):
        return fmt.format(value)
    widths = [len(cell(f, rows[0][k])) for k, _, f in COLUMNS]
    head = " ".join(h.ljust(w) if f[2] == "<" else h.rjust(w)
                    for (_, h, f), w in zip(COLUMNS, widths)) + "  load1"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(cell(f, r[k]) for k, _, f in COLUMNS)
                     + f"  {r['loadavg_before'][0]:5.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls first (the first compiles)")
    parser.add_argument("--crops", type=int, default=16,
                        help="64x64 crops in the batch case")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", default=["ferd", "fers"],
                        choices=["ferd", "fers"])
    parser.add_argument("--skip-golden", action="store_true",
                        help="skip the baseline's golden check (not advised)")
    parser.add_argument("--out", default=str(
        RESULTS / f"inference_{socket.gethostname()}.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(f"# fers_jax inference benchmark on {env['cpu']} "
          f"({env['cpu_count']} cores, jax {env['jax']} {env['jax_devices']}, "
          f"torch {env['torch']} x{args.threads} threads), loadavg "
          f"{env['loadavg_start']}")
    golden = None if args.skip_golden else tr.check_against_golden()

    golden_maps = np.load(tr.GOLDEN / "scene_maps" / "abu-airport-2.npz")
    golden_key = {"ferd": "ferd_100bands", "fers": "fers_50bands_random_student"}
    rows, parity = [], {}
    for name in args.methods:
        bands = 100 if name == "ferd" else 50
        method = Method(name, bands)
        full, crops, gt = scene_inputs(bands, args.crops)
        scene_rows, scene_maps = bench_case(
            method, "scene 100x100", full, args.repeats, args.warmup,
            ["fers_jax batched", "torch batched"])
        ref_map = golden_maps[golden_key[name]]
        parity[name] = {
            impl: {"max_rel_diff_vs_golden_map": float(
                       np.abs(m[0] - ref_map).max() / np.abs(ref_map).max()),
                   "auc": metrics.roc_auc(m[0], gt)}
            for impl, m in scene_maps.items()}
        parity[name]["golden_auc"] = metrics.roc_auc(ref_map, gt)
        crop_rows, _ = bench_case(
            method, f"{args.crops}x 64x64", crops, args.repeats, args.warmup,
            ["fers_jax batched", "fers_jax loop", "torch loop", "torch batched"])
        rows += scene_rows + crop_rows
        print(table(scene_rows + crop_rows), flush=True)

    env["loadavg_end"] = loadavg()
    print()
    print(table(rows))
    print("\nscene maps vs golden scene_maps (abu-airport-2):")
    for name, p in parity.items():
        for impl, v in p.items():
            if impl != "golden_auc":
                print(f"  {name} {impl:16s} max rel diff "
                      f"{v['max_rel_diff_vs_golden_map']:.1e}  AUC {v['auc']:.6f} "
                      f"(golden {p['golden_auc']:.6f})")
    print(f"\nloadavg start {env['loadavg_start']} end {env['loadavg_end']}")
    write_json(args.out, {
        "benchmark": "inference", "environment": env,
        "flop_counting": "conv FLOPs only: 2 * N * Cout * Hout * Wout * "
                         "Cin/groups * kh * kw over every Conv2d of the torch "
                         "teacher (+ student) on the case's shapes; "
                         "GFLOP/s = that / the feature time",
        "settings": vars(args), "golden_check": golden,
        "scene_parity": parity, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
