"""The train state, the optimiser, and the one train step both stages share.

Frozen parts are kept out of the optimiser altogether: the parameter tree is
split into `params` (what trains; the only tree Adam sees and keeps moments
for) and `frozen` (ImageNet backbones, the stage-2 teacher), which rides
along into the forward pass and comes back untouched. BatchNorm running
statistics of every model live in `batch_stats`.
"""

import dataclasses
import functools
from typing import Any, Callable, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from fers_jax import parallel

Path = Tuple[str, ...]


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes.

    Attributes:
      step: steps taken so far (int32 scalar).
      params: the trainable parameters.
      frozen: the frozen parameters (never updated, not in the optimiser).
      batch_stats: BatchNorm running statistics of all models.
      opt_state: Adam's state, for `params` only.
    """
    step: jax.Array
    params: Any
    frozen: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict:
        """The full Flax variables {'params', 'batch_stats'}."""
        return {"params": merge(self.params, self.frozen),
                "batch_stats": self.batch_stats}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def partition(params, trainable: Callable[[Path], bool]):
    """Splits a nested parameter dict into (trainable, frozen) nested dicts.

    `trainable` is called with the path of module names to every leaf
    (e.g. ('encoder', 'layer1_0', 'conv1', 'kernel')).
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    train = {k: v for k, v in flat.items() if trainable(k)}
    frozen = {k: v for k, v in flat.items() if not trainable(k)}
    return (flax.traverse_util.unflatten_dict(train),
            flax.traverse_util.unflatten_dict(frozen))


def merge(*trees) -> dict:
    """The union of nested dicts with disjoint leaves (undoes `partition`)."""
    flat = {}
    for tree in trees:
        flat.update(flax.traverse_util.flatten_dict(tree))
    return flax.traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class AdamConfig:
    """The reference's optimiser: torch.optim.Adam(lr, betas=(b1, b2), eps).

    optax.adam divides by sqrt(v_hat) + eps, with eps outside the square
    root, as torch does; no weight decay, no schedule.
    """
    learning_rate: float = 0.005
    b1: float = 0.5
    b2: float = 0.999
    eps: float = 1e-8

    def build(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2,
                          eps=self.eps)


def create_train_state(variables, trainable: Callable[[Path], bool],
                       tx: optax.GradientTransformation) -> TrainState:
    """Step 0 from full Flax variables {'params', 'batch_stats'}."""
    params, frozen = partition(variables["params"], trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=frozen,
                      batch_stats=dict(variables.get("batch_stats", {})),
                      opt_state=tx.init(params))


def train_step(loss_fn, tx, state: TrainState, batch):
    """One optimiser step; pure.

    Args:
      loss_fn: loss_fn(params, frozen, batch_stats, batch) ->
        (loss, (terms, new_batch_stats)), differentiated w.r.t. params only.
      tx: the optax optimiser.
      state: the TrainState.
      batch: (N, H, W, B) inputs.

    Returns:
      (new state, measurements): the loss, every term, the global gradient
      norm and the norm of the trainable parameters the loss was taken at.
      A non-finite loss or gradient leaves the state as it was (the loop
      then stops), so the last good state is never overwritten.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, batch_stats)), grads = grad_fn(
        state.params, state.frozen, state.batch_stats, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    measurements = {"loss": loss, **terms, "grad_norm": grad_norm,
                    "param_norm": optax.tree.norm(state.params)}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map,
                             lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=jnp.where(finite, state.step + 1, state.step),
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state))
    return new_state, measurements


def jit_train_step(task, optimizer: AdamConfig, mesh=None):
    """`train_step(state, batch) -> (state, measurements)` for a stage task,
    jitted once per (task, optimizer, mesh), donating the old state's buffers.

    With a `mesh` (fers_jax.parallel.make_mesh) the step is one computation
    over its devices: the state replicated, the batch split over 'data'.
    """
    return _jit_train_step(task, optimizer, mesh)


@functools.lru_cache(maxsize=None)
def _jit_train_step(task, optimizer, mesh):
    # Cached on the (hashable, frozen) task and optimiser records, so every
    # run of the same configuration in a process shares one compilation.
    shardings = {} if mesh is None else parallel.step_shardings(mesh)
    return jax.jit(functools.partial(train_step, task.loss_fn, optimizer.build()),
                   donate_argnums=0, **shardings)


@functools.lru_cache(maxsize=None)
def jit_init(model):
    """`jax.jit(model.init)`, one compilation per (hashable) Flax module."""
    return jax.jit(model.init)


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# --- Seeds as an axis: K replicas, one jitted step (issue 10) ---------------------

def stack_states(states) -> TrainState:
    """K TrainStates of one structure -> one whose leaves have a leading K axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(stacked: TrainState, k: int) -> TrainState:
    """Replica k of a stacked TrainState (a copy: the step donates `stacked`)."""
    return jax.tree.map(lambda x: x[k], stacked)


SEED_AXIS = ("auto", "vmap", "map", "unroll")


def jit_train_step_seeds(task, optimizer: AdamConfig, mesh=None, axis: str = "auto"):
    """`step(stacked state, stacked batch) -> (stacked state, measurements)`:
    `train_step` over axis 0 of the state and of the batch (K, N, H, W, B),
    so K replicas (seeds) train in one jitted computation; each replica's
    measurements come back with a leading K axis. With a `mesh`, the state
    is replicated and each replica's batch split over 'data'.

    `axis`: 'vmap' (one batched computation: every conv of K kernels becomes
    one grouped conv), 'map' (a lax.map over the replicas inside the one
    program), 'unroll' (the K one-seed steps written out in the one
    program: K times the compile, each replica's ops as in a one-seed step)
    or 'auto': 'unroll' on CPU, 'vmap' elsewhere (chosen when the step is
    lowered, lax.platform_dependent). On 2 CPU cores at K=4
    (benchmarks/results/train_seeds_vm.json) unroll took 0.93x the time of
    4 one-seed steps, map 1.65x (XLA:CPU's loop body runs its ops slower
    than the same ops at top level), vmap 2.9x (grouped convolutions).
    """
    if axis not in SEED_AXIS:
        raise ValueError(f"axis must be one of {SEED_AXIS}, got {axis!r}")
    return _jit_train_step_seeds(task, optimizer, mesh, axis)


@functools.lru_cache(maxsize=None)
def _jit_train_step_seeds(task, optimizer, mesh, axis):
    shardings = {} if mesh is None else parallel.seed_step_shardings(mesh)
    one = functools.partial(train_step, task.loss_fn, optimizer.build())
    vmapped = jax.vmap(one)

    def mapped(state, batch):
        return jax.lax.map(lambda sb: one(*sb), (state, batch))

    def unrolled(state, batch):
        k = jax.tree.leaves(batch)[0].shape[0]   # static: one step per replica
        outs = [one(*jax.tree.map(lambda x: x[i], (state, batch)))
                for i in range(k)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    if axis == "auto":
        def step(state, batch):
            return jax.lax.platform_dependent(state, batch, cpu=unrolled,
                                              default=vmapped)
    else:
        step = {"vmap": vmapped, "map": mapped, "unroll": unrolled}[axis]
    return jax.jit(step, donate_argnums=0, **shardings)
