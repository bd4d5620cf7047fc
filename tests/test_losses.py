"""Tests of fers_jax.losses: parity with the reference's golden values, and
properties a wrong loss would break.

Golden arrays are NCHW; the package is NHWC, hence `nhwc` below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fers_jax import losses
from fers_jax.errors import InputError

RTOL = 1e-4


def nhwc(a):
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def assert_grad_close(got, want):
    # Elementwise relative error is meaningless for entries that cancel to
    # ~0, so the tolerance is relative to the largest entry.
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL,
                               atol=RTOL * np.abs(want).max())


@pytest.fixture(scope="module")
def stage2(golden):
    """The golden file and, computed once, jitted (total, terms), grads."""
    g = golden("losses_stage2.npz")
    a = {k: nhwc(g[k]) for k in ("spe_f", "spa_f", "data", "rec")}

    def total(spa_f, rec):
        return losses.stage2_loss(a["spe_f"], spa_f, rec, a["data"])

    grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    return g, grad_fn(a["spa_f"], a["rec"])


@pytest.fixture(scope="module")
def stage1(golden):
    g = golden("stage1_tiny_20bands.npz")
    outputs = {k: nhwc(v) for k, v in g.items() if v.ndim == 4}
    return g, outputs


def random_nhwc(seed, shape=(2, 12, 10, 6)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                       jnp.float32)


# --- parity with the reference ----------------------------------------------

@pytest.mark.parametrize("term,key", [
    ("cc", "cross_cov"), ("cos", "cos_sim"), ("var", "var_preserve"),
    ("mse", "mse"), ("ssim", "ssim5")])
def test_stage2_terms_match_golden(stage2, term, key):
    g, ((_, terms), _) = stage2
    np.testing.assert_allclose(float(terms[term]), g[key], rtol=RTOL)


def test_stage2_total_and_gradients_match_golden(stage2):
    g, ((total, _), (g_spa, g_rec)) = stage2
    np.testing.assert_allclose(float(total), g["total"], rtol=RTOL)
    assert_grad_close(g_spa, nhwc(g["grad_spa_f"]))
    assert_grad_close(g_rec, nhwc(g["grad_rec"]))


def test_stage1_terms_match_golden(stage1):
    g, out = stage1
    total, terms = losses.stage1_loss(out, out["x"])
    for k in ("bce", "mse", "cos"):
        np.testing.assert_allclose(float(terms[k]), g[k], rtol=RTOL)
    np.testing.assert_allclose(float(total), g["loss"], rtol=RTOL)


# --- cross-covariance -------------------------------------------------------

def correlated_channels(seed, shape=(2, 16, 16, 8)):
    """Channels that share a common component, so they correlate."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape[:-1] + (1,))
    return jnp.asarray(base + 0.5 * rng.normal(size=shape), jnp.float32)


def test_cross_covariance_large_with_itself_small_with_permutation():
    a = correlated_channels(0)
    n, h, w, c = a.shape
    perm = np.random.default_rng(1).permutation(n * h * w)
    shuffled = a.reshape(-1, c)[perm].reshape(a.shape)
    # With itself every diagonal entry is ~1 (and here the off-diagonals
    # too); pixel-shuffled copies are independent: ~C*C/(N*H*W).
    assert float(losses.cross_covariance(a, a)) > c
    assert float(losses.cross_covariance(a, shuffled)) < 0.5


def test_cross_covariance_invariant_to_per_channel_affine():
    a, b = correlated_channels(2), correlated_channels(3)
    scale = jnp.asarray([3.0, -0.5, 10.0, 1.0, -2.0, 0.1, 7.0, 1.5])
    shift = jnp.arange(8.0) - 4.0
    np.testing.assert_allclose(
        float(losses.cross_covariance(a * scale + shift, b)),
        float(losses.cross_covariance(a, b)), rtol=1e-4)


def test_cross_covariance_allows_different_channel_counts():
    a, b = random_nhwc(4, (2, 8, 8, 5)), random_nhwc(5, (2, 8, 8, 3))
    assert losses.cross_covariance(a, b).shape == ()
    with pytest.raises(InputError):
        losses.cross_covariance(a, random_nhwc(6, (2, 8, 7, 3)))


# --- cosine ------------------------------------------------------------------

