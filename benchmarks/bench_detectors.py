"""Training-free detectors: fers_jax vs per-pixel NumPy loops and vectorised NumPy.

Cases (shared scenes, each image normalised alone with data.normalise):

  rx/<scene>   RX (float64) on each shared scene, all bands (100x100x189..205;
               pavia-car 80x100x102).
  rx/batch     RX on a batch of 100 images 64x64x100: random windows of the
               scenes (first 100 bands), one fers_jax call for the batch.
  crd          CRD (3, 11), lam 1e-6, on abu-airport-2, 100x100, first 200
               bands (form plain, border wrap).
  lrx          LRX (3, 11) on the same cube (form "pinv", border wrap).
  crd/<form>   CRD (3, 11) in each form (sum-to-one, plain) and each border
               (wrap, reflect, inside: fers_jax_<border>), against the
               per-pixel loop of that form.
  lrx/matlab   LRX (3, 11), the MATLAB form (G + delta I)^-1, borders wrap
               and inside, against its per-pixel loop (np.linalg.inv).

Implementations:

  fers_jax         the jitted, vmapped detectors (fers_jax.detectors).
  numpy loop       the per-pixel loop of the original code. RX: min-max,
                   covariance and pinv once in NumPy, then a Python loop of
                   d' P d per pixel. CRD / LRX: per pixel, gather the dual
                   window, then the method as written (X'X + lam G'G,
                   np.linalg.solve; covariance, np.linalg.pinv). CRD and LRX
                   loops run on the first --loop-rows rows only and are
                   extrapolated to the whole image (marked in the table).
  numpy vectorised RX only: the reference's NumPy RX (torch_reference.rx_numpy:
                   one covariance product, one pinv, one product for the
                   quadratic form), same float64.

Threads. Every implementation runs "as installed" (NumPy's OpenBLAS and the
SciPy OpenBLAS that jaxlib's LAPACK calls use, default 2 threads; XLA's own
thread pool) and, marked "_1_blas_thread", again with every BLAS limited to
1 thread (threadpoolctl). On a loaded machine OpenBLAS's threads spin on
small LAPACK calls (a 112 x 112 SVD ran 8x slower), so both columns are
needed to read a result. fers_jax's LRX and CRD limit BLAS to 1 thread
themselves (detectors._one_blas_thread), so they have one row.

Timing: a warm-up call first (for fers_jax it includes compilation, reported
as first_call_s), then the median of the repeats; JAX outputs are waited on
(block_until_ready). Wall time decides; the process CPU time is recorded
beside it because this 2-core machine is shared (the load averages before
and after each case are in the JSON).

GFLOP/s counts the flops of the method as the per-pixel loop computes it,
the same count for every implementation of a case (so it compares
throughput of the same work; fers_jax does fewer flops: its RX and LRX
pseudo-inverses go through a symmetric eigendecomposition instead of an
SVD, its CRD makes one Gram per 8x8 tile, its LRX a K x K instead of a
B x B pseudo-inverse):

  RX   (N pixels, B bands): covariance 2 N B^2 + pinv 23 B^3 (SVD with both
       bases ~21 B^3, Golub & Van Loan, + 2 B^3 to rebuild) + quadratic form
       2 N B^2 + N B.
  CRD  (K = outer^2 - inner^2 background pixels), per pixel: Gram 2 K^2 B,
       X'y 2 K B, distances 3 K B, Cholesky K^3 / 3, two triangular solves
       2 K^2, residual 2 K B.
  LRX  per pixel: mean K B, covariance 2 K B^2, pinv 23 B^3, quadratic
       form 2 B^2.

Usage:
  python benchmarks/bench_detectors.py [--repeats 5] [--loop-rows 10] [--out F]
"""

import argparse
import os
import pathlib
import socket
import statistics
import sys
import time
from typing import Callable, Dict

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402  (shared helpers; benchmarks/ is not a package)
import torch_reference as tr  # noqa: E402

import scipy.linalg.cython_lapack  # noqa: E402,F401  (jaxlib's LAPACK, loaded
#   before any thread limit so that the limit reaches it)

from fers_jax import data, detectors  # noqa: E402

SCENES = tr.SHARED / "data" / "scenes"
SCENE_NAMES = ("abu-airport-2", "abu-beach-2", "abu-urban-3", "pavia-car",
               "sandiego-2")
LOCAL_SCENE = "abu-airport-2"
INNER, OUTER, LAM = 3, 11, 1e-6


# --- NumPy baselines -----------------------------------------------------------

