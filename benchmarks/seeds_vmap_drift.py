"""Drift of a vmapped (--seeds) replica from its one-seed step, tiny stage 2
(issue 10): python benchmarks/seeds_vmap_drift.py > benchmarks/results/seeds_vmap_drift.txt"""
import sys; sys.path.insert(0, "tests"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from conftest import BACKGROUND, GOLDEN
from fers_jax import checkpoints, input_pipeline
from fers_jax.training import stage2, state
model, tv = checkpoints.load_teacher(GOLDEN / "stage1_tiny_random_20bands.pt", 20)
task = stage2.task(model.config, "tiny", trunk_bn="running")
opt = state.AdamConfig()
def mk(seed):
    v = task.init_variables(jax.random.key(seed), (1, 24, 24, 20), tv)
    return state.create_train_state(v, task.trainable, opt.build())
src = input_pipeline.scene_source([BACKGROUND], size=24)
with input_pipeline.batches(src, 4, seed=1, bands=20) as b:
    xs = [np.asarray(next(b)) for _ in range(8)]
single = state.jit_train_step(task, opt)
multi = state.jit_train_step_seeds(task, opt)
a, b_ = mk(3), mk(4)
st = state.stack_states([mk(3), mk(4)])
for i, x in enumerate(xs):
    a, ma = single(a, jnp.asarray(x)); b_, mb = single(b_, jnp.asarray(x))
    st, mm = multi(st, jnp.stack([x, x]))
    for k, (s1, m1) in enumerate(((a, ma), (b_, mb))):
        d = jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q))), s1.params, state.unstack_state(st, k).params)
        print(i + 1, k, "loss", float(m1["loss"]), float(mm["loss"][k]), "max param diff", max(jax.tree.leaves(d)), flush=True)
