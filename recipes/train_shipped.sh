#!/bin/bash
# Retrains the shipped students (fers_jax.pretrained: fers-50, fers-100) with
# the settings on their cards, then stores them in the registry.
#   bash recipes/train_shipped.sh [RUNS_DIR]      (from the repository root)
# Each run is resumable: run the same command again after an interruption.
# Cost: on a quiet 2-core CPU ~40 s an epoch at 100 bands (18 steps of 16).
set -euo pipefail
RUNS=${1:-runs/shipped}
SHARED=${FERS_SHARED:-../shared}
T=$SHARED/reference/checkpoints/saved_models
train() {  # bands epochs seed
  python train.py stage2 --data $SHARED/data/train $SHARED/data/background \
    --bands $1 --patch-size 32 --stride 8 --batch-size 16 --trunk-bn running \
    --teacher $T/${1}bands --val $SHARED/data/scenes --epochs $2 --seed $3 \
    --out $RUNS/b$1_s$3 --resume
}
# The card of each model gives its epochs and seed; these are the shipped ones.
train 50 ${FERS50_EPOCHS:-6} ${FERS50_SEED:-0}
train 100 ${FERS100_EPOCHS:-2} ${FERS100_SEED:-0}
for b in 50 100; do
  python benchmarks/stage2_table.py --bands $b --teacher $T/${b}bands \
    --no-random --out $RUNS/table_$b.json
done
python recipes/ship_student.py --run $RUNS/b50_s${FERS50_SEED:-0} --name fers-50 \
  --table $RUNS/table_50.json
python recipes/ship_student.py --run $RUNS/b100_s${FERS100_SEED:-0} --name fers-100 \
  --table $RUNS/table_100.json
