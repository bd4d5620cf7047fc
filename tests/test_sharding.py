"""Batches sharded over several devices give the single-device maps.

Run in a subprocess with two CPU devices (--xla_force_host_platform_device_count
must be set before jax is imported, and this pytest process already has).
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
    from fers_jax import data, evaluation, tiling

    teacher, student, scenes = sys.argv[1:4]
    out = {"devices": len(jax.devices())}
    files = sorted(pathlib.Path(scenes).glob("*.mat"))[:3]
    # three scenes of one size: padded to four, two per device
    batch = np.stack([data.normalise(data.load_scene(f).cube[:40, :48, :50])
                      for f in files])
    xs, n = tiling.shard_batch(batch, tiling.batch_mesh())
    out["padded"] = [n, xs.shape[0]]
    out["shards"] = sorted(str(s.device) for s in xs.addressable_shards)
    out["shard_shapes"] = [s.data.shape[0] for s in xs.addressable_shards]
    for cfg in (evaluation.EvalConfig(method="rx"),
                evaluation.EvalConfig(method="ferd", teacher=teacher, bands=50),
                evaluation.EvalConfig(method="fers", teacher=teacher,
                                      student=student, bands=50)):
        sharded, _ = evaluation.build_detector(dataclasses.replace(cfg, shard=True))
        single, _ = evaluation.build_detector(dataclasses.replace(cfg, shard=False))
        a, b = sharded(batch)[0], single(batch)[0]
        out[cfg.method] = {"shape": list(a.shape),
                           "max_rel": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))}
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
    for method in ("rx", "ferd", "fers"):
        assert out[method]["shape"] == [3, 40, 48]
        assert out[method]["max_rel"] <= 1e-6, (method, out[method])


def test_one_device_is_not_sharded():
    from fers_jax import tiling
    import jax
    import numpy as np
    if len(jax.devices()) > 1:
        return
    assert tiling.batch_mesh() is None
    x = np.zeros((3, 4, 4, 2), np.float32)
    same, n = tiling.shard_batch(x, None)
    assert same is x and n == 3
