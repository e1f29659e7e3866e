"""Shared fixtures. Tests that need ../shared (real data, golden fixtures) skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALDM_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
KEYS_FULL = SHARED / "reference" / "keys_full"
DATA = SHARED / "data"


def need(path: Path) -> Path:
    """Skip the calling test (with the reason) when a ../shared fixture is missing."""
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared reference pack is not present)")
    return path


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the parity measure used throughout)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture(scope="session")
def golden_config():
    import json

    return json.loads((need(GOLDEN / "config.json")).read_text())["ldm"]


@pytest.fixture(scope="session")
def golden_model(golden_config):
    from aldm.models import load_official

    return load_official(need(GOLDEN / "ldm.ckpt"), config=golden_config)


@pytest.fixture(scope="session")
def golden():
    """name -> loaded npz of the golden fixtures."""
    need(GOLDEN)
    return {p.stem: dict(np.load(p)) for p in GOLDEN.glob("*.npz")}


@pytest.fixture(scope="session")
def tiny_model():
    """A random-weight model with the official topology and the golden (reduced) widths."""
    import torch

    from aldm.models import ALDM, LDMConfig

    torch.manual_seed(0)
    return ALDM(LDMConfig.tiny()).eval()
