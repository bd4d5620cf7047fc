"""The FERS stage-2 train step, fers_jax vs a PyTorch baseline of the same step.

Batch 16 of 64x64 crops (abu-airport-2, first 100 bands, each normalised
alone), 100 bands: the published 100-band teacher (frozen, eval mode), a
spatial student (Conv2RGB and LightSPP trained; ResNet-34 trunk frozen but
its BatchNorm in train mode, as the reference) and the restoration net
(FRN, train mode); the stage-2 loss (SPEC 5); backward; Adam(lr 0.005,
betas (0.5, 0.999)) on Conv2RGB, LightSPP and the FRN.

Both frameworks start from the same weights: the torch student and FRN are
initialised once (SPEC 3.4 init for Conv2RGB, LightSPP and the FRN;
PyTorch's default init for the trunk, since the ImageNet weights are not
shipped) and converted into fers_jax with fers_jax.convert, so the first
steps' losses must agree; they are printed as a check.

  fers_jax  the package's own jitted step (fers_jax.training: Stage2 task,
            create_train_state, jit_train_step, with the state donated); if
            that module cannot be imported, an equivalent step built here
            from the models, losses.stage2_loss and optax (the JSON says
            which ran)
  torch     torch_reference.Stage2Step, eager, torch.set_num_threads(2)

Timing: warm-up steps (fers_jax's first compiles), then --repeats steps of
each, alternating between the two so that load changes on a shared machine
hit both alike; the median of each, every step waited on. GFLOP/s counts
conv FLOPs only: forward of every conv, plus for the backward the input
gradient of each conv whose input needs one and the weight gradient of each
trainable conv (see torch_reference.ConvFlops), counted on the torch step.

Usage:
  python benchmarks/bench_train_step.py [--repeats 5] [--batch 16] [--out F]
"""

import argparse
import pathlib
import socket
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402  (shared helpers)
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import torch  # noqa: E402

from fers_jax import checkpoints, configs, convert, losses  # noqa: E402

BANDS = 100
SEED = 810  # the reference's stage-2 seed at 100 bands


def torch_models(bands: int, seed: int):
    """(teacher, student, frn) in torch; the student's trunk gets PyTorch's
    default init, Conv2RGB, LightSPP and the FRN the SPEC 3.4 init."""
    torch.manual_seed(seed)
    teacher = tr.load_teacher(tr.CHECKPOINTS / f"{bands}bands", bands)
    student = tr.SpatialStudent(bands)
    tr.spec_init_(student.initial_conv, seed)
    tr.spec_init_(student.spp, seed + 1)
    frn = tr.spec_init_(tr.FeatureRestorationNet(bands), seed + 2)
    return teacher, student, frn


def jax_variables(teacher_dir, student, frn, bands: int):
    """The same weights as fers_jax variables, one subtree per model."""
    def numpy_sd(module):
        return {k: v.detach().numpy() for k, v in module.state_dict().items()}
    _, t_vars = checkpoints.load_teacher(teacher_dir, bands)
    s_vars, s_cfg = convert.from_torch("student", numpy_sd(student), bands)
    f_vars, f_cfg = convert.from_torch("frn", numpy_sd(frn), bands)
    parts = {"teacher": t_vars, "student": s_vars, "frn": f_vars}
    variables = {col: {name: v[col] for name, v in parts.items() if col in v}
                 for col in ("params", "batch_stats")}
    return variables, s_cfg, f_cfg


def package_step(variables, bands, s_cfg, f_cfg):
    """fers_jax.training's own step: (step_fn, state, description)."""
    from fers_jax.training import stage2, state
    task = stage2.Stage2(configs.teacher(bands), s_cfg, f_cfg)
    optimizer = state.AdamConfig(learning_rate=0.005, b1=0.5, b2=0.999)
    train_state = state.create_train_state(variables, task.trainable,
                                           optimizer.build())
    return (state.jit_train_step(task, optimizer), train_state,
            "fers_jax.training.state.jit_train_step (Stage2 task)")


