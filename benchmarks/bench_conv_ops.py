"""The stage-1 step's convolution shapes one by one: fers_jax against torch.

Each case is one layer of the full-size stage-1 graph at batch N (default
4) of 64x64 patches (72x72 after ConvH's padding): the forward alone and
forward + backward (input gradient; kernel gradient too where the layer
trains), best of --repeats after a warm-up, jax jitted, torch with its
default CPU kernels. The decoder's 2x2 stride-2 transposed convs are timed
three ways: flax's nn.ConvTranspose (what fers_jax used), fers_jax's
layers.Deconv2x2 (a matmul and a depth-to-space) and torch's
ConvTranspose2d.

  python benchmarks/bench_conv_ops.py [--batch 4] [--repeats 3]
Writes benchmarks/results/train_stage1_ops_<host>.json.
"""

import argparse
import json
import pathlib
import socket
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402

from fers_jax.models import layers  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# name, H = W of the input, in, out, kind, whether the kernel trains
CASES = [
    ("encoder layer2 conv3x3 s2 256->256, 72->36", 72, 256, 256, "conv_s2", False),
    ("encoder layer3 conv3x3 s2 512->512, 36->18", 36, 512, 512, "conv_s2", False),
    ("encoder layer1 conv3x3 128->128, 72", 72, 128, 128, "conv_s1", False),
    ("ocbe conv1 conv3x3 s2 256->512, 72->36", 72, 256, 512, "conv_s2", True),
    ("ocbe bn_layer_0 conv3x3 s2 1024->1024, 18->9", 18, 1024, 1024, "conv_s2", True),
    ("decoder layer1_0 deconv2 512->512, 9->18", 9, 512, 512, "deconv", True),
    ("decoder layer1_0 upsample 2048->1024, 9->18", 9, 2048, 1024, "deconv", True),
    ("decoder layer3_0 deconv2 128->128, 36->72", 36, 128, 128, "deconv", True),
    ("decoder layer3_0 upsample 512->256, 36->72", 36, 512, 256, "deconv", True),
]


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_jax(module, x, trains, repeats):
    v = module.init(jax.random.PRNGKey(0), x)
    fwd = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2),
                            argnums=(0, 1) if trains else 1))
    return {"forward_s": best(lambda: fwd(v, x).block_until_ready(), repeats),
            "forward_backward_s": best(lambda: jax.block_until_ready(grad(v, x)),
                                       repeats)}


def time_torch(module, x, trains, repeats):
    x = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    for p in module.parameters():
        p.requires_grad_(trains)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        (module(x) ** 2).sum().backward()
    return {"forward_s": best(fwd, repeats), "forward_backward_s": best(fwd_bwd, repeats)}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    record = {"benchmark": "train_stage1_ops", "environment": bi.environment(args.threads),
              "settings": vars(args), "rows": rows}
    out = REPO / "benchmarks" / "results" / f"train_stage1_ops_{socket.gethostname()}.json"
    for name, hw, cin, cout, kind, trains in CASES:
        x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, hw, hw, cin))
        if kind == "deconv":
            ours = {"fers_jax": layers.deconv2x2(cout),
                    "flax_conv_transpose": nn.ConvTranspose(
                        cout, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                        transpose_kernel=True, kernel_init=layers.torch_default_init)}
            theirs = torch.nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
        else:
            s = 2 if kind == "conv_s2" else 1
            ours = {"fers_jax": layers.conv3x3(cout, s)}
            theirs = torch.nn.Conv2d(cin, cout, 3, s, 1, bias=False)
        row = {"layer": name, "input": [args.batch, hw, hw, cin], "out": cout,
               "kernel_trains": trains}
        for label, m in ours.items():
            row[label] = time_jax(m, x, trains, args.repeats)
        row["torch"] = time_torch(theirs, x, trains, args.repeats)
        rows.append(row)
        print(f"{name:48s} fwd+bwd " + "  ".join(
            f"{k} {row[k]['forward_backward_s'] * 1e3:.0f} ms"
            for k in ("fers_jax", "flax_conv_transpose", "torch") if k in row), flush=True)
        record["environment"]["loadavg_end"] = bi.loadavg()
        out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
