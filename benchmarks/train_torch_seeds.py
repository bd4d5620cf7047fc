"""Full stage-2 training in the PyTorch baseline, several seeds, scored as
fers_jax's train.py scores its epochs (issue 10, item 3: "does the JAX port
train as well as the original?").

Each seed trains as the reference does: torch_reference.Stage2Step (teacher
recomputed for every batch, Adam lr 0.005 betas (0.5, 0.999)), a torch
DataLoader (shuffle, batch 16, drop_last) over the same 32x32 patches at
stride 8 of ../shared/data/train and background that train.py cuts, each
patch band-selected and normalised in the Dataset (bench_train's), torch's
own initialisation (SPEC 3.4 for Conv2RGB, LightSPP and the FRN; PyTorch's
default for the trunk) from torch.manual_seed(seed). The trunk runs on its
running BatchNorm statistics (`trunk_bn="running"`, fers_jax's default;
README "What broke training"), so both frameworks train the same function.

After every epoch the student is converted into fers_jax variables
(fers_jax.convert) and scored on ../shared/data/scenes by the same code that
scores train.py's epochs (training.loop.score_scenes: the FERS map, `auto`
fusion, ROC AUC; spa_f's scale, the collapse guard). Per seed the best
selectable epoch within --epochs; mean and std (ddof 1) over seeds, set
beside fers_jax's seeds (benchmarks/results/trained_students.json, same
settings and epochs) with the difference of means.

  python benchmarks/train_torch_seeds.py --bands 50 --seeds 0 1 2 --epochs 8 \\
      --out benchmarks/results/torch_seeds_50.json
"""

import argparse
import itertools
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import bench_train as bt  # noqa: E402
import bench_train_step as bts  # noqa: E402
import torch_reference as tr  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fers_jax import checkpoints, input_pipeline  # noqa: E402
from fers_jax.training import loop, stage2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def train_seed(bands, seed, epochs, source, val, task, log, max_steps=None):
    teacher, student, frn = bts.torch_models(bands, seed)
    step = tr.Stage2Step(teacher, student, frn, trunk_bn="running")
    loader = torch.utils.data.DataLoader(
        bt._TorchPatches(source, bands), batch_size=bt.BATCH, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(seed))
    records, n = [], 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        losses = [float(step(x)["loss"])
                  for x in itertools.islice(loader, max_steps)]
        n += len(losses)
        seconds = time.perf_counter() - t0
        variables, _, _ = bts.jax_variables(tr.CHECKPOINTS / f"{bands}bands",
                                            student, frn, bands)
        per_scene = {}
        aucs = loop.score_scenes(task, variables, val, scale=per_scene)
        scale = loop.summarise_scale(per_scene)
        rec = {"epoch": epoch, "step": n, "loss_mean": float(np.mean(losses)),
               "train_seconds": seconds,
               "val_mauc": float(np.mean(list(aucs.values()))), "val_auc": aucs,
               "scale": scale, "collapsed": loop.collapsed(scale)}
        records.append(rec)
        log(f"seed {seed} epoch {epoch}: loss {rec['loss_mean']:.3f}, val mAUC "
            f"{rec['val_mauc']:.4f}, spa_f max {scale['spa_max']:.3g} "
            f"({seconds:.0f} s)")
    live = [r for r in records if not r["collapsed"]]
    best = max(live, key=lambda r: (r["val_mauc"], r["epoch"])) if live else None
    return {"seed": seed, "per_epoch": records, "best": best}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bands", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None,
                   help="steps an epoch at most (a smoke run)")
    p.add_argument("--jax", default=str(RESULTS / "trained_students.json"),
                   help="fers_jax's seeds (benchmarks/summarise_runs.py output)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    teacher, _ = checkpoints.load_teacher(tr.CHECKPOINTS / f"{args.bands}bands",
                                          args.bands)
    task = stage2.task(teacher.config, "full", trunk_bn="running")
    val = input_pipeline.load_eval_scenes([tr.SHARED / "data" / "scenes"],
                                          bands=args.bands)
    source = input_pipeline.scene_source(
        [tr.SHARED / "data" / "train", tr.SHARED / "data" / "background"],
        size=bt.PATCH, stride=bt.STRIDE)
    out = {"benchmark": "torch_seeds", "uptime_start": up,
           "torch": torch.__version__, "threads": args.threads,
           "settings": {"bands": args.bands, "epochs": args.epochs,
                        "patch": bt.PATCH, "stride": bt.STRIDE,
                        "batch": bt.BATCH, "trunk_bn": "running",
                        "patches": len(source)}, "runs": []}
    path = pathlib.Path(args.out)
    for seed in args.seeds:
        out["runs"].append(train_seed(args.bands, seed, args.epochs, source,
                                      val, task, lambda s: print(s, flush=True),
                                      args.max_steps))
        path.write_text(json.dumps(out, indent=1))  # each seed as it ends
    best = [r["best"]["val_mauc"] for r in out["runs"] if r["best"]]
    out["torch_mean"] = float(np.mean(best))
    out["torch_std"] = float(np.std(best, ddof=1)) if len(best) > 1 else None
    jax_groups = json.loads(pathlib.Path(args.jax).read_text())["groups"]
    g = jax_groups.get(str(args.bands))
    if g:
        out["jax_mean"], out["jax_std"] = g["val_mauc_mean"], g["val_mauc_std"]
        out["jax_max_epoch"] = g["max_epoch"]
        out["difference_of_means"] = out["jax_mean"] - out["torch_mean"]
    out["uptime_end"] = subprocess.run(["uptime"], capture_output=True,
                                       text=True).stdout.strip()
    path.write_text(json.dumps(out, indent=1))
    print(f"torch {out['torch_mean']:.4f} +- {out['torch_std'] or 0:.4f}"
          + (f"; fers_jax {out['jax_mean']:.4f} +- {out['jax_std']:.4f}; "
             f"difference {out['difference_of_means']:+.4f}" if g else ""))


if __name__ == "__main__":
    main()
