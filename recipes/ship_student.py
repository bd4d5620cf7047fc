"""Stores a trained stage-2 run's best student in the registry
(fers_jax/pretrained_models) under NAME, with its model card.

  python recipes/ship_student.py --run RUN_DIR --name fers-50 \
      --table benchmarks/results/stage2_table_50.json [--summary TEXT]

The card's validation rows are the run's best epoch's per-scene AUC
(metrics.jsonl, the map validation used) against FERD's per-scene AUC from
the table (benchmarks/stage2_table.py) on the same scenes.
"""

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fers_jax import checkpoints, pretrained  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--summary", default="")
    p.add_argument("--notes", default="")
    args = p.parse_args(argv)
    run = pathlib.Path(args.run)
    config = json.loads((run / "config.json").read_text())
    cfg = config["train_config"]
    best = json.loads((run / "best" / "best_epoch.json").read_text())
    epoch = [json.loads(line) for line in (run / "metrics.jsonl").read_text()
             .splitlines() if '"kind": "epoch"' in line]
    record = next(r for r in epoch if r["step"] == best["step"])
    table = json.loads(pathlib.Path(args.table).read_text())
    per_scene = {s: {"fers": record["val_auc"][s],
                     "ferd": table["per_scene"][s]["ferd"],
                     "zero_student": table["per_scene"][s][
                         "zero_" + ("sum" if cfg["bands"] > 50 else "product")]}
                 for s in record["val_auc"]}
    teacher = pathlib.Path(cfg["teacher"])
    files = sorted(teacher.iterdir()) if teacher.is_dir() else [teacher]
    model, variables = checkpoints.load_student(run / "best" / "student",
                                                cfg["bands"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    card = {
        "summary": args.summary,
        "teacher": f"the authors' HAD100 {cfg['bands']}-band teacher "
                   f"(saved_models/{teacher.name})",
        "teacher_sha256": {f.name: pretrained.sha256_file(f) for f in files
                           if f.is_file()},
        "data": [pathlib.Path(d).name + "/" for d in cfg["data"]],
        "validation_scenes": ", ".join(pathlib.Path(v).name + "/"
                                       for v in cfg["val"]),
        "settings": {k: cfg[k] for k in ("patch_size", "stride", "batch_size",
                                         "learning_rate", "b1", "b2", "eps",
                                         "trunk_bn", "epochs", "model")}
        | {"fusion": config["task"]["fusion"],
           "loss_weights": config["task"]["weights"],
           "imagenet": cfg["imagenet"], "select": config["select"]},
        "steps": best["step"], "epoch": best["epoch"], "seed": config["seed"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d"),
        "code_commit": commit,
        "validation": {"fers_mauc": record["val_mauc"],
                       "ferd_mauc": sum(r["ferd"] for r in per_scene.values())
                       / len(per_scene),
                       "zero_student_mauc": sum(r["zero_student"] for r in
                                                per_scene.values())
                       / len(per_scene),
                       "per_scene": per_scene, "spa_f_scale": record.get("scale")},
        "notes": args.notes,
    }
    written = pretrained.write_model(args.name, variables, model.config, card)
    print(pretrained.format_card(written))


if __name__ == "__main__":
    main()
