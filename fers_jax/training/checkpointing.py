"""Training checkpoints: one Orbax CheckpointManager keeping the latest.

Each checkpoint `<dir>/<step>/` holds two items:
  state  the TrainState (step, params, frozen, batch_stats, opt_state);
  meta   JSON: the input pipeline's position, epoch, the best epoch so far,
         the task and the run's config.
Kept: the latest checkpoint only. The best epoch's model is not kept here
but exported (a fers_jax checkpoint, run folder's best/) when validation
finds it: Orbax's keep-best policy forgets the metrics of checkpoints
written before a restart, so a resumed run could lose the best step.
"""

import pathlib
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from fers_jax.errors import CheckpointError
from fers_jax.training.state import TrainState


class Checkpoints:
    """Save and restore TrainStates with their metadata.

    Args:
      directory: where checkpoints go; kept as given for messages, handed
        to Orbax resolved (it requires an absolute path).
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory).expanduser()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.LatestN(1),
            # Synchronous: a save is on disk when save() returns, so a signal
            # or a crash right after it loses nothing.
            enable_async_checkpointing=False, cleanup_tmp_directories=True,
            create=True)
        self.manager = ocp.CheckpointManager(
            self.directory.resolve(), options=options,
            item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict) -> int:
        """Writes a checkpoint at state.step (and drops the one before)."""
        step = int(state.step)
        # Host copies: the next (donating) train step may reuse the buffers.
        tree = jax.tree.map(lambda a: np.array(a, copy=True), state.to_dict())
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=True)
        self.manager.wait_until_finished()
        return step

    def restore(self, step: int, like: TrainState) -> Tuple[TrainState, dict]:
        """The state saved at `step`, in the structure of `like`, and its meta."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like.to_dict())
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the training state "
                f"({type(e).__name__}: {e}); was it written by another "
                f"configuration?") from None
        return TrainState(**got["state"]), dict(got["meta"])

    def restore_meta(self, step: int) -> dict:
        got = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(got["meta"])

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