def test_cosine_range_ends():
    a = random_nhwc(7)
    np.testing.assert_allclose(float(losses.cosine(a, a)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(losses.cosine(a, -a)), 0.0, atol=1e-6)


def test_cosine_clamps_each_norm_like_torch():
    # Torch: a/max(|a|, eps) . b/max(|b|, eps) = 4e-9 / (5 * 1e-8) = 0.08;
    # clamping the product of the norms instead would give 0.4.
    a = jnp.asarray([3.0, 4.0]).reshape(1, 1, 1, 2)
    b = jnp.asarray([0.0, 1e-9]).reshape(1, 1, 1, 2)
    np.testing.assert_allclose(float(losses.cosine(a, b)), 1.08, rtol=1e-6)


def test_cosine_gradient_finite_at_zero_vector():
    a = random_nhwc(8)
    b = a.at[0, 0, 0].set(0.0)
    grad = jax.grad(lambda b: losses.cosine(a, b))(b)
    assert np.isfinite(np.asarray(grad)).all()


# --- variance preserving -----------------------------------------------------

def test_variance_preserving_hinge_and_l1():
    zeros = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_allclose(float(losses.variance_preserving(zeros)), 1.0)
    # Variance well above 1: the hinge is off and only mean|x| remains.
    wide = 5.0 * random_nhwc(9)
    np.testing.assert_allclose(float(losses.variance_preserving(wide)),
                               float(jnp.mean(jnp.abs(wide))), rtol=1e-6)


# --- SSIM --------------------------------------------------------------------

def test_ssim_loss_of_identical_images_is_zero():
    a = random_nhwc(10)
    assert abs(float(losses.ssim_loss(a, a))) < 1e-6


def test_ssim_map_shape_range_and_symmetry():
    a, b = random_nhwc(11), random_nhwc(12)
    assert losses.ssim(a, b).shape == a.shape
    value = float(losses.ssim_loss(a, b))
    assert 0.0 < value <= 1.0
    np.testing.assert_allclose(value, float(losses.ssim_loss(b, a)),
                               rtol=1e-6)


def test_gaussian_filter_keeps_constants_and_shape():
    # Normalised window + reflect borders: a constant stays exactly itself,
    # edges included (zero padding would darken the border).
    window = losses._gaussian_window(5, 1.5)
    np.testing.assert_allclose(window.sum(), 1.0)
    np.testing.assert_allclose(window, window[::-1])
    const = jnp.full((1, 7, 9, 2), 0.3)
    out = np.asarray(losses._gaussian_filter(const, window))
    assert out.shape == (1, 2, 7, 9)  # channel-major, the contraction's order
    np.testing.assert_allclose(out, 0.3, rtol=1e-6)


def test_ssim_rejects_images_smaller_than_window():
    a = jnp.zeros((1, 2, 8, 1))
    with pytest.raises(InputError):
        losses.ssim_loss(a, a)


# --- stage 1 -----------------------------------------------------------------

def test_distillation_cosine_identical_and_opposite():
    enc = [random_nhwc(s, (2, 8 >> i, 8 >> i, 4 << i)) for i, s in
           enumerate((13, 14, 15))]
    np.testing.assert_allclose(
        float(losses.distillation_cosine(enc, enc)), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        float(losses.distillation_cosine(enc, [-e for e in enc])), 6.0,
        rtol=1e-6)
    with pytest.raises(InputError):
        losses.distillation_cosine(enc, enc[:2])


def test_bce_with_logits_matches_definition():
    z = jnp.linspace(-30.0, 30.0, 61)
    want = -jnp.log(jax.nn.sigmoid(-z))   # -log(1 - sigmoid(z)), target 0
    np.testing.assert_allclose(float(losses.bce_with_logits(z, 0.0)),
                               float(jnp.mean(want)), rtol=1e-5)
    np.testing.assert_allclose(float(losses.bce_with_logits(z, 1.0)),
                               float(jnp.mean(-jnp.log(jax.nn.sigmoid(z)))),
                               rtol=1e-5)


def tiny_stage1_outputs(prob):
    enc = {f"enc_f{i}": random_nhwc(20 + i, (2, 4, 4, 3)) for i in (1, 2, 3)}
    dec = {f"dec_f{i}": random_nhwc(30 + i, (2, 4, 4, 3)) for i in (1, 2, 3)}
    return {**enc, **dec, "recon": random_nhwc(40, (2, 6, 6, 5)),
            "prob": prob}


def test_stage1_bce_quirk_and_logits_option():
    logits = random_nhwc(41, (2, 6, 6, 1))
    out = tiny_stage1_outputs(jax.nn.sigmoid(logits))
    x = random_nhwc(42, (2, 6, 6, 5))
    _, quirk = losses.stage1_loss(out, x)
    np.testing.assert_allclose(
        float(quirk["bce"]),
        float(jnp.mean(jax.nn.softplus(jax.nn.sigmoid(logits)))), rtol=1e-6)
    with pytest.raises(InputError):
        losses.stage1_loss(out, x, bce_on_logits=True)
    _, proper = losses.stage1_loss({**out, "logits": logits}, x,
                                   bce_on_logits=True)
    np.testing.assert_allclose(
        float(proper["bce"]), float(jnp.mean(jax.nn.softplus(logits))),
        rtol=1e-6)
    # Branch off: prob is 0 and the quirk's BCE is log 2.
    _, off = losses.stage1_loss(tiny_stage1_outputs(0.0), x)
    np.testing.assert_allclose(float(off["bce"]), np.log(2.0), rtol=1e-6)


# --- both stages -------------------------------------------------------------

def test_weights_are_configurable():
    spe, spa, rec, x = (random_nhwc(s) for s in (50, 51, 52, 53))
    w = losses.Stage2Weights(cc=0.0, cos=1.0, var=0.0, mse=2.0, ssim=0.0)
    total, terms = losses.stage2_loss(spe, spa, rec, x, weights=w)
    np.testing.assert_allclose(float(total),
                               float(terms["cos"] + 2.0 * terms["mse"]),
                               rtol=1e-6)
    out = tiny_stage1_outputs(jnp.full((2, 6, 6, 1), 0.5))
    total, terms = losses.stage1_loss(
        out, random_nhwc(54, (2, 6, 6, 5)),
        weights=losses.Stage1Weights(bce=0.0, mse=0.0, cos=3.0))
    np.testing.assert_allclose(float(total), 3.0 * float(terms["cos"]),
                               rtol=1e-6)


def test_jit_matches_eager_and_shapes_are_checked():
    spe, spa, rec, x = (random_nhwc(s) for s in (60, 61, 62, 63))
    eager, eager_terms = losses.stage2_loss(spe, spa, rec, x)
    jitted, jit_terms = jax.jit(losses.stage2_loss)(spe, spa, rec, x)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-5)
    for k in eager_terms:
        np.testing.assert_allclose(float(jit_terms[k]),
                                   float(eager_terms[k]), rtol=1e-5)
    out = tiny_stage1_outputs(jnp.full((2, 6, 6, 1), 0.5))
    x1 = random_nhwc(64, (2, 6, 6, 5))
    np.testing.assert_allclose(
        float(jax.jit(losses.stage1_loss)(out, x1)[0]),
        float(losses.stage1_loss(out, x1)[0]), rtol=1e-5)
    with pytest.raises(InputError):
        losses.stage2_loss(spe, spa, rec[:, :-1], x)


