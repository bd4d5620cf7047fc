"""The benchmarks' PyTorch baseline computes what the reference computes.

benchmarks/torch_reference.py is the baseline the benchmarks time fers_jax
against; this checks it against ../shared/reference/golden. It needs torch
(a benchmark-only dependency), so it is skipped where torch is absent.
"""

import importlib.util
import pathlib

import pytest

pytest.importorskip("torch")

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load_torch_reference():
    spec = importlib.util.spec_from_file_location(
        "torch_reference", BENCHMARKS / "torch_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_baseline_matches_golden():
    results = _load_torch_reference().check_against_golden(verbose=False)
    assert results and all(r["ok"] for r in results.values()), results
