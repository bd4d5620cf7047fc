"""Where the full-size stage-1 step spends its time: part by part, fers_jax
against torch (issue 12).

The stage-1 step (`bench_train.py stage1`) is slower in fers_jax than in
PyTorch on CPU; this splits it into its three big parts at batch N (default
8) of 64x64 patches at 100 bands (72x72 after ConvH's padding), each
forward + backward as the step runs it, best of --repeats after a warm-up:

  encoder  frozen Wide-ResNet-101-2 layers 1-3 in eval mode: forward, and
           forward + the input gradient (ConvH before it trains)
  ocbe     one-class bottleneck in train mode: forward + gradients of its
           parameters and inputs
  decoder  the de-bottleneck decoder in train mode: forward + gradients
  blocks   single decoder blocks (Bottleneck / upsampling de-bottleneck)
           at each stage's sizes
  conv3x3  a trainable 3x3 conv of each decoder stage: forward, input
           gradient and kernel gradient apart (fers_jax), torch's forward

  python benchmarks/bench_stage1_parts.py [--batch 8] [--repeats 2]
Writes benchmarks/results/train_stage1_parts_<host>.json.
"""

import argparse
import json
import pathlib
import socket
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fers_jax import configs  # noqa: E402
from fers_jax.models import layers  # noqa: E402
from fers_jax.models.ferd import Decoder, FerdNet, OneClassBottleneck  # noqa: E402

BANDS = 100
REPO = pathlib.Path(__file__).resolve().parents[1]
# (H, in channels, planes, upsampling block) of each decoder stage
BLOCKS = [(18, 1024, 128, True), (18, 1024, 256, False), (36, 512, 64, True),
          (36, 512, 128, False), (72, 256, 64, False)]
CONVS = [(72, 128), (36, 256), (18, 512)]
DN = ("NHWC", "HWIO", "NHWC")


def best_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1e3, 1)


def sub(variables, name):
    return {col: tree[name] for col, tree in variables.items()}


def train_grad(module, variables, *inputs):
    """jit(grad) of sum(out^2) in train mode, w.r.t. params and inputs."""
    def loss(params, *xs):
        out, _ = module.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              *xs, True, mutable=["batch_stats"])
        return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(out))
    return jax.jit(jax.grad(loss, argnums=tuple(range(1 + len(inputs)))))


def parts(n, repeats):
    cfg = configs.ferd(BANDS)
    rng = np.random.default_rng(0)
    variables = jax.jit(FerdNet(cfg).init)(
        jax.random.key(0), jnp.zeros((1, 64, 64, BANDS), jnp.float32))
    xp = jnp.asarray(rng.random((n, 72, 72, cfg.stem_width), np.float32))
    enc = layers.ResNetStages(cfg.encoder_blocks, cfg.expansion,
                              cfg.width_per_group)
    ev = sub(variables, "encoder")
    enc_fwd = jax.jit(lambda v, x: enc.apply(v, x, train=False))

    def enc_vjp(v, x):
        out, pull = jax.vjp(lambda x: enc.apply(v, x, train=False), x)
        return pull(jax.tree.map(jnp.ones_like, out))
    enc_vjp = jax.jit(enc_vjp)
    abc = enc_fwd(ev, xp)
    ocbe = OneClassBottleneck(cfg.ocbe_blocks, cfg.expansion, cfg.width_per_group)
    ov = sub(variables, "ocbe")
    ocbe_grad = train_grad(ocbe, ov, *abc)
    z = jax.jit(lambda a, b, c: ocbe.apply(ov, a, b, c, False))(*abc)
    dec = Decoder(cfg.decoder_blocks, cfg.expansion, cfg.width_per_group)
    dv = sub(variables, "decoder")
    dec_grad = train_grad(dec, dv, z)
    jx = {"encoder_fwd": best_ms(lambda: bi.block(enc_fwd(ev, xp)), repeats),
          "encoder_fwd_vjp": best_ms(lambda: bi.block(enc_vjp(ev, xp)), repeats),
          "ocbe_fwd_bwd": best_ms(lambda: bi.block(ocbe_grad(ov["params"], *abc)),
                                  repeats),
          "decoder_fwd_bwd": best_ms(lambda: bi.block(dec_grad(dv["params"], z)),
                                     repeats)}
    m = tr.Stage1Net(BANDS).train()
    m.encoder.eval().requires_grad_(False)
    xt = torch.tensor(np.asarray(xp)).permute(0, 3, 1, 2).contiguous()
    xt.requires_grad_(True)

    def t_enc_fwd():
        with torch.no_grad():
            m.encoder(xt)

    def t_enc_vjp():
        xt.grad = None
        sum(o.sum() for o in m.encoder(xt)).backward()
    with torch.no_grad():
        ta = [t.detach().requires_grad_(True) for t in m.encoder(xt)]
        tz = m.ocbe(*ta).detach().requires_grad_(True)

    def t_ocbe():
        m.zero_grad()
        (m.ocbe(*ta) ** 2).sum().backward()

    def t_dec():
        m.zero_grad()
        sum((o ** 2).sum() for o in m.decoder(tz)).backward()
    th = {"encoder_fwd": best_ms(t_enc_fwd, repeats),
          "encoder_fwd_vjp": best_ms(t_enc_vjp, repeats),
          "ocbe_fwd_bwd": best_ms(t_ocbe, repeats),
          "decoder_fwd_bwd": best_ms(t_dec, repeats)}
    return [{"part": k, "fers_jax_ms": jx[k], "torch_ms": th[k],
             "ratio": round(jx[k] / th[k], 2)} for k in jx]


