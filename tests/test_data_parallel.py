"""Data-parallel training: two devices take the steps one device takes.

The comparison runs in a subprocess with two CPU devices
(--xla_force_host_platform_device_count must be set before jax is imported,
and this pytest process already has). Both stages' tiny tasks train a few
steps from the same variables on the same batches, once on a mesh of one
device and once on a mesh of two (batch split, state replicated).

Two choices keep the comparison down to the order of the reductions:
float64, since in float32 the stage-1 gradient of a random tiny network
moves by up to ~2% of its scale from merely permuting the batch on one
device (BatchNorm's backward cancels); and SGD with momentum instead of
Adam, whose division by sqrt(v) + 1e-8 turns rounding noise in
near-zero gradient elements into learning-rate-sized steps.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import BACKGROUND, GOLDEN, REPO
from fers_jax import input_pipeline
from fers_jax.errors import InputError
from fers_jax import parallel

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2")
    import dataclasses, json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from conftest import fake_variables
    from fers_jax import checkpoints, input_pipeline, parallel
    from fers_jax.errors import InputError
    from fers_jax.models import FeatureRestorationNet, SpatialStudent
    from fers_jax.training import stage1, stage2, state

    background, teacher_file = sys.argv[1:3]
    BANDS, RTOL, ATOL = 20, 1e-5, 1e-6

    @dataclasses.dataclass(frozen=True)
    class SGD:  # what jit_train_step needs of an optimiser record
        learning_rate: float = 0.05
        def build(self):
            return optax.sgd(self.learning_rate, momentum=0.9)

    def f64(tree):
        return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)

    source = input_pipeline.scene_source([background], size=24)
    with input_pipeline.batches(source, 4, seed=1, bands=BANDS) as b:
        batches = [next(b).astype(np.float64) for _ in range(3)]
    x0 = jnp.zeros((1, 24, 24, BANDS))
    task1 = stage1.task(BANDS, "tiny")
    teacher, tv = checkpoints.load_teacher(teacher_file, BANDS)
    task2 = stage2.task(teacher.config, "tiny")
    parts = {"teacher": tv,
             "student": fake_variables(SpatialStudent(task2.student), x0, seed=1),
             "frn": fake_variables(FeatureRestorationNet(task2.frn), x0, seed=2)}
    variables2 = {col: {k: dict(v[col]) for k, v in parts.items() if col in v}
                  for col in ("params", "batch_stats")}

    def sharding_of(a):
        return {"devices": len(a.sharding.device_set),
                "replicated": bool(a.sharding.is_fully_replicated),
                "shards": sorted(s.data.shape[0] if s.data.ndim else 0
                                 for s in a.addressable_shards)}

    def train(task, variables, mesh):
        st = parallel.replicate(state.create_train_state(
            variables, task.trainable, SGD().build()), mesh)
        step = state.jit_train_step(task, SGD(), mesh)
        losses = []
        for batch in batches:
            x = parallel.shard_batch(batch, mesh)
            st, measured = step(st, x)
            losses.append(float(measured["loss"]))
        shardings = {"batch": sharding_of(x),
                     "state": [sharding_of(a) for a in jax.tree.leaves(st)]}
        return jax.tree.map(np.asarray, st.to_dict()), losses, shardings

    def excess(a, b):
        # > 0 where assert_allclose(b, a, RTOL, ATOL) would fail
        return max((float(np.max(np.abs(x - y) - ATOL - RTOL * np.abs(x)))
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
                    if np.size(x)), default=-1.0)

    def max_abs(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x))

    one, two = (parallel.make_mesh(jax.devices()[:1]),
                parallel.make_mesh(jax.devices()))
    out = {"devices": len(jax.devices()), "part": parallel.process_part(4, two)}
    try:
        parallel.check_batch_size(3, two)
    except InputError as e:
        out["odd_batch"] = str(e)
    variables1 = fake_variables(task1.model, x0)
    for name, task, variables in (("stage1", task1, f64(variables1)),
                                  ("stage2", task2, f64(variables2))):
        (s1, l1, _), (s2, l2, sh) = (train(task, variables, one),
                                     train(task, variables, two))
        out[name] = {"losses": [l1, l2], "shardings": sh,
                     "excess": {k: excess(s1[k], s2[k]) for k in s1},
                     "max_abs": {k: max_abs(s1[k], s2[k]) for k in s1}}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    script = tmp_path_factory.mktemp("dp") / "data_parallel.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "tests")]))
    res = subprocess.run(
        [sys.executable, str(script), str(BACKGROUND),
         str(GOLDEN / "stage1_tiny_random_20bands.pt")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_devices_take_the_steps_of_one(two_devices, stage):
    out = two_devices[stage]
    one, two = out["losses"]
    np.testing.assert_allclose(two, one, rtol=1e-6)
    assert len(set(one)) == 3  # three different steps
    # params, frozen, batch_stats, opt_state, step: rtol 1e-5, atol 1e-6
    assert all(v <= 0 for v in out["excess"].values()), out["max_abs"]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_batch_is_split_and_state_replicated(two_devices, stage):
    assert two_devices["devices"] == 2
    shardings = two_devices[stage]["shardings"]
    assert shardings["batch"] == {"devices": 2, "replicated": False,
                                  "shards": [2, 2]}
    for leaf in shardings["state"]:
        assert leaf["devices"] == 2 and leaf["replicated"], leaf


def test_batch_size_must_divide_over_the_devices(two_devices):
    assert two_devices["part"] == [0, 1]  # one host loads whole batches
    assert "batch size (3) must be divisible by the number of devices (2)" \
        in two_devices["odd_batch"]


def test_one_device_is_a_mesh_of_one():
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert mesh.size == 1 and mesh.axis_names == (parallel.DATA_AXIS,)
    assert parallel.process_part(3, mesh) == (0, 1)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    xs = parallel.shard_batch(x, mesh)
    assert xs.sharding == parallel.batch_sharded(mesh)
    np.testing.assert_array_equal(xs, x)
    padded, n = parallel.shard_padded(x, mesh)
    assert n == 3 and padded.shape == (3, 2)


def test_batches_load_their_part():
    """Part i of k of every batch, and the position of the whole batch."""
    rng = np.random.default_rng(0)
    source = [rng.random((2, 2, 3), np.float32) for _ in range(12)]
    kwargs = dict(seed=3, bands=3, num_epochs=2)
    with input_pipeline.batches(source, 4, **kwargs) as whole:
        want = list(whole)
        want_state = whole.state
    for i in range(2):
        with input_pipeline.batches(source, 4, part=(i, 2), **kwargs) as part:
            got = list(part)
            assert part.state == want_state
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w[2 * i:2 * i + 2])
    with pytest.raises(InputError, match="part 0 of 3 of batches of 4"):
        input_pipeline.batches(source, 4, part=(0, 3), **kwargs)
