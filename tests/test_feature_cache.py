"""The frozen teacher's spe_f, computed once per training image.

The step fed cached spe_f equals the step that recomputes it (losses,
gradients, the new state); entries are keyed by the teacher and the
prepared image, so a changed teacher, band range or crop misses.
"""

import jax
import numpy as np
import pytest

from conftest import BACKGROUND, GOLDEN
from fers_jax import checkpoints, input_pipeline
from fers_jax.training import loop, stage2, state

BANDS = 20
STAGE1_PT = GOLDEN / "stage1_tiny_random_20bands.pt"


@pytest.fixture(scope="module")
def teacher():
    return checkpoints.load_teacher(STAGE1_PT, BANDS)


@pytest.fixture(scope="module")
def source():
    return input_pipeline.scene_source([BACKGROUND], size=24)


def images(source, idx, bands=BANDS, band_start=0):
    with input_pipeline.batches(source, 1, seed=0, bands=bands,
                                band_start=band_start) as b:
        return b.load_images(idx)


def stage2_state(teacher):
    model, tv = teacher
    task = stage2.task(model.config, "tiny")
    variables = task.init_variables(jax.random.key(0), (1, 24, 24, BANDS), tv)
    return task, state.create_train_state(variables, task.trainable,
                                          state.AdamConfig().build())


def test_cached_spe_f_gives_the_recomputing_steps_loss_and_gradients(
        teacher, source):
    task, st = stage2_state(teacher)
    x = images(source, [0, 3, 5, 7])
    (spe_f,) = task.frozen_features(st.variables(), chunk=4).values()
    cached = {"image": x, "spe_f": spe_f(x)}
    grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    (l_new, (t_new, bs_new)), g_new = grad(st.params, st.frozen,
                                           st.batch_stats, cached)
    (l_old, (t_old, bs_old)), g_old = grad(st.params, st.frozen,
                                           st.batch_stats, x)
    # The teacher alone computed, or fused into the step: float32 rounding
    # apart, the same (measured: bit-identical or within a few ulp).
    tol = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l_new, l_old, **tol)
    for k in t_old:
        np.testing.assert_allclose(t_new[k], t_old[k], err_msg=k, **tol)
    for tree_new, tree_old in ((g_new, g_old), (bs_new, bs_old)):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree_new)[0],
                                jax.tree.leaves(tree_old)):
            # Gradients of the tiny-size student's SE kernels are ~1e-6 of
            # the largest and sum thousands of float32 terms: 1e-4 of the
            # leaf's scale, not of each element.
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()),
                err_msg=jax.tree_util.keystr(path))
    step = state.jit_train_step(task, state.AdamConfig())
    _, m_new = step(st, cached)
    np.testing.assert_allclose(m_new["loss"], l_old, **tol)


def test_features_do_not_depend_on_the_batch_mates(teacher, source):
    """What resuming exactly needs: an image's entry is the same bits
    whichever images were computed with it."""
    model, tv = teacher
    task = stage2.task(model.config, "tiny")
    (cache,) = task.frozen_features({c: {"teacher": tv[c]} for c in tv},
                                    chunk=4).values()
    x = images(source, range(6))
    together = cache.compute(x)
    np.testing.assert_array_equal(cache.compute(x[[5, 0, 2]])[1], together[0])
    np.testing.assert_array_equal(cache.compute(x[3:4])[0], together[3])
    np.testing.assert_allclose(together[:2], jax.jit(task.teacher_features)(
        tv, x[:2]), rtol=1e-6, atol=1e-7)


def test_changed_teacher_band_range_or_crop_misses(teacher, source, tmp_path):
    model, tv = teacher
    task = stage2.task(model.config, "tiny")
    tvars = {c: {"teacher": tv[c]} for c in tv}

    def cache(variables):
        return task.frozen_features(variables, chunk=4, folder=tmp_path)["spe_f"]
    x = images(source, [1, 2])
    first = cache(tvars)
    want = first(x)
    assert (first.hits, first.misses) == (0, 2)
    again = cache(tvars)  # another run, the same teacher: read from disk
    np.testing.assert_array_equal(again(x), want)
    assert (again.hits, again.misses) == (2, 0)

    changed = jax.tree.map(np.array, tvars)
    leaf = jax.tree.leaves(changed["params"])[0]
    leaf.flat[0] += 1e-3
    other = cache(changed)
    assert not np.array_equal(other(x), want)
    assert (other.hits, other.misses) == (0, 2)

    for x_other in (images(source, [1, 2], band_start=1),   # band range
                    x[:, 1:23, 1:23]):                       # crop
        before = again.misses
        again(np.ascontiguousarray(x_other))
        assert again.misses == before + 2


def test_batches_carry_the_cached_features(teacher, source):
    task, st = stage2_state(teacher)
    features = task.frozen_features(st.variables(), chunk=4)
    plain = input_pipeline.batches(source, 4, seed=3, bands=BANDS, num_epochs=2)
    cached = input_pipeline.batches(source, 4, seed=3, bands=BANDS, num_epochs=2,
                                    features=features)
    with plain, cached:
        got = list(zip(plain, cached))
        assert cached.state == plain.state
    assert len(got) == 2 * plain.steps_per_epoch
    for x, batch in got:
        np.testing.assert_array_equal(batch["image"], x)
        np.testing.assert_array_equal(batch["spe_f"],
                                      features["spe_f"].compute(x))
    n = len(source) // 4 * 4
    # The second epoch reads what the first computed (other images than the
    # first epoch's may fall in it: the remainder is dropped per epoch).
    assert features["spe_f"].misses <= len(source)
    assert features["spe_f"].hits >= 2 * n - len(source)


def test_stage1_has_nothing_frozen_to_cache():
    """The encoder is frozen but sits behind the trainable ConvH."""
    from fers_jax.training import stage1
    assert loop.frozen_features(stage1.task(BANDS, "tiny"), None, None,
                                (0, 1)) == {}


def test_augmented_batches_turn_images_and_their_features(teacher, source):
    """--augment: each image is one of the square's 8 symmetries of the
    plain one, drawn per (seed, epoch, image), and its features are the
    teacher's of the turned image (not the turned features: the teacher's
    3x3 convs need not commute with the turn)."""
    task, st = stage2_state(teacher)
    features = task.frozen_features(st.variables(), chunk=4)
    plain = input_pipeline.batches(source, 4, seed=3, bands=BANDS, num_epochs=2)
    turned = input_pipeline.batches(source, 4, seed=3, bands=BANDS, num_epochs=2,
                                    features=features, augment=True)
    with plain, turned:
        got = list(zip(plain, turned))
        assert turned.state == plain.state
    seen = set()
    for step, (x, batch) in enumerate(got):
        epoch, s = divmod(step, plain.steps_per_epoch)
        idx = plain.order(epoch)[4 * s:4 * s + 4]
        for j, t in enumerate(turned.symmetries(epoch)[idx]):
            np.testing.assert_array_equal(batch["image"][j],
                                          input_pipeline.dihedral(x[j], t))
            seen.add(int(t))
        np.testing.assert_array_equal(batch["spe_f"],
                                      features["spe_f"].compute(batch["image"]))
    assert len(seen) > 2  # several symmetries drawn, not the identity alone
    # The 8 symmetries are distinct and 0 is the identity.
    x = got[0][0][0]
    flat = {input_pipeline.dihedral(x, t).tobytes()
            for t in range(input_pipeline.SYMMETRIES)}
    assert len(flat) == 8 and input_pipeline.dihedral(x, 0).tobytes() == x.tobytes()
