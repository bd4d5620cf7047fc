"""Seeds' spread of stage-2 runs (issue 10): from each run's metrics.jsonl,
the best selectable epoch (not collapsed, see loop.COLLAPSE_RATIO) within
the first --epochs epochs, its val mAUC and per-scene AUC, spa_f's scale;
mean and std (ddof 1) over the runs of each group. Beside it two figures
free of choosing on the scenes scored: the last epoch's mAUC, and the
held-out mAUC (for each scene, the epoch the other scenes' mean AUC picks,
scored on that scene alone; the mean over scenes).

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


def held_out(records):
    """Leave-one-scene-out selection: for each scene, the live epoch with
    the best mean AUC over the other scenes (ties: the later), and that
    epoch's AUC on the scene. Returns (mean over scenes, {scene: epoch})."""
    scenes = list(records[0]["val_auc"])
    aucs, picked = [], {}
    for s in scenes:
        rest = [t for t in scenes if t != s]
        pick = max(records, key=lambda r: (
            float(np.mean([r["val_auc"][t] for t in rest])), r["epoch"]))
        aucs.append(pick["val_auc"][s])
        picked[s] = pick["epoch"]
    return float(np.mean(aucs)), picked


def best_of(run, max_epoch):
    records = [r for r in epochs_of(run) if r["epoch"] <= max_epoch]
    live = [r for r in records if not r.get("collapsed")]
    if not live:
        raise SystemExit(f"{run}: every epoch up to {max_epoch} collapsed "
                         f"(spa_f ~ 0): nothing selectable to summarise")
    best = max(live, key=lambda r: (r["val_mauc"], r["epoch"]))  # ties: later
    config = json.loads((pathlib.Path(run) / "config.json").read_text())
    held, picked = held_out(live)
    return {"run": str(run), "seed": config["seed"], "epoch": best["epoch"],
            "step": best["step"], "val_mauc": best["val_mauc"],
            "val_auc": best["val_auc"], "scale": best.get("scale"),
            "last_epoch_mauc": records[-1]["val_mauc"],
            "held_out_mauc": held, "held_out_epochs": picked,
            "epochs_seen": len(records),
            "collapsed_epochs": [r["epoch"] for r in records if r.get("collapsed")],
            "per_epoch": [{"epoch": r["epoch"], "val_mauc": r["val_mauc"],
                           "spa_max": (r.get("scale") or {}).get("spa_max"),
                           "collapsed": r.get("collapsed")} for r in records]}


def mean_std(values):
    """(mean, std with ddof 1; None for one value)."""
    return (float(np.mean(values)),
            float(np.std(values, ddof=1)) if len(values) > 1 else None)


def spread(rows, key) -> dict:
    """{key_mean, key_std} of rows[*][key]."""
    mean, std = mean_std([r[key] for r in rows])
    return {f"{key}_mean": mean, f"{key}_std": std}


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
        scenes = list(rows[0]["val_auc"])
        out["groups"][label] = {
            "max_epoch": int(max_epoch), "runs": rows,
            **spread(rows, "val_mauc"), **spread(rows, "last_epoch_mauc"),
            **spread(rows, "held_out_mauc"),
            "per_scene_mean": {s: mean_std([r["val_auc"][s] for r in rows])[0]
                               for s in scenes},
            "per_scene_std": {s: mean_std([r["val_auc"][s] for r in rows])[1]
                              for s in scenes}}
        g = out["groups"][label]
        print(label, f"{g['val_mauc_mean']:.4f} +- {g['val_mauc_std'] or 0:.4f}",
              [(r["seed"], r["epoch"], round(r["val_mauc"], 4)) for r in rows])
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    if args.markdown:
        print(markdown(out["groups"]))
        print()
        print(unselected_markdown(out["groups"]))


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


def unselected_markdown(groups) -> str:
    """A row per group: best epoch (chosen on the scenes scored), last
    epoch and held-out selection, mean +- std over its runs."""
    def cell(g, key):
        std = g[f"{key}_std"]
        return f"{g[f'{key}_mean']:.4f}" + (f" +- {std:.4f}" if std else "")
    lines = ["| group | runs | best epoch (selected on scenes/) | last epoch "
             "| held-out selection |", "|---|---|---|---|---|"]
    for label, g in groups.items():
        lines.append(f"| {label} | {len(g['runs'])} | {cell(g, 'val_mauc')} | "
                     f"{cell(g, 'last_epoch_mauc')} | {cell(g, 'held_out_mauc')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
