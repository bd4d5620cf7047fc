"""Device meshes: the batch split over the devices, the rest replicated.

Training and evaluation both run as one global computation (`jax.jit`) over
a 1-D mesh of devices with the axis 'data' (`make_mesh`). Batches are
sharded along their first axis, parameters and train state replicated on
every device (`replicate`); XLA's SPMD partitioner inserts whatever
collectives the program needs. The models carry no axis names; nothing is
pmapped.

One device is the mesh of size 1: the same code, nothing to switch off
(`one_device_mesh`). There is no unsharded fast path: on one CPU device
the RX, FERD and FERS maps through a 1-device mesh equal those of plain
NumPy inputs bit for bit, FERD/FERS batches take the same time, and RX
pays a constant ~0.5 ms a batch (the device_put here, and the input's
finiteness check running as a JAX op rather than in NumPy): ~20% of a
batch of 4 32x32x50 images, ~2% of 4 100x100x50, within run-to-run noise.

Training (fers_jax.training): each batch is sharded (`shard_batch`; the
batch size must divide by the mesh size, `check_batch_size`) and the train
state (trainable and frozen parameters, BatchNorm statistics, Adam's
moments) replicated; the step's `jax.jit` shardings are `step_shardings`.
The all-reduce of the gradients and of BatchNorm's batch mean and
variance make the statistics those of the global batch, so N devices
compute what one device computes, up to the order of the reductions.

Evaluation (fers_jax.evaluation, fers_jax.inference, the training loop's
validation): a batch of any size is padded with copies of its last image
to a multiple of the mesh size and sharded (`shard_padded`, which returns
the real count N); results come back to NumPy with `to_host` and [N:] is
dropped.

Many hosts (multi-controller JAX): every host runs the same command and
calls `jax.distributed.initialize()` before anything else touches JAX
(`initialize_distributed`, `train.py --distributed`). `jax.devices()` is
then every host's devices, and the mesh spans them all. Each host loads
only its part of every global training batch (`process_part`: the rows of
the batch its own devices hold) and `shard_batch` assembles the global
array from the parts (`jax.make_array_from_process_local_data`); on one
host the part is the whole batch. `to_host` gathers a sharded result on
every host.
"""

import functools
import os
from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fers_jax.errors import InputError

DATA_AXIS = "data"


def initialize_distributed(**kwargs):
    """Joins this process to a multi-host run: `jax.distributed.initialize`.

    Must come before any other use of JAX in the process. The coordinator's
    address, the number of processes and this process's index come from the
    cluster (Slurm, Open MPI, Cloud TPU, GKE: JAX detects them), else from
    the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; `kwargs` (coordinator_address,
    num_processes, process_id, local_device_ids) override both.
    """
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"),
                     ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh with the axis 'data' over `devices` (default: all of
    them, every host's, in `jax.devices()` order)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise InputError("a device mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def one_device_mesh() -> Mesh:
    """The mesh of size 1 on this process's first device: what runs where
    no mesh is given, or where sharding is turned off."""
    return make_mesh(jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The first (batch) axis split evenly over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def step_shardings(mesh: Mesh) -> dict:
    """`jax.jit` shardings of `step(state, batch) -> (state, measurements)`:
    the state and measurements replicated, the batch sharded."""
    return {"in_shardings": (replicated(mesh), batch_sharded(mesh)),
            "out_shardings": (replicated(mesh), replicated(mesh))}


def seed_step_shardings(mesh: Mesh) -> dict:
    """`step_shardings` for K stacked replicas (training.state's seeds axis):
    batches (K, N, ...) split over 'data' along N, the rest replicated."""
    seeds_batch = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    return {"in_shardings": (replicated(mesh), seeds_batch),
            "out_shardings": (replicated(mesh), replicated(mesh))}


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Raises InputError unless every device gets an equal part of the
    batch; returns the images per device."""
    if batch_size % mesh.size:
        raise InputError(f"the batch size ({batch_size}) must be divisible by "
                         f"the number of devices ({mesh.size}): every device "
                         f"takes an equal part of each batch")
    return batch_size // mesh.size


def process_part(batch_size: int, mesh: Mesh) -> Tuple[int, int]:
    """Which part of every global batch this process loads: (index, count),
    the rows [index * b, (index + 1) * b) with b = batch_size // count.

    (0, 1) on one host. The rows are those that this process's devices hold
    under `batch_sharded(mesh)`.
    """
    check_batch_size(batch_size, mesh)
    indices = batch_sharded(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise InputError(f"this process's devices hold the rows {rows} of a "
                         f"batch of {batch_size}, not one block: order the "
                         f"mesh's devices by process")
    start, stop = rows[0][0], rows[-1][1]
    return start // (stop - start), batch_size // (stop - start)


@functools.lru_cache(maxsize=None)
def _processes(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def shard_batch(local_batch, mesh: Mesh):
    """The global batch, sharded over the 'data' axis, from this process's
    part of it (`process_part`; on one host the whole batch). A batch may
    be an array or a pytree of arrays sharing their first axis."""
    def put(x):
        x = np.asarray(x)
        check_batch_size(x.shape[0] * _processes(mesh), mesh)
        return jax.make_array_from_process_local_data(batch_sharded(mesh), x)
    return jax.tree.map(put, local_batch)


def replicate(tree, mesh: Mesh):
    """Every array of `tree` whole on every device of the mesh.

    On many hosts each passes its own copy, which must be the same
    everywhere (jax.device_put checks it).
    """
    sharding = replicated(mesh)

    def put(x):
        if (isinstance(x, jax.Array) and x.is_fully_addressable
                and not sharding.is_fully_addressable):
            x = np.asarray(x)  # a host-local array: its value, for every host
        return jax.device_put(x, sharding)
    return jax.tree.map(put, tree)


def shard_padded(x, mesh: Mesh) -> Tuple[jax.Array, int]:
    """(batch, N) for evaluation: the N images of `x` (every process passes
    all of them), padded with copies of the last to a multiple of the mesh
    size and sharded over the 'data' axis; results [N:] are padding."""
    x = np.asarray(x)
    n = x.shape[0]
    pad = -n % mesh.size
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return jax.device_put(x, batch_sharded(mesh)), n


def to_host(x) -> np.ndarray:
    """A NumPy copy of a whole global array, on every process."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                         or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
