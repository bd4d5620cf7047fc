"""The README's trained-models table (markdown) from the result JSONs:
benchmarks/results/stage2_table_<B>_s0.json (RX, FERD, zero and random
students, fusion ablation) and trained_students.json (seeds' spread).

  python benchmarks/trained_table.py > /tmp/table.md
"""

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main():
    seeds = json.loads((RESULTS / "trained_students.json").read_text())["groups"]
    for bands, fusion in ((50, "product"), (100, "sum")):
        t = json.loads((RESULTS / f"stage2_table_{bands}_s0.json").read_text())
        g = seeds[str(bands)]
        n = len(g["runs"])
        print(f"\n{bands} bands ({fusion} fusion; trained: best selectable epoch "
              f"of {n} seeds within {g['max_epoch']} epochs, mean +- std)\n")
        print("| scene | RX | FERD | zero student | random student | "
              "FERS trained | shipped |")
        print("|---|---|---|---|---|---|---|")
        shipped = json.loads((RESULTS.parents[1] / "fers_jax" / "pretrained_models"
                              / f"fers-{bands}.json").read_text())
        ship = shipped["validation"]["per_scene"]
        for scene, row in t["per_scene"].items():
            print(f"| {scene} | {row['rx']:.4f} | {row['ferd']:.4f} | "
                  f"{row['zero_' + fusion]:.4f} | {row['random_' + fusion]:.4f} | "
                  f"{g['per_scene_mean'][scene]:.4f} +- "
                  f"{g['per_scene_std'][scene]:.4f} | {ship[scene]['fers']:.4f} |")
        m = t["mean"]
        print(f"| **mean** | {m['rx']:.4f} | {m['ferd']:.4f} | "
              f"{m['zero_' + fusion]:.4f} | {m['random_' + fusion]:.4f} | "
              f"**{g['val_mauc_mean']:.4f} +- {g['val_mauc_std']:.4f}** | "
              f"{shipped['validation']['fers_mauc']:.4f} |")
        other = "sum" if fusion == "product" else "product"
        print(f"\nFusion ablation (the shipped student): {fusion} "
              f"{m['s0_' + fusion]:.4f}, {other} {m['s0_' + other]:.4f}; zero "
              f"student {fusion} {m['zero_' + fusion]:.4f}, {other} "
              f"{m['zero_' + other]:.4f}.")
        print("Seeds: " + ", ".join(
            f"seed {r['seed']} epoch {r['epoch']} {r['val_mauc']:.4f} (spa_f max "
            f"{r['scale']['spa_max']:.3g})" for r in g["runs"]))


if __name__ == "__main__":
    main()
