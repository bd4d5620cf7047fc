"""Out of core: spill the RX inputs once, or recompute the features per pass?

The streamed RX reads its input cube (x + features) four times: the min and
max, the mean, the scatter, and the scores. Out of core that cube is either
spilled to disk once and read back per pass (what fers_jax does), or its
features are recomputed tile by tile for each pass. This measures the parts
of both on one scene through the code evaluate.py runs (tiling.LazyImage,
TiledFeatures, SpillCube, the spill's DiskCube reader), FERD at 200 bands:

  features   one pass of the tiled teacher over the scene (incl. reading and
             normalising the rows from disk)
  write      writing x + spe_f into the spill file, tile by tile
  read       one streamed pass over the spill file (RX's block size)

Recompute costs 4 x features; spill costs features + write + 4 x read.

  python benchmarks/bench_spill.py SCENE.npz [--tile 128,512]
Writes benchmarks/results/spill_vs_recompute_<host>.json.
"""

import argparse
import json
import os
import pathlib
import socket
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEACHER = REPO.parent / "shared/reference/checkpoints/saved_models/200bands"

from fers_jax import data, inference, plan, tiling  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scene")
    p.add_argument("--tile", default="128,512")
    p.add_argument("--passes", type=int, default=2, help="repeats of each part")
    args = p.parse_args()
    scene = data.open_scene(pathlib.Path(args.scene))
    cube = scene.cube
    h, w, b = cube.shape
    tile = plan.parse_tile(args.tile)
    lo, hi = data.minmax_streamed(cube, 64, scene.path)
    feats = inference.feature_extractor(str(TEACHER), None, b).tiled(tile)
    shape = (1, h, w, b)
    chunk = plan.ooc_chunk_pixels(shape, tile)
    times = {"features": [], "write": [], "read": []}
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for _ in range(args.passes):
            x = tiling.LazyImage(cube, lo, hi, tile[0] + 16)
            spill = tiling.SpillCube(pathlib.Path(tmp) / "x+spe.npy", (h, w, b))
            t_feat = t_write = 0.0
            t0 = time.perf_counter()
            for rows, cols, f in feats.tiles(x, student=False):
                xt = tiling._own_part(np.asarray(x[:, rows[0]:rows[1], cols[0]:cols[1]],
                                                 np.float32), rows, cols)
                v = tiling.rx_input_tiles(xt, {"spe_f": tiling._own_part(
                    np.asarray(f["spe_f"]), rows, cols)}, "ferd")["x+spe"]
                t1 = time.perf_counter()
                t_feat += t1 - t0
                spill.write(rows[2], cols[2], v[0])
                t0 = time.perf_counter()
                t_write += t0 - t1
            times["features"].append(t_feat)
            times["write"].append(t_write)
            reader = spill.reader()
            t0 = time.perf_counter()
            rows = max(1, chunk // w)
            for r in range(0, h, rows):
                np.asarray(reader[r:r + rows]).sum()
            times["read"].append(time.perf_counter() - t0)
            load.append(os.getloadavg())
            print({k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    best = {k: min(v) for k, v in times.items()}
    record = {"scene": str(args.scene), "shape": [h, w, b], "tile": list(tile),
              "method": "ferd", "times_s": times, "best_s": best,
              "recompute_s": 4 * best["features"],
              "spill_s": best["features"] + best["write"] + 4 * best["read"],
              "loadavg": load, "host": socket.gethostname(), "cpus": os.cpu_count(),
              "note": "RX streams its input 4 times (min/max, mean, scatter, "
                      "scores); recompute = 4 feature passes, spill = 1 feature "
                      "pass + the write + 4 reads (page cache warm: the file was "
                      "just written)"}
    record["spill_speedup"] = record["recompute_s"] / record["spill_s"]
    out = REPO / "benchmarks" / "results" / f"spill_vs_recompute_{socket.gethostname()}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("best_s", "recompute_s", "spill_s",
                                             "spill_speedup")}, indent=1))


if __name__ == "__main__":
    main()
