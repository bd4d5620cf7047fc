"""Seeds' spread of stage-2 runs (issue 10): from each run's metrics.jsonl,
the best selectable epoch (not collapsed, see loop.COLLAPSE_RATIO) within
the first --epochs epochs, its val mAUC and per-scene AUC, spa_f's scale;
mean and std (ddof 1) over the runs of each group.

  python benchmarks/summarise_runs.py --group 50=RUN_A,RUN_B,RUN_C:5 \\
      --group 100=RUN_D,RUN_E:2 --out benchmarks/results/trained_students.json \\
      [--markdown]   (also print a table: a row per group, mAUC by epoch)
"""

import argparse
import json
import pathlib
import subprocess

import numpy as np


def epochs_of(run):
    return [json.loads(line) for line in
            (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines()
            if '"kind": "epoch"' in line]


def best_of(run, max_epoch):
    records = [r for r in epochs_of(run) if r["epoch"] <= max_epoch]
    live = [r for r in records if not r.get("collapsed")]
    best = max(live, key=lambda r: (r["val_mauc"], r["epoch"]))  # ties: later
    config = json.loads((pathlib.Path(run) / "config.json").read_text())
    return {"run": str(run), "seed": config["seed"], "epoch": best["epoch"],
            "step": best["step"], "val_mauc": best["val_mauc"],
            "val_auc": best["val_auc"], "scale": best.get("scale"),
            "epochs_seen": len(records),
            "collapsed_epochs": [r["epoch"] for r in records if r.get("collapsed")],
            "per_epoch": [{"epoch": r["epoch"], "val_mauc": r["val_mauc"],
                           "spa_max": (r.get("scale") or {}).get("spa_max"),
                           "collapsed": r.get("collapsed")} for r in records]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--group", action="append", required=True,
                   metavar="LABEL=RUN,RUN,...:MAX_EPOCH")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    out = {"uptime": subprocess.run(["uptime"], capture_output=True,
                                    text=True).stdout.strip(), "groups": {}}
    for g in args.group:
        label, rest = g.split("=", 1)
        runs, max_epoch = rest.rsplit(":", 1)
        rows = [best_of(r, int(max_epoch)) for r in runs.split(",")]
        m = [r["val_mauc"] for r in rows]
        scenes = list(rows[0]["val_auc"])
        out["groups"][label] = {
            "max_epoch": int(max_epoch), "runs": rows,
            "val_mauc_mean": float(np.mean(m)),
            "val_mauc_std": float(np.std(m, ddof=1)) if len(m) > 1 else None,
            "per_scene_mean": {s: float(np.mean([r["val_auc"][s] for r in rows]))
                               for s in scenes},
            "per_scene_std": {s: float(np.std([r["val_auc"][s] for r in rows],
                                              ddof=1)) if len(rows) > 1 else None
                              for s in scenes}}
        print(label, f"{np.mean(m):.4f} +- {np.std(m, ddof=1) if len(m) > 1 else 0:.4f}",
              [(r["seed"], r["epoch"], round(r["val_mauc"], 4)) for r in rows])
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    if args.markdown:
        print(markdown(out["groups"]))


def markdown(groups) -> str:
    """A row per group: best selectable epoch (mean +- std over its runs) and,
    for one-run groups, val mAUC and spa_f max at every epoch."""
    epochs = max(len(r["per_epoch"]) for g in groups.values() for r in g["runs"])
    head = ["group", "runs", "best (mean +- std)", "best epoch(s)",
            *(f"ep {e}" for e in range(1, epochs + 1))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in groups.items():
        std = g["val_mauc_std"]
        best = f"{g['val_mauc_mean']:.4f}" + (f" +- {std:.4f}" if std else "")
        cells = [label, str(len(g["runs"])), best,
                 ", ".join(str(r["epoch"]) for r in g["runs"])]
        per = g["runs"][0]["per_epoch"] if len(g["runs"]) == 1 else []
        for e in range(epochs):
            if e < len(per):
                r = per[e]
                spa = r["spa_max"]
                cells.append(f"{r['val_mauc']:.4f} ({spa:.2g})" if spa is not None
                             else f"{r['val_mauc']:.4f}")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
