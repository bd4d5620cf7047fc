"""Scale through the real command line: peak memory of the whole process.

Each case runs `python evaluate.py ...` as a subprocess under
`/usr/bin/time -v` and records its wall time and "Maximum resident set
size" (the whole process: imports, JAX, the scene, every buffer). Scenes
are synthetic int16 cubes (smooth background, a few bright 3x3 targets in
the mask) written block by block into --work (never the repository):

  npz   np.savez-style .npz, the cube stored uncompressed (read in row
        blocks from inside the zip)
  npy   .npy
  envi  ENVI BIL, little-endian, with <stem>_mask.npy beside it

Methods: rx, ferd (the published 200-band teacher), fers (that teacher
and a random-init 200-band student saved as a fers_jax checkpoint: no
trained 200-band student is published; random weights cost the same),
sum fusion. --memory-budget is passed through (default 2 GB: a user with
a 3 GB machine); results.json's plan says which path ran.

  python benchmarks/bench_scale.py --cases 2048x1024:npz:rx,ferd,fers \\
      [--budget 2] [--tile H,W] [--work /work/runs/11/bench] [--result NAME.json]
Writes benchmarks/results/scale_cli_<hostname>.json (appending cases).
"""

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TEACHER = REPO.parent / "shared/reference/checkpoints/saved_models/200bands"
BANDS = 200


def blocks(h, w, rows=64, seed=0):
    """Row blocks of a synthetic int16 (H, W, 200) scene and its mask."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (BANDS,)).cumsum()
    spectra = (1500 + 300 * np.sin(np.arange(BANDS) / 17.0)[None] + 40 * base[None])
    for r in range(0, h, rows):
        n = min(rows, h - r)
        yy = np.arange(r, r + n)[:, None, None]
        xx = np.arange(w)[None, :, None]
        cube = spectra[None] * (1 + 0.2 * np.sin(yy / 97.0) * np.cos(xx / 71.0))
        cube = cube + rng.normal(0, 25, (n, w, BANDS))
        yield r, cube.astype(np.int16)


def mask(h, w):
    gt = np.zeros((h, w), np.uint8)
    for y in range(50, h - 3, max(h // 7, 5)):
        for x in range(40, w - 3, max(w // 5, 5)):
            gt[y:y + 3, x:x + 3] = 1
    return gt


def add_targets(r, block, gt):
    part = gt[r:r + block.shape[0]].astype(bool)
    block[part] = (block[part] * 1.15).astype(np.int16)
    return block


def write_scene(work: pathlib.Path, h, w, fmt) -> pathlib.Path:
    stem = f"s{h}x{w}"
    gt = mask(h, w)
    npy = work / f"{stem}.npy"
    if not npy.exists():
        out = np.lib.format.open_memmap(npy, "w+", np.int16, (h, w, BANDS))
        for r, b in blocks(h, w):
            out[r:r + b.shape[0]] = add_targets(r, b, gt)
        out.flush()
        del out
    if fmt == "npy":
        np.save(work / f"{stem}_gt.npy", gt)  # not read: .npy scenes have no mask
        return npy
    if fmt == "npz":
        path = work / f"{stem}.npz"
        if not path.exists():
            gt_file = work / f"{stem}_map.npy"
            np.save(gt_file, gt)
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                z.write(npy, "data.npy")
                z.write(gt_file, "map.npy")
        return path
    if fmt == "envi":
        hdr = work / f"{stem}_bil.hdr"
        if not hdr.exists():
            src = np.load(npy, mmap_mode="r")
            with open(work / f"{stem}_bil.img", "wb") as f:
                for r in range(h):
                    f.write(np.ascontiguousarray(src[r].T).astype("<i2").tobytes())
            del src
            hdr.write_text(f"ENVI\nsamples = {w}\nlines = {h}\nbands = {BANDS}\n"
                           "header offset = 0\nfile type = ENVI Standard\n"
                           "data type = 2\ninterleave = bil\nbyte order = 0\n")
            np.save(work / f"{stem}_bil_mask.npy", gt)
        return hdr
    raise SystemExit(f"unknown format {fmt}")


def student_checkpoint(work: pathlib.Path) -> pathlib.Path:
    path = work / "student200"
    if not (path / "fers_jax.json").exists():
        code = ("import jax, numpy as np; from fers_jax import configs, convert, "
                "checkpoint_store as cs; cfg = configs.student(200); "
                "m = convert.build('student', cfg); "
                "v = m.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 200), np.float32)); "
                f"cs.save_variables({str(path)!r}, v, cs.model_meta('student', cfg), "
                "overwrite=True)")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return path


def run_case(scene, method, budget, work, out, tile=None):
    argv = [sys.executable, "evaluate.py", "--scenes", str(scene), "--method", method,
            "--out", str(out), "--quiet", "--no-plots", "--memory-budget", str(budget)]
    if tile:
        argv += ["--tile", tile]
    if method in ("ferd", "fers"):
        argv += ["--teacher", str(TEACHER), "--bands", str(BANDS)]
    if method == "fers":
        argv += ["--student", str(student_checkpoint(work)), "--fusion", "sum"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v"] + argv, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                           proc.stderr).group(1))
    res = json.loads((out / "results.json").read_text())
    row = res["scenes"][0]
    return {"method": method, "shape": row["shape"], "megapixels":
            row["shape"][0] * row["shape"][1] / 1e6, "format": scene.suffix,
            "scene_bytes_on_disk": sum(p.stat().st_size for p in scene.parent.glob(
                scene.stem + (".img" if scene.suffix == ".hdr" else scene.suffix))),
            "memory_budget_gb": budget, "plan": row["plan"], "auc": row["auc"],
            "process_wall_s": wall, "detector_s": row["seconds"],
            "s_per_megapixel": wall / (row["shape"][0] * row["shape"][1] / 1e6),
            "peak_rss_gb": rss_kb / 2 ** 20, "load_before": load_before,
            "load_after": os.getloadavg()}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", required=True,
                   help="HxW:format:method[,method...] (format npz, npy or envi)")
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--tile", help="evaluate.py --tile for every case (default: its "
                   "own choice, `auto`)")
    p.add_argument("--work", default="/work/runs/11/bench")
    p.add_argument("--result", default=f"scale_cli_{socket.gethostname()}.json",
                   help="file name under benchmarks/results/ (cases are appended)")
    args = p.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result_file = REPO / "benchmarks" / "results" / args.result
    record = (json.loads(result_file.read_text()) if result_file.exists() else
              {"host": socket.gethostname(), "cpus": os.cpu_count(), "rows": []})
    for case in args.cases:
        size, fmt, methods = case.split(":")
        h, w = map(int, size.split("x"))
        scene = write_scene(work, h, w, fmt)
        for m in methods.split(","):
            row = run_case(scene, m, args.budget, work, work / f"out_{size}_{fmt}_{m}",
                           args.tile)
            row["tile_option"] = args.tile or "auto"
            record["rows"].append(row)
            print(f"{size} {fmt} {m}: {row['plan']['path']} tile {row['plan']['tile']} "
                  f"{row['process_wall_s']:.1f} s, {row['s_per_megapixel']:.1f} s/MP, "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB, AUC {row['auc']}, "
                  f"load {row['load_before'][0]:.1f}", flush=True)
            result_file.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
