"""Scale: seconds per megapixel and peak memory as the scene grows.

A synthetic 200-band scene, abu-airport-2's first 200 bands mirror-tiled
(flipped copies side by side, so that there are no seams) to 100x100,
256x256, 512x512, 1024x1024 and 2048x1024, normalised as the reference does
(fers_jax.data.normalise_streamed: data.normalise's numbers without its
float64 copy) and written once to a .npy file (by a helper process). Each
method and size then runs in a fresh process that memory-maps that file,
and reports its wall time and its peak resident memory: VmHWM of
/proc/self/status, the high-water mark of the process's own address space,
which counts the pages of the input it touched. (ru_maxrss is not used: on
Linux a child's ru_maxrss starts at its parent's RSS at fork and survives
exec, so a worker forked from a big parent would report the parent's
size.)

  rx    detectors.rx_streaming, float64 (statistics over 65536-pixel chunks)
  crd   detectors.crd (3, 11), float64; 300-700 s per megapixel on two
        busy cores, so only up to --crd-max-pixels (default 512x512;
        2048x1024 would take 10-25 min)
  ferd  tiled teacher (published 200-band) + streaming RX
  fers  tiled teacher + tiled random-init 200-band student (no trained
        200-band student is published; random weights cost the same) +
        streaming RX, sum fusion

--bf16-auc also scores the shared scenes with the float32 and the bfloat16
networks (evaluate's --dtype; RX in its usual precision) and records the
AUCs under "bfloat16_auc": FERD with the published 50/100/200-band teachers
(200 bands: abu-airport-2 only, the one scene with 200 bands), FERS 50-band
with the golden random student. bfloat16 on CPU is emulated and slow; the
AUC effect is the same on an accelerator up to rounding.

FERD/FERS run fers_jax.tiling.detect_tiled with --tile (default 256x256)
and rx='stream'. Sizes up to 512x512 are run twice in their process:
`first_s` includes XLA compilation, `steady_s` is the second call; larger
sizes once (`steady_s` null: their s/MP includes compilation, ~10-30 s).
Load average is recorded before and after each run: the machine is shared.

  python benchmarks/bench_scale.py [--sizes 100x100,...] [--methods rx,ferd]
Writes benchmarks/results/scale_<hostname>.json and prints a table.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FERS_SHARED", REPO.parent / "shared"))
SCENE = SHARED / "data" / "scenes" / "abu-airport-2.mat"
TEACHER = SHARED / "reference" / "checkpoints" / "saved_models" / "200bands"
SIZES = ((100, 100), (256, 256), (512, 512), (1024, 1024), (2048, 1024))
METHODS = ("rx", "crd", "ferd", "fers")
BANDS = 200
TWICE_MAX_PIXELS = 512 * 512


def mirror_tile(cube: np.ndarray, h: int, w: int) -> np.ndarray:
    """cube tiled to (h, w) with every other copy flipped: no seams."""
    ch, cw, _ = cube.shape
    row = np.concatenate([cube, cube[::-1]], 0)
    tile = np.concatenate([row, row[:, ::-1]], 1)
    reps = (-(-h // (2 * ch)), -(-w // (2 * cw)), 1)
    return np.tile(tile, reps)[:h, :w]


def write_cube(folder: pathlib.Path, h: int, w: int) -> pathlib.Path:
    """The normalised synthetic scene as a .npy file (built in row strips)."""
    from fers_jax import data, tiling
    path = folder / f"cube_{h}x{w}.npy"
    if path.exists():
        return path
    scene = data.load_scene(SCENE)
    raw = np.lib.format.open_memmap(folder / "raw.npy", "w+", np.float32,
                                    (h, w, BANDS))
    base = np.ascontiguousarray(scene.cube[..., :BANDS])
    strip = 2 * base.shape[0]
    for r in range(0, h, strip):
        rows = min(strip, h - r)
        raw[r:r + rows] = mirror_tile(base, rows, w)
    raw.flush()
    out = np.lib.format.open_memmap(path, "w+", np.float32, (h, w, BANDS))
    out[...] = data.normalise_streamed(raw, where="synthetic")
    out.flush()
    del raw, out
    (folder / "raw.npy").unlink()
    return path


def worker(method: str, path: str, tile, chunk: int) -> dict:
    """One method on one cube, in this (fresh) process."""
    import jax
    from fers_jax import checkpoints, configs, convert, detectors, tiling

    x = np.load(path, mmap_mode="r")
    h, w, _ = x.shape
    if method in ("ferd", "fers"):
        teacher, t_vars = checkpoints.load_teacher(TEACHER, BANDS)
        student = s_vars = None
        if method == "fers":
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import fake_variables
            student = convert.build("student", configs.student(BANDS))
            s_vars = fake_variables(student, np.zeros((1, 32, 32, BANDS), np.float32))
        feats = tiling.TiledFeatures(teacher, t_vars, student, s_vars, tile)

        def run():
            maps, _ = tiling.detect_tiled(feats, x[None], method, "sum",
                                          "float64", rx="stream", chunk_pixels=chunk)
            return maps
    elif method == "rx":
        def run():
            return detectors.rx_streaming(x, "float64", chunk)
    elif method == "crd":
        def run():
            return np.asarray(detectors.crd(np.asarray(x)))
    else:
        raise SystemExit(f"unknown method {method}")
    times = []
    for _ in range(2 if h * w <= TWICE_MAX_PIXELS else 1):
        start = time.perf_counter()
        out = np.asarray(run())
        times.append(time.perf_counter() - start)
    assert np.all(np.isfinite(out)), "non-finite scores"
    return {"first_s": times[0], "steady_s": times[1] if len(times) > 1 else None,
            "peak_rss_gb": vm_hwm_bytes() / 2**30,
            "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "device": str(jax.devices()[0])}


def vm_hwm_bytes() -> int:
    """Peak resident memory of this process since its exec (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bf16_auc() -> dict:
    """Per-scene AUCs with float32 and bfloat16 networks, and their change."""
    from fers_jax import evaluation
    scenes = SHARED / "data" / "scenes"
    ck = SHARED / "reference" / "checkpoints" / "saved_models"
    student = SHARED / "reference" / "golden" / "spa_fen_random_50bands.pt"
    runs = {"ferd_50": dict(method="ferd", bands=50, teacher=str(ck / "50bands")),
            "ferd_100": dict(method="ferd", bands=100, teacher=str(ck / "100bands")),
            "ferd_200": dict(method="ferd", bands=200, teacher=str(ck / "200bands")),
            "fers_50_random_student": dict(method="fers", bands=50,
                                           teacher=str(ck / "50bands"),
                                           student=str(student))}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in runs.items():
            paths = [scenes / "abu-airport-2.mat"] if name == "ferd_200" else [scenes]
            aucs = {}
            for dtype in ("float32", "bfloat16"):
                cfg = evaluation.EvalConfig(**kw, dtype=dtype, plots=False, tile="off")
                res = evaluation.evaluate(paths, pathlib.Path(tmp) / f"{name}_{dtype}",
                                          cfg, progress=False)
                aucs[dtype] = {r["name"]: r["auc"] for r in res["scenes"]}
            diff = {k: aucs["bfloat16"][k] - aucs["float32"][k] for k in aucs["float32"]}
            out[name] = {**aucs, "diff": diff,
                         "max_abs_diff": max(abs(v) for v in diff.values()),
                         "mean_diff": float(np.mean(list(diff.values())))}
            print(name, json.dumps(out[name]["diff"]), file=sys.stderr, flush=True)
    return out


def parse_sizes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in SIZES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tile", default="256x256", help="FERD/FERS output tile")
    p.add_argument("--chunk", type=int, default=1 << 16, help="RX chunk pixels")
    p.add_argument("--crd-max-pixels", type=int, default=512 * 512)
    p.add_argument("--workdir", help="where the cubes are written (default: a "
                   "temporary folder, removed after)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                        f"scale_{socket.gethostname()}.json"))
    p.add_argument("--bf16-auc", action="store_true",
                   help="also record the AUC change of bfloat16 networks")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "CUBE"),
                   help=argparse.SUPPRESS)
    p.add_argument("--bf16-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--write-cube", nargs=3, metavar=("FOLDER", "H", "W"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    tile = tuple(int(v) for v in args.tile.split("x"))
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], tile, args.chunk)))
        return
    if args.bf16_worker:
        print(json.dumps(bf16_auc()))
        return
    if args.write_cube:
        folder, h, w = args.write_cube
        print(write_cube(pathlib.Path(folder), int(h), int(w)))
        return
    sizes, methods = parse_sizes(args.sizes), args.methods.split(",")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_scale_")
    folder = pathlib.Path(args.workdir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for h, w in sizes:
            # In a helper process: this one stays small (see vm_hwm_bytes).
            cube = pathlib.Path(subprocess.run(
                [sys.executable, __file__, "--write-cube", str(folder), str(h), str(w)],
                capture_output=True, text=True, check=True, cwd=REPO
            ).stdout.strip().splitlines()[-1])
            for method in methods:
                row = {"method": method, "h": h, "w": w, "bands": BANDS,
                       "megapixels": h * w / 1e6, "load_before": os.getloadavg()}
                if method == "crd" and h * w > args.crd_max_pixels:
                    row["skipped"] = (f"above --crd-max-pixels ({args.crd_max_pixels}):"
                                      " 300-700 s per megapixel on two cores")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                cmd = [sys.executable, __file__, "--worker", method, str(cube),
                       "--tile", args.tile, "--chunk", str(args.chunk)]
                start = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                row["process_s"] = time.perf_counter() - start
                row["load_after"] = os.getloadavg()
                if res.returncode:
                    row["error"] = res.stderr.strip().splitlines()[-1:]
                else:
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                    t = row["steady_s"] if row["steady_s"] is not None else row["first_s"]
                    row["s_per_megapixel"] = t / row["megapixels"]
                    row["includes_compile"] = row["steady_s"] is None
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {"host": socket.gethostname(), "cpus": os.cpu_count(),
              "platform": platform.platform(), "python": platform.python_version(),
              "tile": tile, "rx_chunk_pixels": args.chunk,
              "memory_limit_gb": 6, "rows": rows}
    if args.bf16_auc:  # in a helper process too
        res = subprocess.run([sys.executable, __file__, "--bf16-worker"],
                             capture_output=True, text=True, check=True, cwd=REPO)
        result["bfloat16_auc"] = json.loads(res.stdout.strip().splitlines()[-1])
    from importlib import metadata
    result["jax"] = metadata.version("jax")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {out}")


def table(rows) -> str:
    lines = [f"{'method':<6} {'size':>10} {'s/MP':>9} {'first s':>9} {'steady s':>9} "
             f"{'peak GB':>8} {'load':>5}"]
    for r in rows:
        size = f"{r['h']}x{r['w']}"
        if "s_per_megapixel" not in r:
            lines.append(f"{r['method']:<6} {size:>10}  {r.get('skipped') or r.get('error')}")
            continue
        steady = f"{r['steady_s']:.1f}" if r["steady_s"] is not None else "-"
        mark = "*" if r["includes_compile"] else " "
        lines.append(f"{r['method']:<6} {size:>10} {r['s_per_megapixel']:>8.1f}{mark} "
                     f"{r['first_s']:>9.1f} {steady:>9} {r['peak_rss_gb']:>8.2f} "
                     f"{r['load_before'][0]:>5.1f}")
    lines.append("* includes XLA compilation (one call only at this size)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
