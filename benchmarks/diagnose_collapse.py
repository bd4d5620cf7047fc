"""Why stage-2 students trained with the trunk's BatchNorm in batch mode
collapse at inference (issue 10): spa_f in train mode vs eval mode.

For each student checkpoint and each scene (the validation scenes whole,
and a batch of 16 training patches), the student runs twice: with the
frozen trunk's BatchNorm on batch statistics (how `--trunk-bn batch`, the
reference's quirk, trains it) and on its running statistics (how every
test-time map uses it). It records max |spa_f|, the fraction of exact zeros,
and how far the batch statistics of the trunk's first BatchNorm (bn1, on
the false-colour image's conv) sit from its running statistics.

  python benchmarks/diagnose_collapse.py --bands 50 \\
      --student init=random RUN/best/student ... --out benchmarks/results/x.json
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fers_jax import checkpoints, configs, input_pipeline  # noqa: E402
from fers_jax.models import SpatialStudent  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def batch_stats_of_bn1(model, variables, x):
    """(batch mean, batch var) of trunk/bn1 on x, read back from the running
    statistics' update (new = 0.9 old + 0.1 batch; var unbiased)."""
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old = variables["batch_stats"]["trunk"]["bn1"]
    new = upd["batch_stats"]["trunk"]["bn1"]
    mean = (new["mean"] - 0.9 * old["mean"]) / 0.1
    var = (new["var"] - 0.9 * old["var"]) / 0.1
    return np.asarray(mean), np.asarray(var)


def latest_student(run):
    """The student variables of run folder `run`'s latest Orbax checkpoint."""
    import flax
    import orbax.checkpoint as ocp
    from fers_jax.training import checkpointing
    ckpts = checkpointing.Checkpoints(pathlib.Path(run) / "checkpoints")
    step = ckpts.latest_step()
    got = ckpts.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    ckpts.close()
    st = got["state"]
    flat = {}
    for tree in (st["params"], st["frozen"]):
        flat.update(flax.traverse_util.flatten_dict(tree.get("student", {})))
    params = flax.traverse_util.unflatten_dict(flat)
    return {"params": params, "batch_stats": st["batch_stats"]["student"]}, step


def measure(model, variables, x) -> dict:
    ev = model.apply(variables, x)
    tr, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    bmean, bvar = batch_stats_of_bn1(model, variables, x)
    run = variables["batch_stats"]["trunk"]["bn1"]
    rmean, rvar = np.asarray(run["mean"]), np.asarray(run["var"])
    rgb = np.asarray(ev["false_rgb"])
    return {
        "spa_max_eval": float(jnp.abs(ev["spa_f"]).max()),
        "spa_max_train": float(jnp.abs(tr["spa_f"]).max()),
        "spa_zero_eval": float(jnp.mean(ev["spa_f"] == 0)),
        "spa_zero_train": float(jnp.mean(tr["spa_f"] == 0)),
        "rgb_std_within_image": float(rgb.reshape(rgb.shape[0], -1, 3)
                                      .std(axis=1).mean()),
        "rgb_mean": rgb.reshape(-1, 3).mean(axis=0).round(4).tolist(),
        # |batch mean - running mean| in running std units, median over channels
        "bn1_mean_shift": float(np.median(np.abs(bmean - rmean)
                                          / np.sqrt(rvar + 1e-5))),
        # batch var / running var, median over channels
        "bn1_var_ratio": float(np.median(bvar / (rvar + 1e-12))),
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bands", type=int, required=True)
    p.add_argument("--student", nargs="+", required=True, metavar="LABEL=PATH",
                   help="student checkpoints; PATH 'random' is a fresh one, 'run:DIR' the latest checkpoint of a run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    model = SpatialStudent(configs.student(args.bands))
    scenes = input_pipeline.load_eval_scenes([SHARED / "data" / "scenes"],
                                             bands=args.bands)
    source = input_pipeline.scene_source(
        [SHARED / "data" / "train", SHARED / "data" / "background"],
        size=32, stride=8)
    with input_pipeline.batches(source, 16, seed=1, bands=args.bands) as b:
        patches = jnp.asarray(next(b))
    result = {"uptime": subprocess.run(["uptime"], capture_output=True,
                                       text=True).stdout.strip(),
              "bands": args.bands, "students": {}}
    for item in args.student:
        label, path = item.split("=", 1)
        if path == "random":
            variables = jax.jit(model.init)(jax.random.key(args.seed),
                                            patches[:1])
        elif path.startswith("run:"):
            variables, step = latest_student(path[4:])
            path = f"{path[4:]}/checkpoints/{step}"
        else:
            variables, _ = checkpoints.load_variables(path, "student")
        rows = {"train_patches_16": measure(model, variables, patches)}
        for scene in scenes:
            rows[scene.name] = measure(model, variables,
                                       jnp.asarray(scene.x)[None])
        result["students"][label] = {"path": path, "rows": rows}
        for name, r in rows.items():
            print(f"{label:>14} {name:>18}: spa_f max eval {r['spa_max_eval']:9.3g}"
                  f" train {r['spa_max_train']:9.3g}; zeros eval "
                  f"{r['spa_zero_eval']:.2f} train {r['spa_zero_train']:.2f}; "
                  f"bn1 shift {r['bn1_mean_shift']:8.3g} var ratio "
                  f"{r['bn1_var_ratio']:8.3g}; rgb std {r['rgb_std_within_image']:.3g}",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
