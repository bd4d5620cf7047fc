"""Batches sharded over several devices give the single-device maps, and
one device, the mesh of size 1, gives the maps of plain NumPy inputs.

The several-device test runs in a subprocess with two CPU devices
(--xla_force_host_platform_device_count must be set before jax is imported,
and this pytest process already has).
"""

import json
import os
import subprocess
import sys
import textwrap

from conftest import CHECKPOINTS, GOLDEN, REPO, SCENES

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2")
    import dataclasses, json, pathlib, sys
    import jax
    import numpy as np
    from fers_jax import data, evaluation, parallel

    teacher, student, scenes = sys.argv[1:4]
    out = {"devices": len(jax.devices())}
    files = sorted(pathlib.Path(scenes).glob("*.mat"))[:3]
    # three scenes of one size: padded to four, two per device
    batch = np.stack([data.normalise(data.load_scene(f).cube[:40, :48, :50])
                      for f in files])
    xs, n = parallel.shard_padded(batch, parallel.make_mesh())
    out["padded"] = [n, xs.shape[0]]
    out["shards"] = sorted(str(s.device) for s in xs.addressable_shards)
    out["shard_shapes"] = [s.data.shape[0] for s in xs.addressable_shards]
    for cfg in (evaluation.EvalConfig(method="rx"),
                evaluation.EvalConfig(method="ferd", teacher=teacher, bands=50),
                evaluation.EvalConfig(method="fers", teacher=teacher,
                                      student=student, bands=50)):
        cfg = dataclasses.replace(cfg, export=cfg.method != "rx")
        sharded, _ = evaluation.build_detector(dataclasses.replace(cfg, shard=True))
        single, _ = evaluation.build_detector(dataclasses.replace(cfg, shard=False))
        (a, fa), (b, fb) = sharded(batch), single(batch)
        rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        out[cfg.method] = {"shape": list(a.shape), "max_rel": rel(a, b),
                           "features": {k: rel(fa[k], fb[k]) for k in fb}}
    print(json.dumps(out))
""")


def test_sharded_maps_equal_single_device_maps(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, str(script), str(CHECKPOINTS / "50bands"),
         str(GOLDEN / "spa_fen_random_50bands.pt"), str(SCENES)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["padded"] == [3, 4] and out["shard_shapes"] == [2, 2]
    assert len(set(out["shards"])) == 2
    # One device runs the images one at a time, each device of two its two
    # at once: XLA's convolutions round differently with the batch size
    # (spa_f by ~1e-6), and the 50-band FERS map, a product of float32 RX
    # maps, amplifies that (1.5e-4 seen); the other maps stay within 1e-6.
    assert set(out["ferd"]["features"]) == {"spe_f"}
    assert set(out["fers"]["features"]) == {"spe_f", "spa_f"}
    for method, map_tol in (("rx", 1e-6), ("ferd", 1e-6), ("fers", 2e-3)):
        assert out[method]["shape"] == [3, 40, 48]
        assert out[method]["max_rel"] <= map_tol, (method, out[method])
        for name, err in out[method]["features"].items():
            assert err <= 5e-6, (method, name, out[method])


def test_one_device_is_a_mesh_of_one():
    """--no-shard (and a one-device machine) runs on a 1-device mesh, with
    no padding, and its maps are those of the unsharded computation on
    NumPy inputs, bit for bit."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fers_jax import data, detectors, evaluation, inference, parallel

    mesh = parallel.one_device_mesh()
    assert mesh.size == 1 and mesh.axis_names == (parallel.DATA_AXIS,)
    batch = np.stack([data.normalise(data.load_scene(f).cube[:40, :48, :50])
                      for f in sorted(SCENES.glob("*.mat"))[:3]])
    xs, n = parallel.shard_padded(batch, mesh)
    assert n == 3 and xs.shape == batch.shape
    assert xs.sharding == parallel.batch_sharded(mesh)

    rx, _ = evaluation.build_detector(evaluation.EvalConfig(method="rx", shard=False))
    got = rx(batch)[0]
    assert isinstance(got, np.ndarray)
    assert got.tobytes() == np.asarray(detectors.rx(batch, "float64")).tobytes()

    ferd, _ = evaluation.build_detector(evaluation.EvalConfig(
        method="ferd", teacher=str(CHECKPOINTS / "50bands"), bands=50,
        shard=False, export=True))
    maps, features = ferd(batch)
    # The same jitted forward, with the variables as plain (uncommitted)
    # arrays and a NumPy batch: the computation without any mesh.
    extractor = inference.feature_extractor(CHECKPOINTS / "50bands", None, 50)
    assert all(a.sharding == parallel.replicated(mesh)
               for a in jax.tree.leaves(extractor.forward.variables))
    plain = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)),
                         extractor.forward.variables)
    with jax.default_matmul_precision(extractor.matmul_precision):
        spe_f = extractor.forward.jitted(plain, batch)["spe_f"]
    assert features["spe_f"].tobytes() == np.asarray(spe_f).tobytes()
    want = np.asarray(inference.ferd_map(batch, spe_f, "float64"))
    assert maps.tobytes() == want.tobytes()