def _unit(cube):
    x = np.asarray(cube, np.float64)
    return (x - x.min()) / (x.max() - x.min())


def rx_loop(cube):
    """The original per-pixel RX: covariance and pinv once, then d' P d per pixel."""
    h, w, b = cube.shape
    x = _unit(cube).reshape(h * w, b)
    mean = x.mean(axis=0)
    p = np.linalg.pinv(np.cov(x, rowvar=False))
    out = np.empty(h * w)
    for i in range(h * w):
        d = x[i] - mean
        out[i] = d @ p @ d
    return out.reshape(h, w)


def local_loop(cube, rows, score, pad="reflect"):
    """score(X (K, B) background, y (B,)) for the pixels of the first `rows`
    rows (windows on the cube padded by `pad`: the cost is the same in every
    border mode)."""
    h, w, b = cube.shape
    r, g = OUTER // 2, (OUTER - INNER) // 2
    xp = np.pad(_unit(cube), ((r, r), (r, r), (0, 0)), mode=pad)
    guard = np.zeros((OUTER, OUTER), bool)
    guard[g:g + INNER, g:g + INNER] = True
    out = np.empty((rows, w))
    for i in range(rows):
        for j in range(w):
            out[i, j] = score(xp[i:i + OUTER, j:j + OUTER][~guard], xp[i + r, j + r])
    return out


def crd_pixel(x, y):
    x = x.T
    g = np.diag(np.linalg.norm(y[:, None] - x, axis=0))
    try:
        a = np.linalg.solve(x.T @ x + LAM * g.T @ g, x.T @ y)
    except np.linalg.LinAlgError:  # y repeated in its own background
        a = np.linalg.lstsq(x.T @ x + LAM * g.T @ g, x.T @ y, rcond=None)[0]
    return np.linalg.norm(y - x @ a)


def crd_pixel_sum_to_one(x, y):
    """CRDfunc.m: X and y augmented by a 1 in the solve, residual plain."""
    x = x.T
    g = np.diag(np.linalg.norm(y[:, None] - x, axis=0))
    xs = np.vstack([x, np.ones((1, x.shape[1]))])
    ys = np.append(y, 1.0)
    try:
        a = np.linalg.solve(xs.T @ xs + LAM * g.T @ g, xs.T @ ys)
    except np.linalg.LinAlgError:
        a = np.linalg.lstsq(xs.T @ xs + LAM * g.T @ g, xs.T @ ys, rcond=None)[0]
    return np.linalg.norm(y - x @ a)


def lrx_pixel_matlab(x, y):
    """LRXfunc.m: (y - m)' inv(X'X + delta I) (y - m)."""
    d = y - x.mean(axis=0)
    return d @ np.linalg.inv(x.T @ x + detectors.LRX_DELTA * np.eye(len(y))) @ d


def lrx_pixel(x, y):
    d = y - x.mean(axis=0)
    return d @ np.linalg.pinv(np.cov(x, rowvar=False), rcond=detectors.LRX_RTOL) @ d


def in_own_background(x, y):
    return float(np.any(np.all(x == y, axis=1)))


# --- FLOP counts (see the module docstring) ------------------------------------------

def rx_flops(n, b):
    return 2 * n * b * b + 23 * b ** 3 + 2 * n * b * b + n * b


def crd_flops(n, b, k):
    return n * (2 * k * k * b + 7 * k * b + k ** 3 / 3 + 2 * k * k)


def lrx_flops(n, b, k):
    return n * (k * b + 2 * k * b * b + 23 * b ** 3 + 2 * b * b)


# --- Timing ------------------------------------------------------------------------

def measure(fn: Callable, repeats: int, warmup: int = 1):
    """(timing dict, last output): median wall and CPU seconds over `repeats`
    calls after `warmup` calls (the first reported as first_call_s)."""
    first = None
    out = None
    for i in range(warmup):
        t0 = time.perf_counter()
        out = bi.block(fn())
        if i == 0:
            first = time.perf_counter() - t0
    before = bi.loadavg()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = bi.block(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"median_s": statistics.median(walls), "min_s": min(walls),
            "cpu_median_s": statistics.median(cpus), "first_call_s": first,
            "repeats": repeats, "loadavg_before": before,
            "loadavg_after": bi.loadavg()}, out


def entry(timing, flops, scale=1.0, note=None):
    """A row: timing scaled to the whole image (extrapolated loops), GFLOP/s."""
    row = dict(timing)
    for key in ("median_s", "min_s", "cpu_median_s"):
        row[key] = timing[key] * scale
    row["gflop"] = flops / 1e9
    row["gflop_s"] = flops / 1e9 / row["median_s"]
    if scale != 1.0:
        row["extrapolated_x"] = scale
    if note:
        row["note"] = note
    return row


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


