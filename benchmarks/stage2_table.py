"""Per-scene AUCs on the validation scenes for the trained-models table
(issue 10): RX, FERD, FERS with the zero student (spa_f = 0), FERS with a
random (untrained) student, and FERS with each trained student given, each
FERS map with sum and with product fusion.

  python benchmarks/stage2_table.py --bands 50 \\
      --teacher ../shared/reference/checkpoints/saved_models/50bands \\
      --student s0=RUN0/best/student s1=RUN1/best/student \\
      --out benchmarks/results/stage2_table_50.json

Students may also be registry names (fers-50). Each scene is scored whole,
alone, with the maps evaluate.py makes (fers_jax.inference).
"""

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fers_jax import (checkpoints, configs, detectors, inference,  # noqa: E402
                      input_pipeline, metrics)
from fers_jax.models import SpatialStudent  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bands", type=int, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", nargs="*", default=[], metavar="LABEL=PATH")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--no-random", action="store_true",
                   help="skip the random (untrained) student")
    p.add_argument("--scenes", default=str(SHARED / "data" / "scenes"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    scenes = input_pipeline.load_eval_scenes([args.scenes], bands=args.bands)
    teacher, t_vars = checkpoints.load_teacher(args.teacher, args.bands)
    spe = jax.jit(lambda v, x: teacher.apply(v, x)["spe_f"])
    model = SpatialStudent(configs.student(args.bands))
    spa = jax.jit(lambda v, x: model.apply(v, x)["spa_f"])
    students = {} if args.no_random else {"random": jax.jit(model.init)(
        jax.random.key(args.random_seed), jnp.zeros((1, 32, 32, args.bands)))}
    for item in args.student:
        label, path = item.split("=", 1)
        students[label] = checkpoints.load_student(path, args.bands)[1]

    rows = {}
    for scene in scenes:
        x = jnp.asarray(scene.x)[None]
        spe_f = spe(t_vars, x)
        row = {"rx": detectors.rx(x, "float64"),
               "ferd": inference.ferd_map(x, spe_f)}
        for fusion in ("sum", "product"):
            row[f"zero_{fusion}"] = inference.fers_map(
                x, spe_f, jnp.zeros_like(spe_f), fusion)
        scale = {"spe_max": float(jnp.abs(spe_f).max())}
        for label, variables in students.items():
            spa_f = spa(variables, x)
            scale[f"{label}_spa_max"] = float(jnp.abs(spa_f).max())
            for fusion in ("sum", "product"):
                row[f"{label}_{fusion}"] = inference.fers_map(x, spe_f, spa_f,
                                                              fusion)
        rows[scene.name] = {
            **{k: metrics.roc_auc(np.asarray(m)[0], scene.gt, scene.name)
               for k, m in row.items()}, "scale": scale}
        print(scene.name, {k: round(v, 4) for k, v in rows[scene.name].items()
                           if k != "scale"}, flush=True)
    methods = [k for k in next(iter(rows.values())) if k != "scale"]
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in methods}
    result = {"bands": args.bands, "teacher": args.teacher,
              "students": {i.split("=", 1)[0]: i.split("=", 1)[1]
                           for i in args.student},
              "uptime": subprocess.run(["uptime"], capture_output=True,
                                       text=True).stdout.strip(),
              "per_scene": rows, "mean": mean}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print("mean", {k: round(v, 4) for k, v in mean.items()})


if __name__ == "__main__":
    main()
