"""Where the stage-2 step spends its time: part by part, fers_jax against
torch (issue 12).

The stage-2 step (`bench_train.py epoch`: 32x32 patches, batch 16, 100
bands, trunk BN running) is slower in fers_jax than in PyTorch on quiet
CPU cores. This splits what the step computes once the teacher's spe_f is
given (fers_jax's cached step) into its parts, each forward + backward as
the step runs it, best of --repeats after a warm-up:

  student  Conv2RGB and LightSPP training, the ResNet-34 trunk frozen (eval-
           mode BatchNorm): forward + gradients of the trainable parameters
  frn      the feature restoration net in train mode: forward + gradients
           of its parameters and of its input
  loss     the stage-2 loss terms: forward + gradients w.r.t. spa_f, recon
  step     the whole cached step (student, FRN, loss, Adam): fers_jax's
           jitted `train_step`, torch's Stage2Step with spe_f given

  python benchmarks/bench_stage2_parts.py [--batch 16] [--repeats 5]
Writes benchmarks/results/train_stage2_parts_<host>.json.
"""

import argparse
import json
import pathlib
import socket
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402
from bench_stage1_parts import best_ms  # noqa: E402
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fers_jax import configs, losses  # noqa: E402
from fers_jax.models import FeatureRestorationNet, SpatialStudent  # noqa: E402

BANDS, PATCH = 100, 32
REPO = pathlib.Path(__file__).resolve().parents[1]


def jax_parts(x, spe_f, repeats):
    student = SpatialStudent(configs.student(BANDS))
    frn = FeatureRestorationNet(configs.frn(BANDS))
    sv = jax.jit(student.init)(jax.random.key(0), x)
    fv = jax.jit(frn.init)(jax.random.key(1), x)
    trunk = sv["params"]["trunk"]
    head = {k: v for k, v in sv["params"].items() if k != "trunk"}

    def student_loss(head, x):
        out = student.apply({"params": {**head, "trunk": trunk},
                             "batch_stats": sv["batch_stats"]}, x)
        return jnp.sum(out["spa_f"] ** 2)
    student_grad = jax.jit(jax.grad(student_loss))
    spa_f = jax.jit(lambda x: student.apply(sv, x)["spa_f"])(x)

    def frn_loss(params, z):
        out, _ = frn.apply({"params": params, "batch_stats": fv["batch_stats"]},
                           z, True, mutable=["batch_stats"])
        return jnp.sum(out ** 2)
    frn_grad = jax.jit(jax.grad(frn_loss, argnums=(0, 1)))
    z = spa_f + spe_f
    recon = jax.jit(lambda z: frn.apply(fv, z))(z)
    loss_grad = jax.jit(jax.grad(
        lambda s, r: losses.stage2_loss(spe_f, s, r, x)[0], argnums=(0, 1)))
    return {
        "student": best_ms(lambda: bi.block(student_grad(head, x)), repeats),
        "frn": best_ms(lambda: bi.block(frn_grad(fv["params"], z)), repeats),
        "loss": best_ms(lambda: bi.block(loss_grad(spa_f, recon)), repeats)}


def torch_parts(x, spe_f, repeats):
    torch.manual_seed(0)
    student = tr.SpatialStudent(BANDS).train()
    student.get_features.requires_grad_(False).eval()
    frn = tr.FeatureRestorationNet(BANDS).train()
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    st = torch.tensor(np.asarray(spe_f)).permute(0, 3, 1, 2).contiguous()

    def t_student():
        student.zero_grad()
        (student(xt)[0] ** 2).sum().backward()
    with torch.no_grad():
        spa = student(xt)[0]
    z = (spa + st).requires_grad_(True)

    def t_frn():
        frn.zero_grad()
        z.grad = None
        (frn(z) ** 2).sum().backward()
    with torch.no_grad():
        rec = frn(spa + st)
    s_leaf, r_leaf = spa.clone().requires_grad_(True), rec.clone().requires_grad_(True)

    def t_loss():
        s_leaf.grad = r_leaf.grad = None
        tr.stage2_loss(st, s_leaf, r_leaf, xt)[0].backward()
    return {"student": best_ms(t_student, repeats), "frn": best_ms(t_frn, repeats),
            "loss": best_ms(t_loss, repeats)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-0.1, 0.1, (args.batch, PATCH, PATCH, BANDS))
                    .astype(np.float32))
    spe_f = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    load0 = bi.loadavg()
    jx = jax_parts(x, spe_f, args.repeats)
    th = torch_parts(x, spe_f, args.repeats)
    rows = [{"part": k, "fers_jax_ms": jx[k], "torch_ms": th[k],
             "ratio": round(jx[k] / th[k], 2)} for k in jx]
    for r in rows:
        print(f"{r['part']:8s} fers_jax {r['fers_jax_ms']:8.1f} ms  torch "
              f"{r['torch_ms']:8.1f} ms  x{r['ratio']}")
    out = REPO / "benchmarks" / "results" / f"train_stage2_parts_{socket.gethostname()}.json"
    out.write_text(json.dumps({
        "host": socket.gethostname(), "cpu": bi.cpu_model(),
        "loadavg": [load0, bi.loadavg()], "batch": args.batch, "patch": PATCH,
        "bands": BANDS, "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
