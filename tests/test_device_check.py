"""benchmarks/device_check.sh in its CPU dry run (tiny sizes, one scene):
the script runs end to end and writes the JSON the GPU run writes."""

import json
import subprocess
import sys

from conftest import REPO


def test_device_check_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "device.json"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--dry-run",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHON": sys.executable},
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["device"]["platform"] == "cpu"
    assert record["matmul_precision"] == "highest"
    assert set(record["scenes"]) == {"rx", "ferd"}
    for method in ("rx", "ferd"):
        (row,) = record["scenes"][method]["scenes"].values()
        assert row["auc_ok"], (method, row)
        assert row["s_per_scene"] > 0
    assert record["scenes"]["ferd"]["speedup_vs_paper"] > 0
    assert record["fers_batch"]["images"] == 4
    assert record["fers_batch"]["images_per_s"] > 0
    steps = record["train_steps"]
    for part in ("stage2_spe_f_from_batch", "stage1"):
        assert steps[part]["steps_per_s"] > 0, part
    assert record["auc_ok"] and record["parity_tests"] is None
