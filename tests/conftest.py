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


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model):
    """The tiny random-weight model exported at a 32x32x16 crop (no ../shared needed)."""
    from aldm.export import export_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_model(tiny_model, out, crop_size=(32, 32, 16), steps=10, eta=1.0)
    return out


@pytest.fixture(scope="session")
def golden_export(tmp_path_factory, golden_config):
    """The golden official checkpoint exported with `aldm export` semantics."""
    from aldm.export import export_official

    out = tmp_path_factory.mktemp("models") / "golden"
    export_official(need(GOLDEN / "ldm.ckpt"), out, config=golden_config, crop_size=(32, 48, 16),
                    steps=10, eta=1.0)
    return out


@pytest.fixture(scope="session")
def tiny_export_fullcrop(tmp_path_factory, tiny_model):
    """The tiny model exported at the official 144x192x144 crop (real-size NIfTI round trips)."""
    from aldm.export import export_model

    out = tmp_path_factory.mktemp("models") / "tiny_full"
    export_model(tiny_model, out, crop_size=(144, 192, 144), steps=5, eta=0.0)
    return out


def edit_manifest(folder: Path, fn) -> Path:
    """Rewrite a model folder's manifest.json through fn(dict) (tests that build odd folders)."""
    import json

    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def synthetic_volume(shape=(40, 36, 20), seed=0, dtype=np.int16):
    """A blob of 'brain' (values > 0) surrounded by zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    data = np.where(inside, 200 + 800 * rng.random(shape), 0)
    return data.astype(dtype)


def write_cases(folder, n: int, seed: int, shape=(48, 44, 24)):
    """A batch input: `folder` with c0.nii.gz .. c{n-1}.nii.gz, synthetic volumes seeded seed, seed+1, ..."""
    folder.mkdir()
    for i in range(n):
        write_nifti(folder / f"c{i}.nii.gz", synthetic_volume(shape=shape, seed=seed + i))
    return folder


def write_nifti(path, data, affine=None, qform_code=1, sform_code=1):
    import nibabel as nib

    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path
