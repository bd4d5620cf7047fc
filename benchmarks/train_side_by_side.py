"""Stage-2 training side by side: fers_jax vs the PyTorch baseline (issue 10).

The same initial weights (the torch student and FRN initialised once, SPEC
3.4 init, and converted into fers_jax with fers_jax.convert, as
bench_train_step.py does), the same teacher, the same batches in the same
order (fers_jax's input pipeline: patches of train/ + background/, one
seed), N optimiser steps in both, the reference's settings (trunk BatchNorm
in train mode, Adam lr 0.005 betas (0.5, 0.999)). Records every step's loss
and terms in both and where they part.

  python benchmarks/train_side_by_side.py --bands 50 --steps 15 \\
      --out benchmarks/results/train_side_by_side_50.json
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import bench_train_step as bts  # noqa: E402
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fers_jax import input_pipeline  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bands", type=int, default=50)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=370)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    source = input_pipeline.scene_source(
        [SHARED / "data" / "train", SHARED / "data" / "background"],
        size=32, stride=8)
    with input_pipeline.batches(source, args.batch, seed=args.seed,
                                bands=args.bands) as b:
        batches = [np.asarray(next(b)) for _ in range(args.steps)]

    teacher, student, frn = bts.torch_models(args.bands, args.seed)
    variables, s_cfg, f_cfg = bts.jax_variables(
        tr.CHECKPOINTS / f"{args.bands}bands", student, frn, args.bands)
    step_fn, st, impl = bts.package_step(variables, args.bands, s_cfg, f_cfg)
    torch_step = tr.Stage2Step(teacher, student, frn)

    rows, t_jax, t_torch = [], 0.0, 0.0
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        st, m = step_fn(st, jax.device_put(x))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        t1 = time.perf_counter()
        tm = {k: float(v) for k, v in torch_step(bts.bi.nchw(x)).items()}
        t2 = time.perf_counter()
        t_jax += t1 - t0
        t_torch += t2 - t1
        row = {"step": i + 1,
               "jax": {k: m[k] for k in ("loss", "cc", "cos", "var", "mse", "ssim")},
               "torch": {k: tm[k] for k in ("loss", "cc", "cos", "var", "mse", "ssim")}}
        row["rel_diff"] = {k: abs(row["jax"][k] - row["torch"][k])
                           / max(abs(row["torch"][k]), 1e-12) for k in row["jax"]}
        rows.append(row)
        print(f"step {i + 1:3d} loss jax {row['jax']['loss']:.6f} torch "
              f"{row['torch']['loss']:.6f} rel {row['rel_diff']['loss']:.2e} "
              f"(cc {row['rel_diff']['cc']:.1e} mse {row['rel_diff']['mse']:.1e})",
              flush=True)
    result = {"bands": args.bands, "steps": args.steps, "batch": args.batch,
              "seed": args.seed, "jax_step": impl, "trunk_bn": "batch",
              "uptime_start": up,
              "uptime_end": subprocess.run(["uptime"], capture_output=True,
                                           text=True).stdout.strip(),
              "seconds": {"jax_incl_compile": t_jax, "torch": t_torch},
              "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        s = [r["step"] for r in rows]
        axes[0].plot(s, [r["jax"]["loss"] for r in rows], "o-", label="fers_jax")
        axes[0].plot(s, [r["torch"]["loss"] for r in rows], "x--", label="PyTorch")
        axes[0].set(xlabel="step", ylabel="stage-2 loss",
                    title=f"{args.bands} bands, same init and batches")
        axes[0].legend()
        for k in ("loss", "cc", "mse", "var"):
            axes[1].semilogy(s, [max(r["rel_diff"][k], 1e-9) for r in rows],
                             label=k)
        axes[1].set(xlabel="step", ylabel="|jax - torch| / |torch|",
                    title="relative difference")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