def blocks(n, repeats):
    rows = []
    for h, cin, planes, up in BLOCKS:
        blk = layers.Bottleneck(planes, 1, 4, 128, upsample=up)
        x = jnp.asarray(np.random.default_rng(1).standard_normal(
            (n, h, h, cin), np.float32))
        v = blk.init(jax.random.key(0), x, True)
        grad = train_grad(blk, v, x)
        width, cout = planes * 2, planes * 4
        tm = (tr.DeBottleneck(cin, width, cout) if up
              else tr.Bottleneck(cin, width, cout)).train()
        xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        xt.requires_grad_(True)

        def t_step():
            xt.grad = None
            tm.zero_grad()
            (tm(xt) ** 2).sum().backward()
        j = best_ms(lambda: bi.block(grad(v["params"], x)), repeats)
        t = best_ms(t_step, repeats)
        rows.append({"block": f"{'de-bottleneck' if up else 'bottleneck'} "
                              f"{cin}->{cout} width {width}, {h}x{h}",
                     "fers_jax_ms": j, "torch_ms": t, "ratio": round(j / t, 2)})
    return rows


def convs(n, repeats):
    rows = []
    rng = np.random.default_rng(2)
    for h, c in CONVS:
        x = jnp.asarray(rng.standard_normal((n, h, h, c), np.float32))
        g = jnp.asarray(rng.standard_normal((n, h, h, c), np.float32))
        w = jnp.asarray(0.01 * rng.standard_normal((3, 3, c, c), np.float32))

        def conv(x, w):
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=DN)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda g, w: jax.linear_transpose(lambda x: conv(x, w), x)(g)[0])
        dk = jax.jit(lambda x, g: layers._kernel_grad_im2col(
            x, g, w.shape, (1, 1), ((1, 1), (1, 1)), None))
        xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        wt = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous()
        xg, wg = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

        def t_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=1)

        def t_all():
            xg.grad = wg.grad = None
            (torch.nn.functional.conv2d(xg, wg, padding=1) ** 2).sum().backward()
        rows.append({"conv": f"3x3 {c}->{c}, {h}x{h}",
                     "fers_jax_fwd_ms": best_ms(lambda: bi.block(fwd(x, w)), repeats),
                     "fers_jax_dx_ms": best_ms(lambda: bi.block(dx(g, w)), repeats),
                     "fers_jax_dk_ms": best_ms(lambda: bi.block(dk(x, g)), repeats),
                     "torch_fwd_ms": best_ms(t_fwd, repeats),
                     "torch_fwd_bwd_ms": best_ms(t_all, repeats)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = [bi.loadavg()]
    out = {"benchmark": "train_stage1_parts", "environment":
           bi.environment(args.threads), "batch": args.batch,
           "unit": f"ms, best of {args.repeats} after a warm-up"}
    for name, fn in (("parts", parts), ("blocks", blocks), ("conv3x3", convs)):
        out[name] = fn(args.batch, args.repeats)
        load.append(bi.loadavg())
        print(name, json.dumps(out[name], indent=1), flush=True)
    out["loadavg"] = load
    path = pathlib.Path(args.out or REPO / "benchmarks" / "results" /
                        f"train_stage1_parts_{socket.gethostname()}.json")
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
