"""The model bundled in the package: complete, within the size budget, and a real translator: on
the bundled IXI example (never seen in training) its T2 is closer to the subject's real T2 than the
T1 itself is, by a margin."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aldm.cli.infer import app
from aldm.translator import default_model_dir
from aldm.runtime.manifest import MANIFEST, ModelDir, sha256_file
from conftest import DATA, REPO, need

EXAMPLE = REPO / "examples" / "IXI002-Guys-0828-T1.nii.gz"
MARGIN_DB = 3.0  # the default settings measured +7.4 dB (docs/model-card.md)


def m_per_class(md) -> bool:
    return bool(md.manifest.spade_per_class) and len(md.manifest.spade_per_class) == 4


def test_the_working_tree_fits_one_device_call():
    """The device machine takes the working tree (tracked files) plus what a call writes, 64 MiB in
    all; scripts/gpu_train.sh needs the tree to travel with room to spare."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    total = sum((root / f).stat().st_size for f in res.stdout.decode().split("\0") if f and (root / f).is_file())
    assert total <= 60 * 2**20, f"tracked files {total / 2**20:.1f} MiB: a device call takes 64 MiB in all"


def test_bundled_model_is_complete_and_within_budget():
    md = ModelDir(default_model_dir())  # verifies every sha256 in the manifest
    files = [p for p in md.path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60 * 2**20
    assert max(p.stat().st_size for p in files) <= 20 * 2**20
    # FP32 only: the FP16 copy is written by `aldm build --fp16` where a GPU needs it (13 MB kept out
    # of the tree so that the device machine's 64 MiB still holds it); no INT8: it fails its
    # end-to-end bar (model card)
    assert set(md.precisions) == {"fp32"}
    assert m_per_class(md) and md.manifest.decoder_tiling
    m = md.manifest
    assert list(m.modalities) == ["t1", "t1ce", "t2", "flair"]
    assert m.scale_factor != 1.0  # set from the latent std, not the official recipe's 1.0


@pytest.fixture(scope="module")
def example_t2(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    res = CliRunner().invoke(app, [str(EXAMPLE), "--targets", "t2", "--out", str(out),
                                   "--seed", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "IXI002-Guys-0828-T1_t2.nii.gz"


def test_bundled_model_translates_the_example_in_its_space(example_t2):
    src, pred = nib.load(str(EXAMPLE)), nib.load(str(example_t2))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
    side = json.loads(example_t2.with_name("IXI002-Guys-0828-T1_t2.json").read_text())
    assert side["manifest_sha256"] == sha256_file(default_model_dir() / MANIFEST)
    data = pred.get_fdata()
    assert 0 <= data.min() and data.max() <= 1 and data[np.asarray(src.dataobj) > 0].std() > 0.05


def test_bundled_model_t2_beats_the_t1_as_a_guess(example_t2):
    from aldm.evaluate import evaluate

    real = need(DATA / "ixi" / "IXI002-Guys-0828" / "IXI002-Guys-0828-T2.nii.gz")
    model = evaluate(example_t2, real)[0]
    identity = evaluate(EXAMPLE, real)[0]
    assert model.psnr >= identity.psnr + MARGIN_DB and model.ssim > identity.ssim

