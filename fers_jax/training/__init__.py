"""Training both stages: tasks (what trains, the loss), state, loop.

- `state`: TrainState (trainable params / frozen params / batch_stats /
  opt_state / step), the Adam record, the shared pure `train_step`.
- `stage1`, `stage2`: the FERD and FERS training tasks.
- `loop`: `train_and_evaluate`, the epoch loop with validation, Orbax
  checkpoints, metrics.jsonl, resume and export.

The device mesh they run on is fers_jax.parallel's.
"""