# --- Cases ----------------------------------------------------------------------

def timed_variants(impls, flops, repeats, single_thread=(), scale=None, warmup=1):
    """Times each implementation as installed and, for those named in
    `single_thread`, again with every BLAS limited to 1 thread (threadpoolctl);
    returns ({name: row}, {name: output})."""
    from threadpoolctl import threadpool_limits
    rows_, outs = {}, {}
    for name, (fn, reps) in impls.items():
        reps = reps or repeats
        sc, note = (scale or {}).get(name, (1.0, None))
        timing, outs[name] = measure(fn, reps, warmup if sc == 1.0 else 0)
        rows_[name] = entry(timing, flops, sc, note)
        if name in single_thread:
            with threadpool_limits(1, user_api="blas"):
                timing, _ = measure(fn, reps, warmup if sc == 1.0 else 0)
            rows_[f"{name}_1_blas_thread"] = entry(timing, flops, sc, note)
    return rows_, outs


def bench_rx_scenes(repeats) -> Dict:
    out = {}
    for name in SCENE_NAMES:
        cube = data.normalise(data.load_scene(SCENES / f"{name}.mat").cube)
        h, w, b = cube.shape
        rows_, m = timed_variants({
            "fers_jax": (lambda: detectors.rx(cube), None),
            "numpy_loop": (lambda: rx_loop(cube), None),
            "numpy_vectorised": (lambda: tr.rx_numpy(cube), None),
        }, rx_flops(h * w, b), repeats,
            single_thread=("fers_jax", "numpy_loop", "numpy_vectorised"))
        out[name] = {"shape": [h, w, b], **rows_, "max_rel_err_vs_vectorised": {
            "fers_jax": rel_err(m["fers_jax"], m["numpy_vectorised"]),
            "numpy_loop": rel_err(m["numpy_loop"], m["numpy_vectorised"])}}
    return out


def batch_crops(n=100, size=64, bands=100, seed=0):
    """n random size x size windows, first `bands` bands, of the shared
    scenes in turn, each normalised alone."""
    rng = np.random.default_rng(seed)
    cubes = [data.select_bands(data.load_scene(SCENES / f"{s}.mat").cube, bands)
             for s in SCENE_NAMES]
    crops = []
    for i in range(n):
        c = cubes[i % len(cubes)]
        r = rng.integers(0, c.shape[0] - size + 1)
        q = rng.integers(0, c.shape[1] - size + 1)
        crops.append(c[r:r + size, q:q + size])
    return data.normalise(np.stack(crops))


