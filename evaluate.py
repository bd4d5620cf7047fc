"""Scores hyperspectral scenes with RX, LRX, CRD, FERD or FERS.

  python evaluate.py --scenes ../shared/data/scenes --method rx --out out/rx
  python evaluate.py --scenes SCENES --method ferd --teacher CKPT --bands 100 --out DIR
  python evaluate.py --scenes SCENES --method fers --teacher CKPT --student CKPT \\
      --bands 50 --out DIR
  python evaluate.py --scenes SCENES --method rx lrx ferd fers --teacher CKPT \\
      --student CKPT --bands 50 --out DIR     # one comparison of four methods

Writes DIR/results.json, DIR/maps/<scene>.npy|png, DIR/roc.png and
DIR/report.md|html; with several methods one block per method in
results.json, DIR/maps/<method>/<scene>.npy, DIR/maps/<scene>.png (the maps
side by side) and DIR/roc/<scene>.png (a curve per method). --teacher and
--student also take a train.py run folder (its best/, else final/ model).
"""

import argparse
import sys

from fers_jax import cli

if __name__ == "__main__":
    # Before JAX loads: glibc reads its malloc tunables at start-up only.
    cli.restart_with_huge_pages()

from fers_jax import detectors, evaluation  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--scenes", nargs="+", required=True, metavar="PATH",
                   help="scene files (.mat, .npz, .npy, ENVI .hdr), folders of them, "
                        "or HAD100 roots; an ENVI scene's mask is <stem>_mask.npy, "
                        ".png or .hdr beside its header")
    p.add_argument("--method", nargs="+", choices=evaluation.METHODS, default=None,
                   metavar="METHOD",
                   help=f"detector, one of {', '.join(evaluation.METHODS)} (default: "
                        "rx); several (--method rx ferd fers) score the same scenes, "
                        "each loaded once, into one comparison report")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--bands", type=int, default=None,
                   help="use this many bands from --start-band (default: all)")
    p.add_argument("--start-band", type=int, default=0, help="first band used")
    p.add_argument("--precision", choices=("auto", "float64", "float32"),
                   default="auto",
                   help="RX arithmetic: float64 is the reference's NumPy RX, float32 "
                        "its batched torch RX; auto uses float32 on the FERS product "
                        "path (as the reference) and float64 elsewhere")
    p.add_argument("--inner", type=int, default=3, help="LRX/CRD inner (guard) window")
    p.add_argument("--outer", type=int, default=11, help="LRX/CRD outer window")
    p.add_argument("--lambda", dest="lam", type=float, default=1e-6,
                   help="CRD regularisation weight")
    p.add_argument("--convention", choices=tuple(detectors.CONVENTIONS),
                   default="fers_jax",
                   help="LRX/CRD as computed: fers_jax (border "
                        f"{detectors.DEFAULT_BORDER}, LRX pinv, CRD sum-to-one, the "
                        "reference's input normalisation) or matlab (the public "
                        "MATLAB code: wrap borders, sum-to-one CRD, LRX with "
                        "(G + delta I)^-1, the float64 cube min-max scaled to [0, 1])")
    p.add_argument("--border", choices=detectors.BORDERS,
                   help="LRX/CRD windows at the image border: wrap (periodic, as "
                        "the MATLAB code), reflect (mirrored, copies of the guard "
                        "window left out), inside (only pixels in the image); "
                        "default: the convention's")
    p.add_argument("--lrx-form", choices=detectors.LRX_FORMS,
                   help="pinv: centred covariance, pseudo-inverse; matlab: "
                        "uncentred Gram + delta I (default: the convention's)")
    p.add_argument("--crd-form", choices=detectors.CRD_FORMS,
                   help="sum-to-one: Li and Du's main algorithm (X and y augmented "
                        "by a 1); plain (default: the convention's)")
    p.add_argument("--delta", type=float, default=detectors.LRX_DELTA,
                   help="LRX matlab form: diagonal loading")
    p.add_argument("--teacher", metavar="CKPT", help="FERD/FERS spectral teacher: a "
                   "folder with convh.pt/enc.pt/pc.pt, a fers_jax Orbax checkpoint or "
                   "a train.py run folder (its best/, else final/ model) (required "
                   "by ferd and fers)")
    p.add_argument("--student", metavar="CKPT", help="FERS spatial student: a "
                   "spa_fen.pt, a fers_jax Orbax checkpoint, a train.py stage-2 run "
                   "folder, or a trained model's name (fers-50, fers-100: python -m "
                   "fers_jax.pretrained --list; only with the teacher it was trained "
                   "against) (required by fers)")
    p.add_argument("--fusion", choices=("auto", "sum", "product"), default="auto",
                   help="FERS map: auto is sum above 50 bands, product at 50 and below")
    p.add_argument("--batch-size", type=int, default=16,
                   help="scenes of one size scored in one call")
    p.add_argument("--sensor", default="aviris_ng", help="sensor folder of a HAD100 root")
    p.add_argument("--cube-key", help="key of the cube in .mat/.npz files, when ambiguous "
                   "(default: found by name, else the only 3-D array)")
    p.add_argument("--gt-key", help="key of the mask in .mat/.npz files, when ambiguous "
                   "(default: found by name, else the only 2-D array)")
    p.add_argument("--drop-bad-bands", action="store_true",
                   help="ENVI scenes: drop the bands the header's bbl marks bad "
                        "(before --start-band/--bands)")
    p.add_argument("--export", action="store_true",
                   help="also write spe_f/spa_f per scene to DIR/features/")
    p.add_argument("--tile", default="auto", metavar="H,W|auto|off",
                   help="compute tile by tile with bounded memory (same maps to "
                        "float32 rounding): tiles of H,W pixels; auto tiles scenes "
                        "above a megapixel or batches estimated above 40%% of the "
                        "device's memory (fers_jax.plan.auto_tile); off never")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="FERD/FERS network arithmetic (bfloat16: for accelerators; "
                        "RX keeps --precision)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="memory for one scene's computation; a scene that needs "
                        "more runs out of core (read from disk in row blocks, RX "
                        "inputs spilled to a temporary file, the same maps); a "
                        "budget too small for one tile is refused with the "
                        "smallest that works (default: a quarter of the RAM "
                        "available at start)")
    p.add_argument("--no-shard", dest="shard", action="store_false",
                   help="run every batch on the first device alone, not "
                        "split over all of them (fers_jax.parallel)")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the PNG maps and ROC figure")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfgs = evaluation.configs_from_args(args)
    if len(cfgs) > 1:
        results = evaluation.compare(args.scenes, args.out, cfgs,
                                     progress=not args.quiet)
        print(evaluation.format_comparison(results))
        return
    results = evaluation.evaluate(args.scenes, args.out, cfgs[0],
                                  progress=not args.quiet)
    print(evaluation.format_summary(results))


if __name__ == "__main__":
    sys.exit(cli.run(main))
