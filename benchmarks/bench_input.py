"""The input pipeline alone: input_pipeline.Batches against grain.

The stage-2 training set of the trained-students runs (../shared/data/train
and background cut into 32x32 patches at stride 8, 100 bands, batch 16):
one epoch of batches read, band-selected and normalised, by

  batches  fers_jax.input_pipeline.Batches (a thread prefetching 2 batches,
           a pool normalising the images of a batch)
  grain    grain.MapDataset.source(source).shuffle(seed).map(prepare)
           .batch(16, drop_remainder=True).to_iter_dataset(ReadOptions(
           num_threads, prefetch_buffer_size)), grain's own threads

alternating, the median over --repeats epochs. Also: what the pipeline
costs next to a train step (the stage-2 step at these sizes takes about a
second here). grain is not a dependency of fers_jax; run this with it
installed (pip install grain).

Usage: python benchmarks/bench_input.py [--repeats 5] [--out F]
"""

import argparse
import pathlib
import socket
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402

import numpy as np  # noqa: E402

from fers_jax import data, input_pipeline  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def grain_epoch(source, batch, seed, bands, threads):
    import grain

    def prepare(item):
        image, where = input_pipeline._image_of(item, -1)
        return data.normalise(data.select_bands(np.asarray(image), bands, 0,
                                                where), where)
    ds = (grain.MapDataset.source(source).shuffle(seed=seed).map(prepare)
          .batch(batch, drop_remainder=True))
    it = iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * batch)))
    return sum(1 for _ in it), it.get_state()


def batches_epoch(source, batch, seed, bands, threads):
    with input_pipeline.batches(source, batch, seed=seed, bands=bands,
                                num_epochs=1, workers=threads) as b:
        return sum(1 for _ in b), b.state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(
        bi.RESULTS / f"input_{socket.gethostname()}.json"))
    args = p.parse_args(argv)
    import grain
    env = bi.environment(args.threads)
    source = input_pipeline.scene_source([SHARED / "train", SHARED / "background"],
                                         size=32, stride=8)
    times = {"batches": [], "grain": []}
    steps = {}
    for r in range(args.repeats + 1):
        for name, fn in (("batches", batches_epoch), ("grain", grain_epoch)):
            t0 = time.perf_counter()
            steps[name], state = fn(source, 16, r, 100, args.threads)
            if r:  # the first round warms caches and imports
                times[name].append(time.perf_counter() - t0)
    rows = {name: {"epoch_s": statistics.median(t), "epoch_times_s": t,
                   "ms_per_batch": 1e3 * statistics.median(t) / steps[name],
                   "batches": steps[name]} for name, t in times.items()}
    env["loadavg_end"] = bi.loadavg()
    for name, row in rows.items():
        print(f"{name:8s} {row['epoch_s']:.3f} s/epoch of {row['batches']} "
              f"batches, {row['ms_per_batch']:.1f} ms/batch")
    print(f"loadavg {env['loadavg_start']} -> {env['loadavg_end']}")
    bi.write_json(args.out, {"benchmark": "input_pipeline", "environment": env,
                             "grain": grain.__version__, "images": len(source),
                             "settings": vars(args), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