def bench_rx_batch(repeats) -> Dict:
    batch = batch_crops()
    n, h, w, b = batch.shape
    rows_, m = timed_variants({
        "fers_jax": (lambda: detectors.rx(batch), None),
        "numpy_loop": (lambda: np.stack([rx_loop(c) for c in batch]),
                       max(1, repeats // 2)),
        "numpy_vectorised": (lambda: np.stack([tr.rx_numpy(c) for c in batch]),
                             None),
    }, n * rx_flops(h * w, b), repeats,
        single_thread=("fers_jax", "numpy_loop", "numpy_vectorised"))
    return {"shape": [n, h, w, b], **rows_, "max_rel_err_vs_vectorised": {
        "fers_jax": rel_err(m["fers_jax"], m["numpy_vectorised"]),
        "numpy_loop": rel_err(m["numpy_loop"], m["numpy_vectorised"])}}


def local_cube():
    scene = data.load_scene(SCENES / f"{LOCAL_SCENE}.mat")
    return data.normalise(data.select_bands(scene.cube, 200))


def bench_crd(repeats, loop_rows) -> Dict:
    cube = local_cube()
    h, w, b = cube.shape
    k = OUTER ** 2 - INNER ** 2
    scale = (h / loop_rows, f"timed on {loop_rows} of {h} rows, x{h / loop_rows:g}")
    # fers_jax's CRD runs its LAPACK calls on one BLAS thread itself.
    rows_, m = timed_variants({
        "fers_jax": (lambda: detectors.crd(cube, INNER, OUTER, LAM, border="wrap",
                                           form="plain"), None),
        "numpy_loop": (lambda: local_loop(cube, loop_rows, crd_pixel, "wrap"),
                       max(1, repeats // 2)),
    }, crd_flops(h * w, b, k), repeats, single_thread=("numpy_loop",),
        scale={"numpy_loop": scale})
    own = local_loop(cube, loop_rows, in_own_background, "wrap") > 0
    got, want = np.asarray(m["fers_jax"])[:loop_rows], m["numpy_loop"]
    return {"shape": [h, w, b], "window": [INNER, OUTER], "lam": LAM, **rows_,
            "max_rel_err_vs_loop": rel_err(got[~own], want[~own]),
            "pixels_in_own_background": int(own.sum()),
            "max_score_there": {"fers_jax": float(got[own].max(initial=0)),
                                "numpy_loop": float(want[own].max(initial=0))}}


def bench_lrx(repeats, loop_rows) -> Dict:
    cube = local_cube()
    h, w, b = cube.shape
    k = OUTER ** 2 - INNER ** 2
    scale = (h / loop_rows, f"timed on {loop_rows} of {h} rows, x{h / loop_rows:g}")
    rows_, m = timed_variants({
        "fers_jax": (lambda: detectors.lrx(cube, INNER, OUTER, border="wrap",
                                           form="pinv"), None),
        "numpy_loop": (lambda: local_loop(cube, loop_rows, lrx_pixel, "wrap"), 1),
    }, lrx_flops(h * w, b, k), repeats, single_thread=("numpy_loop",),
        scale={"numpy_loop": scale})
    return {"shape": [h, w, b], "window": [INNER, OUTER],
            "rtol": detectors.LRX_RTOL, **rows_,
            "max_rel_err_vs_loop": rel_err(np.asarray(m["fers_jax"])[:loop_rows],
                                           m["numpy_loop"])}


def bench_crd_modes(repeats, loop_rows) -> Dict:
    """CRD in every form and border; each form against its own loop."""
    cube = local_cube()
    h, w, b = cube.shape
    k = OUTER ** 2 - INNER ** 2
    scale = (h / loop_rows, f"timed on {loop_rows} of {h} rows, x{h / loop_rows:g}")
    out = {}
    for form, pixel in (("sum-to-one", crd_pixel_sum_to_one), ("plain", crd_pixel)):
        impls = {f"fers_jax_{border}": (
            lambda border=border: detectors.crd(cube, INNER, OUTER, LAM, border=border,
                                                form=form), None)
            for border in detectors.BORDERS}
        impls["numpy_loop"] = (lambda: local_loop(cube, loop_rows, pixel, "wrap"),
                               max(1, repeats // 2))
        rows_, m = timed_variants(impls, crd_flops(h * w, b, k), repeats,
                                  scale={"numpy_loop": scale})
        own = local_loop(cube, loop_rows, in_own_background, "wrap") > 0
        got, want = np.asarray(m["fers_jax_wrap"])[:loop_rows], m["numpy_loop"]
        out[f"crd/{form}"] = {"shape": [h, w, b], "window": [INNER, OUTER], "lam": LAM,
                              **rows_, "max_rel_err_vs_loop_wrap": rel_err(
                                  got[~own], want[~own])}
    return out


def bench_lrx_matlab(repeats, loop_rows) -> Dict:
    cube = local_cube()
    h, w, b = cube.shape
    k = OUTER ** 2 - INNER ** 2
    scale = (h / loop_rows, f"timed on {loop_rows} of {h} rows, x{h / loop_rows:g}")
    impls = {f"fers_jax_{border}": (
        lambda border=border: detectors.lrx(cube, INNER, OUTER, border=border,
                                            form="matlab"), None)
        for border in ("wrap", "inside")}
    impls["numpy_loop"] = (lambda: local_loop(cube, loop_rows, lrx_pixel_matlab, "wrap"), 1)
    rows_, m = timed_variants(impls, lrx_flops(h * w, b, k), repeats,
                              scale={"numpy_loop": scale})
    return {"shape": [h, w, b], "window": [INNER, OUTER], "delta": detectors.LRX_DELTA,
            **rows_, "max_rel_err_vs_loop_wrap": rel_err(
                np.asarray(m["fers_jax_wrap"])[:loop_rows], m["numpy_loop"])}


# --- Report ----------------------------------------------------------------------

# case kind -> (fers_jax variant, baseline, minimum speed-up over it)
GOALS = {
    "rx": [("fers_jax", "numpy_loop", 2.0), ("fers_jax", "numpy_vectorised", 1.0),
           ("fers_jax_1_blas_thread", "numpy_loop_1_blas_thread", 2.0),
           ("fers_jax_1_blas_thread", "numpy_vectorised_1_blas_thread", 1.0)],
    "rx/batch": [("fers_jax", "numpy_loop", 3.0),
                 ("fers_jax_1_blas_thread", "numpy_loop_1_blas_thread", 3.0)],
    "crd": [("fers_jax", "numpy_loop", 3.0),
            ("fers_jax", "numpy_loop_1_blas_thread", 3.0)],
    "lrx": [],
    "crd/mode": [(f"fers_jax_{b}", "numpy_loop", 3.0) for b in detectors.BORDERS],
    "lrx/matlab": [],
}
IMPLS = ("fers_jax", "fers_jax_1_blas_thread",
         *(f"fers_jax_{b}" for b in detectors.BORDERS), "numpy_loop",
         "numpy_loop_1_blas_thread", "numpy_vectorised",
         "numpy_vectorised_1_blas_thread")


def rows(results):
    for name, r in results.get("rx", {}).items():
        yield f"rx/{name}", r, "rx"
    for case in ("rx/batch", "crd", "lrx"):
        if case in results:
            yield case, results[case], case
    for form in detectors.CRD_FORMS:
        if f"crd/{form}" in results:
            yield f"crd/{form}", results[f"crd/{form}"], "crd/mode"
    if "lrx/matlab" in results:
        yield "lrx/matlab", results["lrx/matlab"], "lrx/matlab"


def table(results) -> str:
    lines = [f"{'case':18s} {'implementation':31s} {'median s':>9s} {'cpu s':>8s} "
             f"{'GFLOP/s':>8s} {'vs fers_jax':>11s}  note"]
    for case, r, kind in rows(results):
        base = r[next(i for i in IMPLS if i in r)]["median_s"]
        for impl in IMPLS:
            if impl not in r:
                continue
            e = r[impl]
            lines.append(f"{case:18s} {impl:31s} {e['median_s']:9.4f} "
                         f"{e['cpu_median_s']:8.3f} {e['gflop_s']:8.2f} "
                         f"{e['median_s'] / base:10.2f}x  {e.get('note', '')}")
        lines.append(f"{'':18s} ({'x'.join(map(str, r['shape']))})")
    lines.append("")
    lines.append("goals (speed-up of the fers_jax variant over the baseline, "
                 "wall time):")
    for case, r, kind in rows(results):
        for mine, impl, goal in GOALS[kind]:
            s = r[impl]["median_s"] / r[mine]["median_s"]
            lines.append(f"  {case:18s} {mine:22s} vs {impl:30s} {s:6.2f}x  "
                         f"goal >= {goal:g}x  {'met' if s >= goal else 'NOT MET'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-rows", type=int, default=10,
                        help="rows the CRD loop runs on (LRX: a fifth of them)")
    parser.add_argument("--cases", default="rx,batch,crd,lrx,crd_modes,lrx_matlab")
    parser.add_argument("--out", default=str(
        bi.RESULTS / f"detectors_{socket.gethostname()}.json"))
    args = parser.parse_args(argv)
    cases = set(args.cases.split(","))

    env = bi.environment(threads=None)
    env.pop("torch_threads", None)
    env["thread_env"]["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    import threadpoolctl  # needed for the 1-thread variants
    env["blas"] = threadpoolctl.threadpool_info()
    results = {"environment": env}
    print(f"{env['cpu']} x{env['cpu_count']}, numpy {env['numpy']}, "
          f"jax {env['jax']} {env['jax_devices']}, load {env['loadavg_start']}",
          flush=True)
    if "rx" in cases:
        # A single scene takes 10-100 ms: 3x the repeats, so that the
        # median is not one scheduler hiccup.
        results["rx"] = bench_rx_scenes(3 * args.repeats)
    if "batch" in cases:
        results["rx/batch"] = bench_rx_batch(args.repeats)
    if "crd" in cases:
        results["crd"] = bench_crd(max(2, args.repeats // 2), args.loop_rows)
    if "lrx" in cases:
        results["lrx"] = bench_lrx(2, max(1, args.loop_rows // 5))
    if "crd_modes" in cases:
        results.update(bench_crd_modes(max(2, args.repeats // 2), args.loop_rows))
    if "lrx_matlab" in cases:
        results["lrx/matlab"] = bench_lrx_matlab(max(2, args.repeats // 2),
                                                 max(1, args.loop_rows // 5))
    env["loadavg_end"] = bi.loadavg()
    results["table"] = table(results)
    print(results["table"])
    for case, r, _ in rows(results):
        errs = {k: v for k, v in r.items() if k.startswith("max_")}
        print(f"  {case}: {errs}")
    bi.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
