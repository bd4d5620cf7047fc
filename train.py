"""Trains FERD stage 1 (reverse distillation) or FERS stage 2 (the student).

  python train.py stage1 --data HAD100Dataset --bands 100 --out runs/s1 \\
      --imagenet wide_resnet101_2-32ee1156.pth
  python train.py stage2 --data HAD100Dataset --bands 100 --out runs/s2 \\
      --teacher runs/s1/best/teacher --imagenet resnet34-b627a593.pth
  python train.py stage1 --data ../shared/data/background --bands 50 \\
      --stride 8 --config tiny --steps 40 --out /tmp/s1   # a quick CPU run

Trains on every device, each batch split evenly over them (--batch-size
must be divisible by their number). On several hosts, start the same
command on each with --distributed (see fers_jax.parallel).

Writes DIR/metrics.jsonl, DIR/checkpoints/ (latest and best), and the final
and best models as fers_jax checkpoints in DIR/final/ and DIR/best/
(stage 1: stage1/ and teacher/; stage 2: student/, frn/ and teacher/), ready
for evaluate.py --teacher / --student. Ctrl-C (or SIGTERM) saves a
checkpoint and stops; --resume continues exactly where it stopped.
"""

import argparse
import sys

from fers_jax import cli

if __name__ == "__main__":
    # Before JAX loads: glibc reads its malloc tunables at start-up only.
    cli.restart_with_huge_pages()

from fers_jax import parallel  # noqa: E402
from fers_jax.training import config, loop  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("stage", choices=config.STAGES,
                   help="stage1: FERD reverse distillation (trains the spectral "
                        "teacher); stage2: FERS spatial student")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="HAD100 roots (their train/<sensor> split), scene files or "
                        "folders (cut into background patches, anomaly-free), or a "
                        "built TFDS dataset folder")
    p.add_argument("--bands", type=int, required=True,
                   help="use this many bands from --band-start")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--teacher", metavar="CKPT",
                   help="stage 2 (required): the frozen spectral teacher: a published "
                        "folder (convh.pt/enc.pt/pc.pt), a PyTorch stage-1 file, or a "
                        "fers_jax teacher/stage1 checkpoint (e.g. DIR/best/teacher), or a "
                        "train.py run folder DIR (its best/, else final/ teacher)")
    p.add_argument("--config", dest="model", choices=config.MODEL_SIZES,
                   default="full", help="model sizes: the published ones, or tiny "
                                        "for quick CPU runs and tests")
    p.add_argument("--epochs", type=int, default=60, help="epochs to train")
    p.add_argument("--steps", type=int, default=None,
                   help="total optimiser steps; overrides --epochs (default: "
                        "--epochs whole epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--val", nargs="+", default=(), metavar="PATH",
                   help="validation scenes (files, folders, HAD100 roots' test "
                        "split), scored (mAUC) after every epoch (default: none)")
    p.add_argument("--test", nargs="+", default=(), metavar="PATH",
                   help="test scenes scored after every epoch (default: the test "
                        "split of HAD100 roots in --data)")
    p.add_argument("--select", choices=config.SELECT, default=None,
                   help="whose mAUC picks the best epoch (default: val when --val "
                        "is given, else test as the reference does, else none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--imagenet", metavar="PATH.pth",
                   help="torchvision ImageNet weights of the frozen backbone: "
                        "Wide-ResNet-101-2 (stage 1) or ResNet-34 (stage 2) "
                        "(default: none, the backbone keeps its random "
                        "initialisation)")
    p.add_argument("--seed", type=int, default=None,
                   help="PRNG seed (default: the reference's: 820 for 200 bands, "
                        "810 for 100, 370 for 50, 850 for 200 AVIRIS bands, else 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="K",
                   help="train K replicas, seeds --seed .. --seed+K-1, in one "
                        "program (one jitted train step over the stacked replicas): DIR/seed_<s>/ each "
                        "(metrics, checkpoints, best/, final/), DIR/seeds.json "
                        "their best epochs' mean and std (default: one run)")
    p.add_argument("--sensor", default="aviris_ng",
                   help="HAD100 sensor folder (aviris_ng or aviris)")
    p.add_argument("--band-start", type=int, default=0, help="first band used")
    p.add_argument("--patch-size", type=int, default=64,
                   help="side of the background patches cut from scene files")
    p.add_argument("--stride", type=int, default=None,
                   help="step between patches (default: --patch-size)")
    p.add_argument("--augment", action="store_true",
                   help="turn each training image by one of the square's 8 "
                        "symmetries (90-degree rotations, flips), drawn per "
                        "seed, epoch and image; resumes exactly (an ablation: "
                        "the reference does not)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=0.005,
                   help="Adam learning rate (betas 0.5, 0.999, eps 1e-8)")
    p.add_argument("--trunk-bn", choices=("batch", "running"), default="running",
                   help="stage 2: the frozen trunk's BatchNorm: its running "
                        "statistics (eval mode, as at inference; the default), or "
                        "batch statistics updating the running ones (the "
                        "reference's quirk: students trained so collapse at "
                        "inference with a random trunk)")
    p.add_argument("--train-trunk", action="store_true",
                   help="stage 2: train the ResNet-34 trunk too (an ablation; the "
                        "reference keeps it frozen)")
    p.add_argument("--loss-weights", metavar="NAME=W,...", default=None,
                   help="stage 2: loss weights, any of cc, cos, var, mse, ssim, "
                        "l1 (the variance term's L1 part weighed on its own, an "
                        "ablation) and fa (the detection map's peaks on the "
                        "anomaly-free training images, losses.false_alarm; not the "
                        "reference's) (default: the reference's, cc=1,cos=0.1,"
                        "var=0.1,mse=1,ssim=0.01, l1 with var, fa=0)")
    p.add_argument("--bce-on-logits", action="store_true",
                   help="stage 1: BCE on the classifier's logits instead of the "
                        "reference's BCE on its sigmoid output")
    p.add_argument("--feature-cache", metavar="DIR", default=None,
                   help="stage 2: keep the frozen teacher's features of each "
                        "training image as files in DIR, reused by later runs "
                        "with the same teacher, bands and patches (default: "
                        "in memory, computed once per run)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also checkpoint every this many steps (default: each epoch)")
    p.add_argument("--log-every", type=int, default=1, metavar="STEPS",
                   help="write a metrics.jsonl record every this many steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host run: call "
                        "jax.distributed.initialize() first (coordinator, "
                        "process count and index from the cluster or "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                        "JAX_PROCESS_ID)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.distributed:
        parallel.initialize_distributed()
    fields = {k: v for k, v in vars(args).items()
              if k not in ("quiet", "distributed")}
    fields.update(data=tuple(args.data), val=tuple(args.val),
                  test=tuple(args.test), progress=not args.quiet)
    summary = loop.train_and_evaluate(config.TrainConfig(**fields))
    if summary["interrupted"]:
        raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(cli.run(main))
