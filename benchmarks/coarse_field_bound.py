"""What a coarse spa_f could add, with no training: hand-made fields of the
kind LightSPP can output, on the validation scenes (issue 10).

spa_f is a pixelwise function of the trunk's features average-pooled to
1x1, 2x2 and 4x4 and resized bilinearly to (H, W) (SPEC 3.3), and the trunk
sees the cube only through Conv2RGB's 3 channels. So a student can at most
shift whole regions. The one such shift with a known use in detection is
removing the background's slow variation (RX on a detrended cube acts
more like a local RX). This script scores FERS with spa_f set to that
field, -alpha * L(z), where L is LightSPP's own pool-and-resize (levels
1, 2, 4 summed, or the 4x4 level alone) and z the cube the field is added
to (x at product fusion, x + spe_f at sum fusion), either all of z or only
its projection on its 3 leading principal components (what 3 false-colour
channels could carry). Constants added to make the field non-negative, as
LightSPP's last ReLU needs, do not change RX (its min-max scaling is over
all bands at once and its Mahalanobis distance ignores a shift).

These are fields a LightSPP head could in principle express, not a bound
over all of them. So, second, an oracle: per scene, the free field
sum over levels s of resize(P_s), P_s an s x s x B array (21 B numbers:
the linear part of LightSPP's output, before its pixelwise fuse2, ReLUs
and channel attention), optimised by Adam to maximise a smooth AUC of the
FERS map against that scene's own mask, the answer key no student has.
A local optimum, so not a proof; but if even this stays near the zero
student, a trained student on this architecture has little room.

  python benchmarks/coarse_field_bound.py --out benchmarks/results/coarse_field_bound.json
"""

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fers_jax import (checkpoints, detectors, inference,  # noqa: E402
                      input_pipeline, losses, metrics)
from fers_jax.models import layers  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = SHARED / "reference" / "checkpoints" / "saved_models"


def smooth(z, levels):
    """LightSPP's pool-and-resize of z (1, H, W, B), levels summed / count."""
    shape = z.shape[1:3]
    return sum(layers.resize_bilinear(layers.adaptive_avg_pool(z, s), shape)
               for s in levels) / len(levels)


def leading_components(z, k: int = 3):
    """z projected on its k leading principal components (mean kept)."""
    flat = z.reshape(-1, z.shape[-1])
    mean = flat.mean(0)
    _, _, vt = jnp.linalg.svd(flat - mean, full_matrices=False)
    return ((flat - mean) @ vt[:k].T @ vt[:k] + mean).reshape(z.shape)


def fields(z):
    """Named coarse fields (before the sign and the scale alpha)."""
    out = {}
    for name, levels in (("L124", (1, 2, 4)), ("L4", (4,))):
        out[name] = smooth(z, levels)
        out[f"{name}_pc3"] = smooth(leading_components(z), levels)
    return out


def _rx(z):
    """RX of one cube (H, W, B), differentiable (losses.patch_rx: a tiny
    ridge in place of the pseudo-inverse's cutoff), flattened."""
    return losses.patch_rx(z[None], ridge=1e-10)[0]


def oracle_field(x, spe_f, gt, fusion, steps, lr=1e-3, tau=0.01, seed=0):
    """The pooled cells (levels 1, 2, 4) whose resized sum, added as spa_f,
    maximises a smooth AUC (mean sigmoid of anomaly-minus-background score
    gaps over `tau`, maps min-max scaled) on this scene's mask."""
    x, spe_f = x[0].astype(jnp.float64), spe_f[0].astype(jnp.float64)
    h, w, b = x.shape
    z = x if fusion == "product" else x + spe_f
    unit = jnp.std(z)  # the field's parameters in the scale of what it shifts
    flat = np.asarray(gt).reshape(-1) == 1
    rng = np.random.default_rng(seed)
    anomalies = np.flatnonzero(flat)
    background = rng.choice(np.flatnonzero(~flat), min(4000, (~flat).sum()), False)
    spe_map = detectors.minmax(_rx(x + spe_f))

    def field(cells):
        return unit * sum(layers.resize_bilinear(c[None], (h, w))[0] for c in cells)

    def fers(cells):
        if fusion == "sum":
            return _rx(z + field(cells))
        return detectors.minmax(_rx(x + field(cells))) * spe_map

    def loss(cells):
        m = detectors.minmax(fers(cells))
        gaps = m[background][:, None] - m[anomalies][None, :]
        return jnp.mean(jax.nn.sigmoid(gaps / tau))

    cells = [jnp.zeros((s, s, b), jnp.float64) for s in (1, 2, 4)]
    opt = optax.adam(lr)
    state = opt.init(cells)

    @jax.jit
    def step(cells, state):
        value, grads = jax.value_and_grad(loss)(cells)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(cells, updates), state, value

    for _ in range(steps):
        cells, state, _ = step(cells, state)
    return field(cells)[None]


def score_scene(x, spe_f, gt, name, fusion, alphas, oracle_steps=0):
    """AUCs of FERD, the zero student and every field at every alpha."""
    auc = lambda m: metrics.roc_auc(np.asarray(m)[0], gt, name)
    row = {"ferd": auc(inference.ferd_map(x, spe_f)),
           "zero": auc(inference.fers_map(x, spe_f, jnp.zeros_like(spe_f), fusion))}
    # The field is added to x alone at product fusion (RX(x + spa_f) is the
    # student's map there), to x + spe_f at sum fusion.
    z = x if fusion == "product" else x + spe_f
    for fname, field in fields(z).items():
        for a in alphas:
            row[f"{fname}_a{a:g}"] = auc(inference.fers_map(
                x, spe_f, -a * field, fusion))
    if oracle_steps:
        with jax.enable_x64(True):
            best = oracle_field(x, spe_f, gt, fusion, oracle_steps)
        row["oracle"] = auc(inference.fers_map(
            x, spe_f, best.astype(jnp.float32), fusion))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bands", type=int, nargs="+", default=[50, 100])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--oracle-steps", type=int, default=300,
                   help="Adam steps of the oracle field (0: none)")
    p.add_argument("--scenes", default=str(SHARED / "data" / "scenes"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = {"uptime": subprocess.run(["uptime"], capture_output=True,
                                       text=True).stdout.strip(),
              "alphas": args.alphas, "oracle_steps": args.oracle_steps,
              "by_bands": {}}
    for bands in args.bands:
        fusion = inference.resolve_fusion("auto", bands)
        teacher, t_vars = checkpoints.load_teacher(CHECKPOINTS / f"{bands}bands", bands)
        spe = jax.jit(lambda v, x: teacher.apply(v, x)["spe_f"])
        rows = {}
        for scene in input_pipeline.load_eval_scenes([args.scenes], bands=bands):
            x = jnp.asarray(scene.x)[None]
            rows[scene.name] = score_scene(x, spe(t_vars, x), scene.gt,
                                           scene.name, fusion, args.alphas,
                                           args.oracle_steps)
        mean = {k: float(np.mean([r[k] for r in rows.values()]))
                for k in next(iter(rows.values()))}
        result["by_bands"][str(bands)] = {"fusion": fusion, "per_scene": rows,
                                          "mean": mean}
        print(f"{bands} bands ({fusion}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in mean.items()), flush=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