def local_step(variables, bands, s_cfg, f_cfg):
    """An equivalent jitted step built here from the models, the loss and
    optax, for when fers_jax.training is not available."""
    import optax
    from fers_jax.models import (FeatureRestorationNet, SpatialStudent,
                                 SpectralTeacher)
    teacher = SpectralTeacher(configs.teacher(bands))
    student, frn = SpatialStudent(s_cfg), FeatureRestorationNet(f_cfg)
    tx = optax.adam(0.005, b1=0.5, b2=0.999)
    p, bs = variables["params"], variables["batch_stats"]
    trainable = {"to_rgb": p["student"]["to_rgb"], "spp": p["student"]["spp"],
                 "frn": p["frn"]}
    frozen = {"teacher": p["teacher"], "trunk": p["student"]["trunk"]}

    def loss_fn(params, frozen, batch_stats, x):
        spe_f = teacher.apply({"params": frozen["teacher"],
                               "batch_stats": batch_stats["teacher"]}, x)["spe_f"]
        s_params = {"to_rgb": params["to_rgb"], "spp": params["spp"],
                    "trunk": frozen["trunk"]}
        out, s_upd = student.apply(
            {"params": s_params, "batch_stats": batch_stats["student"]}, x,
            train=True, mutable=["batch_stats"])
        recon, f_upd = frn.apply(
            {"params": params["frn"], "batch_stats": batch_stats["frn"]},
            out["spa_f"] + spe_f, train=True, mutable=["batch_stats"])
        total, terms = losses.stage2_loss(spe_f, out["spa_f"], recon, x)
        new_bs = {"teacher": batch_stats["teacher"],
                  "student": s_upd["batch_stats"], "frn": f_upd["batch_stats"]}
        return total, (terms, new_bs)

    def step(st, x):
        (loss, (terms, new_bs)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(st["params"], st["frozen"], st["batch_stats"], x)
        updates, opt = tx.update(grads, st["opt"], st["params"])
        return ({"params": optax.apply_updates(st["params"], updates),
                 "frozen": st["frozen"], "batch_stats": new_bs, "opt": opt},
                {"loss": loss, **terms})

    st = {"params": trainable, "frozen": frozen, "batch_stats": bs,
          "opt": tx.init(trainable)}
    return (jax.jit(step, donate_argnums=0), st,
            "local equivalent step (fers_jax.training not importable)")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (the first compiles)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads")
    parser.add_argument("--local-step", action="store_true",
                        help="time the step built here, not the package's")
    parser.add_argument("--skip-golden", action="store_true")
    parser.add_argument("--out", default=str(
        bi.RESULTS / f"train_step_{socket.gethostname()}.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    env = bi.environment(args.threads)
    print(f"# fers_jax stage-2 train step benchmark on {env['cpu']} "
          f"({env['cpu_count']} cores, jax {env['jax']}, torch {env['torch']} "
          f"x{args.threads} threads), loadavg {env['loadavg_start']}")
    golden = None if args.skip_golden else tr.check_against_golden()

    _, crops, _ = bi.scene_inputs(BANDS, args.batch)
    x_torch, x_jax = bi.nchw(crops), jax.device_put(crops)
    teacher, student, frn = torch_models(BANDS, SEED)
    variables, s_cfg, f_cfg = jax_variables(tr.CHECKPOINTS / f"{BANDS}bands",
                                            student, frn, BANDS)

    # fers_jax (first: its weights were copied before torch trains).
    build = local_step if args.local_step else package_step
    try:
        step_fn, train_state, jax_impl = build(variables, BANDS, s_cfg, f_cfg)
    except ImportError as e:
        print(f"fers_jax.training unavailable ({e}); using the local step")
        step_fn, train_state, jax_impl = local_step(variables, BANDS, s_cfg, f_cfg)
    jax_losses, torch_losses = [], []

    def jax_step():
        nonlocal train_state
        train_state, m = step_fn(train_state, x_jax)
        bi.block((train_state, m))
        jax_losses.append(float(m["loss"]))

    torch_step = tr.Stage2Step(teacher, student, frn)

    def torch_train_step():
        torch_losses.append(float(torch_step(x_torch)["loss"]))

    # Warm-up: fers_jax compiles on its first step; torch's first step also
    # counts the conv FLOPs.
    first = {"fers_jax": _seconds(jax_step)}
    for _ in range(args.warmup - 1):
        jax_step()
    xla_gflop = bi.xla_gflop(step_fn, train_state, x_jax)
    with tr.ConvFlops(teacher, student, frn) as counter:
        first["torch"] = _seconds(torch_train_step)
    for _ in range(args.warmup - 1):
        torch_train_step()

    # Timed steps alternate between the two, so that a change in the load
    # of the shared machine hits both alike.
    times = {"fers_jax": [], "torch": []}
    load = {"before": bi.loadavg()}
    for _ in range(args.repeats):
        times["fers_jax"].append(_seconds(jax_step))
        times["torch"].append(_seconds(torch_train_step))
    load["after"] = bi.loadavg()

    rows = []
    for impl, run_losses in (("fers_jax", jax_losses), ("torch", torch_losses)):
        step_s = statistics.median(times[impl])
        rows.append({
            "impl": impl, "batch": args.batch, "shape": [64, 64], "bands": BANDS,
            "ms_per_step": 1e3 * step_s, "min_ms_per_step": 1e3 * min(times[impl]),
            "step_times_s": times[impl],
            "images_per_s": args.batch / step_s,
            "conv_gflop": counter.total / 1e9,
            "conv_gflop_forward": counter.forward / 1e9,
            "gflop_per_s": counter.total / 1e9 / step_s,
            "first_step_s": first[impl], "repeats": args.repeats,
            "loadavg_before": load["before"], "loadavg_after": load["after"],
            "losses": run_losses[:3],
        })
    env["loadavg_end"] = bi.loadavg()

    print(f"\nfers_jax step: {jax_impl}")
    print(f"conv FLOPs per step: {counter.forward / 1e9:.1f} GFLOP forward + "
          f"{counter.backward / 1e9:.1f} backward = {counter.total / 1e9:.1f}"
          f" (XLA's count of the whole jitted step: {xla_gflop:.1f})")
    print(f"{'impl':9s} {'ms/step':>9s} {'min ms':>9s} {'img/s':>7s} "
          f"{'GFLOP/s':>8s} {'1st step s':>10s}  load1  losses (steps 1-3)")
    for r in rows:
        print(f"{r['impl']:9s} {r['ms_per_step']:9.0f} {r['min_ms_per_step']:9.0f} "
              f"{r['images_per_s']:7.2f} {r['gflop_per_s']:8.1f} "
              f"{r['first_step_s']:10.2f}  {r['loadavg_before'][0]:5.2f}  "
              + ", ".join(f"{v:.6f}" for v in r["losses"]))
    print(f"\nloadavg start {env['loadavg_start']} end {env['loadavg_end']}")
    bi.write_json(args.out, {
        "benchmark": "stage2_train_step", "environment": env,
        "jax_step": jax_impl, "xla_gflop": xla_gflop,
        "flop_counting": "conv FLOPs only (2 * multiply-adds): every conv's "
                         "forward, plus its input gradient where the input "
                         "requires grad and its weight gradient where the "
                         "weight is trainable, counted on the torch step",
        "settings": vars(args), "golden_check": golden, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
