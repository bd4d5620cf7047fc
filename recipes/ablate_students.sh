#!/bin/bash
# The stage-2 ablations of README "Trained models" (issue 10), one seed each:
# epochs, the variance term's L1 weight and the patch size, at 50 and 100
# bands, every run selected on scenes/ (--val) and resumable (run the same
# command again after an interruption).
#   bash recipes/ablate_students.sh [RUNS_DIR] [EPOCHS]   (from the repo root)
# Summarise with benchmarks/summarise_runs.py (see README).
# Cost on a quiet 2-core CPU: ~40 s an epoch at 100 bands, patch 32.
set -euo pipefail
RUNS=${1:-runs/ablate}
EPOCHS=${2:-8}
SHARED=${FERS_SHARED:-../shared}
T=$SHARED/reference/checkpoints/saved_models
run() {  # name bands patch [extra options]
  local name=$1 bands=$2 patch=$3; shift 3
  python train.py stage2 --data $SHARED/data/train $SHARED/data/background \
    --bands $bands --patch-size $patch --stride 8 --batch-size 16 \
    --teacher $T/${bands}bands --val $SHARED/data/scenes --epochs $EPOCHS \
    --seed 0 --quiet --out $RUNS/$name --resume "$@"
}
run b50_p32_l1off 50 32 --loss-weights l1=0
run b50_p48 50 48
run b50_p48_l1off 50 48 --loss-weights l1=0
run b100_p32 100 32                      # the shipped setting, longer
run b100_p32_l1off 100 32 --loss-weights l1=0
run b100_p48 100 48
