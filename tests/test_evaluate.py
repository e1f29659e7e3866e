"""The paper's metrics and the reference resampling, on volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from aldm.evaluate import linear_fit, normalise, resample_to_grid, score, ssim_map


def _vol(seed=0, shape=(20, 24, 16)):
    rng = np.random.default_rng(seed)
    v = rng.uniform(100, 1000, shape)
    v[:3] = 0
    return v


def test_identical_volumes_score_perfectly():
    v = _vol()
    s = score(v, v)
    assert s.psnr >= 100 and s.ssim == pytest.approx(1.0) and s.nmse == 0


def test_psnr_is_10_log10_of_one_over_mse_on_normalised_intensities():
    ref = _vol()
    mask = ref > 0
    r = normalise(ref, mask)
    pred_norm = np.clip(r + 0.1 * (np.indices(r.shape).sum(0) % 2 * 2 - 1), 0, 1)
    # map back through the same percentiles so that normalising the prediction is the identity
    lo, hi = np.percentile(ref[mask], [0.5, 99.5])
    pred = np.where(mask, pred_norm * (hi - lo) + lo, 0)
    p = normalise(pred, mask)
    expected = 10 * np.log10(1 / np.mean((p[mask] - r[mask]) ** 2))
    assert score(pred, ref).psnr == pytest.approx(expected, rel=1e-9)


def test_normalisation_makes_scores_blind_to_a_positive_gain():
    ref, src = _vol(0), _vol(1)
    assert score(3 * src + 7, ref).psnr == pytest.approx(score(src, ref).psnr)


def test_ssim_drops_with_noise():
    v = normalise(_vol(), _vol() > 0)
    noisy = np.clip(v + np.random.default_rng(1).normal(0, 0.2, v.shape), 0, 1)
    assert ssim_map(v, noisy).mean() < 0.9 < ssim_map(v, v).mean() + 1e-9


def test_linear_fit_recovers_an_inverted_contrast():
    ref = _vol()
    src = np.where(ref > 0, 2000 - 2 * ref, 0)
    fit = linear_fit(src, ref)
    np.testing.assert_allclose(fit[ref > 0], ref[ref > 0], rtol=1e-6)


def test_resampling_through_affines():
    data = _vol(2, (12, 10, 8))
    eye = np.eye(4)
    np.testing.assert_allclose(resample_to_grid(data, eye, eye, data.shape), data, rtol=1e-6)
    # the reference grid is the data flipped along x and shifted by 2 voxels along y
    ref_aff = np.array([[-1.0, 0, 0, 11], [0, 1, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = resample_to_grid(data, eye, ref_aff, (12, 8, 8))
    np.testing.assert_allclose(out, data[::-1, 2:, :], rtol=1e-6)
    # half-voxel shift: trilinear averages neighbours; outside the field of view is 0
    half = np.eye(4)
    half[2, 3] = 0.5
    out = resample_to_grid(data, eye, half, data.shape)
    np.testing.assert_allclose(out[:, :, 0], (data[:, :, 0] + data[:, :, 1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[:, :, -1], 0.5 * data[:, :, -1], rtol=1e-6)


def test_identity_plus_histogram_baseline_uses_the_other_cases_targets(tmp_path):
    """aldm eval --baselines: the source mapped onto the mean target histogram of the *other*
    reference cases; for a monotonic contrast change it beats the identity by far."""
    import json

    from aldm.evaluate import HistogramTemplates, evaluate, quantile_function
    from conftest import synthetic_volume, write_nifti

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    pred.mkdir()
    for i in range(3):
        case = f"case{i}"
        (ref / case).mkdir(parents=True)
        t1 = synthetic_volume(seed=i).astype(np.float32)
        t2 = np.where(t1 > 0, (t1 / 1000.0) ** 3 * 800 + 10 * i, 0).astype(np.float32)
        src = write_nifti(ref / case / f"{case}_t1.nii.gz", t1)
        write_nifti(ref / case / f"{case}_t2.nii.gz", t2)
        write_nifti(pred / f"{case}_t1_t2.nii.gz", t1)  # a "model" that returns its input
        (pred / f"{case}_t1_t2.json").write_text(json.dumps(
            {"source": str(src), "target": "t2", "output": f"{case}_t1_t2.nii.gz", "source_modality": "t1"}))
    rows = evaluate(pred, ref, baselines=True)
    by = {(r.case, r.method): r for r in rows}
    for i in range(3):
        assert by[(f"case{i}", "identity+hist")].psnr > by[(f"case{i}", "identity")].psnr + 5
    templates = HistogramTemplates(ref)
    own = {}
    for i in range(3):
        import nibabel as nib

        v = np.asarray(nib.load(str(ref / f"case{i}" / f"case{i}_t2.nii.gz")).dataobj, np.float32)
        own[i] = quantile_function(v, v > 0)
    np.testing.assert_allclose(templates.without("case0", "t2"), (own[1] + own[2]) / 2)
