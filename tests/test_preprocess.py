"""Invertible preprocessing: the official chain on real data, and round trips onto the source grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aldm.preprocess import invert, preprocess, resample
from aldm.runtime.manifest import Preprocessing
from conftest import DATA, need

BRATS_T1 = DATA / "brats18" / "Brats18_2013_11_1" / "Brats18_2013_11_1_t1.nii.gz"
IXI_T1 = DATA / "ixi" / "IXI002-Guys-0828" / "IXI002-Guys-0828-T1.nii.gz"
PRE = Preprocessing()


def official_chain(data: np.ndarray) -> np.ndarray:
    """SPEC §8.1 written out independently for an LPS (diag(-1,-1,1)) volume: RAS flip, crop to
    t1 > 0, SpatialPad (floor(diff/2) before), CenterSpatialCrop, 0.5/99.5 percentiles -> [-1, 1]."""
    v = data[::-1, ::-1, :].astype(np.float32)
    nz = np.nonzero(v > 0)
    v = v[tuple(slice(i.min(), i.max() + 1) for i in nz)]
    target = (144, 192, 144)
    pad = [(max(t - n, 0) // 2, max(t - n, 0) - max(t - n, 0) // 2) for n, t in zip(v.shape, target)]
    v = np.pad(v, pad)
    start = [n // 2 - t // 2 for n, t in zip(v.shape, target)]
    v = v[tuple(slice(s, s + t) for s, t in zip(start, target))]
    lo, hi = (float(p) for p in np.percentile(v, [0.5, 99.5]))
    # MONAI scales a float32 tensor by float scalars: the arithmetic is float32
    return (v - np.float32(lo)) / np.float32(hi - lo) * np.float32(2) - np.float32(1)


def roundtrip_error(data: np.ndarray, affine: np.ndarray, pre=PRE, margin: int = 0,
                    **kw) -> tuple[float, float]:
    """Max |inverse(preprocess(x)) - x| inside the source foreground the model grid covers, in
    units of the source's percentile range; and the covered fraction of the foreground.

    margin: leave out voxels this close to the model grid's faces. Undoing an upsampling is a
    least-squares fit whose weights decay by ~3x per voxel, so where the centre crop cut an
    upsampled axis, the few voxels next to the cut also feel the voxels that were cut away.
    """
    prep = preprocess(data, affine, pre, **kw)
    back = invert(prep.x[0, 0], prep.record, intensity="source")
    grid = np.zeros(prep.x.shape[2:], np.float32)
    grid[tuple(slice(margin, n - margin) for n in grid.shape)] = 1
    covered = invert(grid, prep.record, intensity="model") > 0.5
    assert back.shape == data.shape
    fg = data > 0
    step = prep.record[-1]
    scale = step["p_hi"] - step["p_lo"]
    err = np.abs(back - data.astype(np.float32))[fg & covered] / scale
    return float(err.max()), float((fg & covered).sum() / fg.sum())


def test_matches_the_official_chain_on_a_real_brats_case():
    img = nib.load(need(BRATS_T1))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and img.get_data_dtype() == np.int16
    data = np.asarray(img.dataobj)
    prep = preprocess(data, img.affine, PRE)
    np.testing.assert_array_equal(prep.x[0, 0], official_chain(data))
    assert [s["op"] for s in prep.record] == ["reorient", "crop_foreground", "pad", "scale_intensity"]


def test_matches_monai_when_it_is_installed():
    monai = pytest.importorskip("monai", reason="MONAI not installed (the test extra has it)")
    from monai import transforms as T

    img = nib.load(need(BRATS_T1))
    data = np.asarray(img.dataobj).astype(np.float32)
    chain = T.Compose([
        T.Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))), T.CropForeground(select_fn=lambda x: x > 0, margin=0),
        T.SpatialPad((144, 192, 144)), T.CenterSpatialCrop((144, 192, 144)),
        T.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=-1, b_max=1),
    ])
    meta = monai.data.MetaTensor(data[None], affine=img.affine)
    ref = np.asarray(chain(meta))[0]
    np.testing.assert_array_equal(preprocess(data, img.affine, PRE).x[0, 0], ref)  # bit-exact


def test_roundtrip_lps_int16_brats_case():
    img = nib.load(need(BRATS_T1))
    err, covered = roundtrip_error(np.asarray(img.dataobj), img.affine)
    assert err <= 1e-3 and covered == 1.0


def test_roundtrip_ras_volume():
    img = nib.load(need(BRATS_T1))
    ras = np.ascontiguousarray(np.asarray(img.dataobj)[::-1, ::-1, :])
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-120, -120, -70]
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    prep = preprocess(ras, affine, PRE)
    assert np.array_equal(prep.x, preprocess(np.asarray(img.dataobj), img.affine, PRE).x)
    err, covered = roundtrip_error(ras, affine)
    assert err <= 1e-3 and covered == 1.0


def test_roundtrip_non_isotropic_ixi_t1():
    img = nib.load(need(IXI_T1))
    data = np.asarray(img.dataobj)
    prep = preprocess(data, img.affine, PRE)
    ops = {s["op"]: s for s in prep.record}
    assert ops["resample"]["to_shape"] == [180, 256, 256]  # the 1.2 mm axis goes to 1 mm
    err, covered = roundtrip_error(data, img.affine)
    assert err <= 1e-3
    assert covered > 0.9999  # the 144-voxel S-I crop trims a sliver of the 145-voxel brain
    assert prep.warnings == []  # under 0.01 % is not worth a warning


def test_strict_resampling_is_lossy_and_says_so():
    """finer_tolerance=0 also downsamples the 0.94 mm axes: detail beyond 1 mm is lost."""
    img = nib.load(need(IXI_T1))
    data = np.asarray(img.dataobj)
    prep = preprocess(data, img.affine, PRE, finer_tolerance=0.0)
    assert {s["op"]: s for s in prep.record}["resample"]["to_shape"] == [180, 240, 240]
    err, _ = roundtrip_error(data, img.affine, finer_tolerance=0.0)
    assert err > 1e-2


def test_resampling_up_then_down_is_the_identity():
    a = np.random.default_rng(0).random((15, 20, 9)).astype(np.float32)
    up = resample(a, (18, 31, 9))
    np.testing.assert_allclose(resample(up, a.shape), a, atol=1e-5)


def test_crop_warning_says_how_much_foreground_was_lost():
    data = np.ones((200, 60, 60), np.int16)  # 200 mm of foreground along x, crop keeps 144
    prep = preprocess(data, np.eye(4), PRE)
    assert prep.warnings and "28.00% of the foreground" in prep.warnings[0]


def _random_affine(rng, spacing):
    perm = rng.permutation(3)
    flips = rng.choice([-1.0, 1.0], 3)
    a = np.zeros((4, 4))
    for i in range(3):
        a[perm[i], i] = flips[i] * spacing[i]
    a[:3, 3] = rng.uniform(-50, 50, 3)
    a[3, 3] = 1
    return a


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([np.int16, np.uint8, np.float32, np.float64]),
       spacing=st.lists(st.sampled_from([1.0, 0.95, 1.2, 1.5, 2.0]), min_size=3, max_size=3),
       shape=st.lists(st.integers(16, 28), min_size=3, max_size=3))
def test_roundtrip_property(seed, dtype, spacing, shape):
    from conftest import synthetic_volume

    rng = np.random.default_rng(seed)
    data = synthetic_volume(tuple(shape), seed, dtype=np.float32)
    data = (data / 4).astype(dtype) if dtype == np.uint8 else data.astype(dtype)
    affine = _random_affine(rng, spacing)
    pre = Preprocessing(crop_size=(48, 48, 48))  # upsampled volumes (up to 56) get centre-cropped
    err, covered = roundtrip_error(data, affine, pre, margin=12)
    assert err <= 1e-3
    assert covered > 0.2