def test_l1_weight_splits_the_variance_term():
    spe, spa, rec, x = (random_nhwc(s) for s in (60, 61, 62, 63))
    ref_total, ref = losses.stage2_loss(spe, spa, rec, x)
    np.testing.assert_allclose(float(ref["l1"]), float(jnp.mean(jnp.abs(spa))),
                               rtol=1e-6)
    # l1 = var is the reference's single term; l1 = 0 drops the L1 part only.
    same, _ = losses.stage2_loss(spe, spa, rec, x, losses.Stage2Weights(l1=0.1))
    np.testing.assert_allclose(float(same), float(ref_total), rtol=1e-6)
    no_l1, _ = losses.stage2_loss(spe, spa, rec, x, losses.Stage2Weights(l1=0.0))
    np.testing.assert_allclose(float(no_l1), float(ref_total - 0.1 * ref["l1"]),
                               rtol=1e-6)


def test_loss_weights_parse():
    w = losses.Stage2Weights.parse("var=0.5, l1=0")
    assert (w.var, w.l1, w.cc) == (0.5, 0.0, 1.0)
    assert losses.Stage2Weights.parse("") == losses.Stage2Weights()
    for bad in ("var", "foo=1", "var=x", "cc=-1"):
        with pytest.raises(InputError, match="--loss-weights"):
            losses.Stage2Weights.parse(bad)


# --- the false-alarm ablation term (not the reference's) -----------------------

def test_false_alarm_measures_the_maps_peaks():
    x, spe = random_nhwc(70, (2, 12, 10, 6)), random_nhwc(71, (2, 12, 10, 6))
    zero = jnp.zeros_like(x)
    for fusion in ("sum", "product"):
        base = float(losses.false_alarm(x, spe, zero, fusion))
        assert base >= 1.0, fusion  # the top share's mean over the mean
        # One outlying pixel in every image of what the student's map sees.
        peaked = float(losses.false_alarm(x.at[:, 3, 4].add(25.0), spe, zero,
                                          fusion))
        assert peaked > 1.5 * base, (fusion, peaked, base)
    # RX per image: the map of image 0 ignores image 1.
    one = losses.patch_rx(x)[0]
    np.testing.assert_allclose(losses.patch_rx(x.at[1].multiply(3.0))[0], one,
                               rtol=1e-5)
    # Against a plain NumPy Mahalanobis distance (the ridge is negligible).
    c = np.asarray(x[0], np.float64).reshape(-1, 6)
    c -= c.mean(0)
    ref = np.einsum("pi,ij,pj->p", c, np.linalg.inv(c.T @ c / (len(c) - 1)), c)
    np.testing.assert_allclose(one, ref, rtol=1e-3)


def test_false_alarm_weight_and_gradient():
    spe, spa, rec, x = (random_nhwc(s) for s in (60, 61, 62, 63))
    ref_total, ref = losses.stage2_loss(spe, spa, rec, x)
    assert "fa" not in ref  # weight 0: not computed, the reference's loss
    for fusion in ("sum", "product"):
        total, terms = losses.stage2_loss(spe, spa, rec, x,
                                          losses.Stage2Weights(fa=0.5), fusion)
        np.testing.assert_allclose(float(total - ref_total),
                                   0.5 * float(terms["fa"]), rtol=1e-4)
        grad = jax.grad(lambda s: losses.false_alarm(x, spe, s, fusion))(spa)
        assert np.isfinite(grad).all() and float(jnp.abs(grad).max()) > 0, fusion
    assert losses.Stage2Weights.parse("fa=0.1").fa == 0.1
