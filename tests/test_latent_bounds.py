"""Clamping the MS-SPADE output to the codebook's range (manifest latent_bounds): written only when
asked, exact where it applies, and the fix for a measured failure of the bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from aldm.cli.infer import app
from aldm.errors import ModelError
from aldm.evaluate import evaluate
from aldm.export.onnx_export import codebook_bounds
from aldm.translator import default_model_dir
from aldm.runtime.manifest import MANIFEST, Manifest, ModelDir
from aldm.runtime.pipeline import Pipeline
from conftest import DATA, need


@pytest.fixture(scope="module")
def bounded_export(tmp_path_factory, tiny_model):
    from aldm.export import export_model

    out = tmp_path_factory.mktemp("models") / "tiny_bounded"
    export_model(tiny_model, out, crop_size=(32, 32, 16), steps=10, eta=1.0, bound_latents=True)
    return out


def test_bounds_are_the_codebook_range_and_only_written_when_asked(bounded_export, tiny_export, tiny_model):
    codes = tiny_model.first_stage_model.quantize.embedding.weight.detach().numpy()
    bounded = ModelDir(bounded_export).manifest.latent_bounds
    np.testing.assert_array_equal(np.array(bounded), np.stack([codes.min(0), codes.max(0)]))
    assert bounded == codebook_bounds(tiny_model)
    assert ModelDir(tiny_export).manifest.latent_bounds is None  # default: the official, unclamped


def test_condition_is_the_unclamped_one_clipped(bounded_export, tiny_export):
    """Same graphs, same input: the bounded model's target-like latent is exactly the clipped one,
    and the input is pushed far out of range so that the clip does act."""
    z = np.random.default_rng(0).normal(0, 50, (2, 4, 8, 8, 4)).astype(np.float32)
    y = np.array([2, 3])
    with Pipeline.load(tiny_export) as free, Pipeline.load(bounded_export) as clamped:
        a, b = free.condition(z, y), clamped.condition(z, y)
    s, c = np.float32(free.manifest.scale_factor), z.shape[1]
    lo, hi = (np.asarray(v, np.float32).reshape(1, -1, 1, 1, 1) for v in clamped.manifest.latent_bounds)
    np.testing.assert_array_equal(b[:, :c], a[:, :c])  # the source latent is never touched
    np.testing.assert_array_equal(b[:, c:], (np.clip(a[:, c:] / s, lo, hi) * s).astype(np.float32))
    assert ((a[:, c:] / s < lo) | (a[:, c:] / s > hi)).mean() > 0.1  # the clip did act here


@pytest.mark.parametrize("bounds", [[[0.0] * 3, [1.0] * 4], [[0.0] * 4, [1.0] * 3], [[0, 2, 0, 0], [1, 1, 1, 1]],
                                    [[0.0] * 4] * 3, [["a"] * 4, [1.0] * 4], 5])
def test_malformed_bounds_are_a_model_error(tiny_export, bounds):
    d = json.loads((tiny_export / MANIFEST).read_text()) | {"latent_bounds": bounds}
    with pytest.raises(ModelError, match="latent_bounds"):
        Manifest.from_dict(d)


def test_bundled_model_flair_to_t1_is_a_brain_not_a_blob(tmp_path):
    """Held-out Brats18_TCIA03_265_1: unclamped, one MS-SPADE latent voxel reached 2,936 (codebook
    |max| 7.25) and the FLAIR -> T1 output was a bright blob, 5.72 dB PSNR; clamped 13.52 dB."""
    case = need(DATA / "brats18" / "Brats18_TCIA03_265_1")
    assert ModelDir(default_model_dir()).manifest.latent_bounds is not None
    res = CliRunner().invoke(app, [str(case / f"{case.name}_flair.nii.gz"), "--source-modality", "flair",
                                   "--targets", "t1", "--out", str(tmp_path), "--seed", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    row = evaluate(tmp_path / f"{case.name}_flair_t1.nii.gz", case / f"{case.name}_t1.nii.gz")[0]
    assert row.psnr > 12.0 and row.ssim > 0.25
