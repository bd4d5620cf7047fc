"""Shared test fixtures: where ../shared lives, and the golden files."""

import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FERS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints" / "saved_models"
SCENES = SHARED / "data" / "scenes"
BACKGROUND = SHARED / "data" / "background"


def pytest_configure(config):
    if not GOLDEN.is_dir():
        raise pytest.UsageError(
            f"shared reference data not found at {SHARED}; set FERS_SHARED")


@pytest.fixture(scope="session")
def golden():
    """Loads a golden .npz by name into a dict of arrays."""
    def load(name):
        with np.load(GOLDEN / name) as f:
            return {k: f[k] for k in f.files}
    return load
