"""DICOM in and out: real series (tests/data/dicom, README there) read with the geometry an
independent converter (dcm2niix) gives, the IXI example round-tripped exactly through aldm's
writer, series selection, every bad-DICOM kind as one line (and a failed case in a batch), and
`--dicom-out` series checked attribute by attribute. CLI runs are real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from aldm.dicom.index import Series
from aldm.dicom.select import choose, contrast
from aldm.dicom.source import open_input, load
from aldm.dicom.write import write_volume
from aldm.errors import InputError
from conftest import DATA, REPO, need, synthetic_volume

DICOM_DATA = REPO / "tests" / "data" / "dicom"
EPI = DICOM_DATA / "ge_epi_zugfahrt.zip"  # real GE series, 64x64x37, "Zugfahrt" (an EPI)
IXI = REPO / "examples" / "IXI002-Guys-0828-T1.nii.gz"
INFER = [sys.executable, "-m", "aldm.cli.infer"]
FAST = ["--targets", "t2", "--steps", "5", "--seed", "7", "--quiet"]
UID_ROOTS = ("1.2.826.0.1.3680043.8.498.",)  # pydicom's root: every UID aldm makes


def _run(cmd, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _one_error_line(res, expect: str) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode == 1, out
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _canonical(data, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asarray(img.dataobj), img.affine


def _corners(shape, affine) -> np.ndarray:
    """World coordinates (mm) of the 8 corner voxels' centres, in canonical order."""
    idx = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ idx.T).T[:, :3]


def _unzip(archive: Path, dst: Path) -> Path:
    with zipfile.ZipFile(archive) as z:
        z.extractall(dst)
    return dst


def _dcm2niix(folder: Path, out: Path):
    exe = Path(sys.executable).parent / "dcm2niix"
    exe = str(exe) if exe.exists() else shutil.which("dcm2niix")
    assert exe, "dcm2niix (extra `test`) is not installed"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "y", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)
    return nib.load(str(out / "ref.nii.gz"))


def _as_source(folder: Path, description: str, edit=None) -> Path:
    """Make a series written by aldm's writer look like a scanner's (ORIGINAL, a description),
    `edit(ds, k)` changing slice k further."""
    for k, f in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.pop(0x0008001C, None)
        ds.SeriesDescription = description
        if edit is not None:
            edit(ds, k)
        ds.save_as(f)
    return folder


def _t1_series(folder: Path, seed=0, description="T1 AX SE", shape=(40, 36, 20)) -> Path:
    affine = np.array([[-1.1, 0, 0, 20], [0, 1.0, 0.1, -15], [0, -0.1, 1.2, 8], [0, 0, 0, 1]])
    write_volume(synthetic_volume(shape, seed=seed), affine, folder, description=description, aldm_version="test")
    return _as_source(folder, description)


# ------------------------------------------------------------------------------ reading

def _dicom2nifti(folder: Path, out: Path):
    import dicom2nifti

    dicom2nifti.convert_dicom.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=False)
    return nib.load(str(out))


def test_real_series_geometry_and_voxels_equal_independent_converters(tmp_path):
    series = _unzip(EPI, tmp_path / "in")
    index, chosen = open_input(series, "t1", "Zugfahrt")
    vol = load(chosen, chosen.series.files, str(series), index, max_voxels=10**9)
    assert vol.data.shape == (64, 64, 37)
    # the headers themselves: slice k's ImagePositionPatient is the affine's (0, 0, k), in LPS
    lps = np.diag([-1, -1, 1, 1]) @ vol.affine
    for k, s in enumerate(chosen.slices):
        assert np.abs(lps[:3] @ [0, 0, k, 1] - np.array(s.dataset.ImagePositionPatient, float)).max() < 1e-4
    a, aff_a = _canonical(vol.data, vol.affine)
    for ref, tol in ((_dicom2nifti(series / "DICOM", tmp_path / "d2n.nii.gz"), 1e-4),
                     # dcm2niix's slice step is 3.80000305 mm (3.8 in the headers): 1.1e-4 mm at slice 37
                     (_dcm2niix(series / "DICOM", tmp_path / "ref"), 2e-4)):
        b, aff_b = _canonical(ref.get_fdata(), ref.affine)
        assert a.shape == b.shape and np.array_equal(a, b)
        assert np.abs(_corners(a.shape, aff_a) - _corners(b.shape, aff_b)).max() < tol


def test_ixi_round_trip_through_the_writer_is_exact(tmp_path):
    src = nib.load(str(IXI))
    data = np.asarray(src.dataobj).astype(np.float32)
    write_volume(data, src.affine, tmp_path / "ixi", description="IXI002 T1", aldm_version="test")
    assert len(list((tmp_path / "ixi").glob("*.dcm"))) == data.shape[2]
    index, chosen = open_input(tmp_path / "ixi", "t1", "IXI002")
    back = load(chosen, chosen.series.files, "ixi", index, max_voxels=10**9)
    a, aff_a = _canonical(data, src.affine)
    b, aff_b = _canonical(back.data, back.affine)
    assert a.shape == b.shape and np.array_equal(a, b)  # same voxels, bit for bit
    assert np.abs(aff_a - aff_b).max() < 1e-4
    assert np.abs(_corners(a.shape, aff_a) - _corners(b.shape, aff_b)).max() < 1e-4


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    _t1_series(tmp_path / "s")
    raw = {}

    def rescale(ds, k):
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-100"
        raw[k] = ds.pixel_array.astype(np.float64)
    _as_source(tmp_path / "s", "T1", rescale)
    index, chosen = open_input(tmp_path / "s", "t1", None)
    vol = load(chosen, chosen.series.files, "s", index, max_voxels=10**9)
    assert np.allclose(sorted(vol.data.ravel()), sorted(np.concatenate([r.ravel() for r in raw.values()]) * 0.5 - 100))


# ------------------------------------------------------------------------------ selection

def _series(desc="", **info) -> Series:
    base = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY"], "SeriesDescription": desc, "SeriesNumber": 1}
    return Series(f"1.2.3.{abs(hash(desc)) % 1000}", "1.2", files=[f"{desc}/{i}" for i in range(20)], info=base | info)


@pytest.mark.parametrize("desc,info,expect", [
    ("t1_mprage_sag", {}, "t1"),
    ("AX T1 SE", {}, "t1"),
    ("T1 AX POST GD", {}, "t1ce"),
    ("AX FLAIR", {}, "flair"),
    ("t2_tse_tra", {}, "t2"),
    ("T2* GRE", {"RepetitionTime": 600, "EchoTime": 20, "ScanningSequence": "GR"}, "other"),  # not T2, nor T1
    ("ep2d_diff_mddw", {"RepetitionTime": 500, "EchoTime": 20}, "other"),
    ("Sequence 3", {"RepetitionTime": 500, "EchoTime": 12}, "t1"),
    ("Sequence 4", {"RepetitionTime": 4000, "EchoTime": 100}, "t2"),
    ("Sequence 5", {"RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}, "flair"),
    ("Sequence 6", {"RepetitionTime": 2000, "EchoTime": 30, "ScanningSequence": ["EP"]}, None),
])
def test_contrast_reading(desc, info, expect):
    assert contrast(_series(desc, **info))[0] == expect


def test_selection_prefers_named_series_and_never_guesses():
    from aldm.dicom.index import Study

    study = Study("1.2", [_series("3-plane loc"), _series("AX T2"), _series("MPRAGE"),
                          _series("gre_field_mapping", RepetitionTime=488, EchoTime=7)])
    c = choose(study, "t1", None)
    assert c.series.description == "MPRAGE" and "names T1" in c.reason
    assert any("localizer" in x for x in c.candidates)
    with pytest.raises(InputError, match="no clear FLAIR series.*MPRAGE"):
        choose(study, "flair", None)
    study.series.append(_series("T1 AX SE"))
    with pytest.raises(InputError, match="2 series read as T1"):
        choose(study, "t1", None)
    assert choose(study, "t1", "t1 ax*").series.description == "T1 AX SE"
    with pytest.raises(InputError, match="2 series match --source-series 'ax'"):
        choose(study, "t1", "ax")  # "AX T2" and "T1 AX SE"


def test_real_study_selection_picks_the_mprage():
    study = need(DATA / "dicom" / "trio_b17")
    _, chosen = open_input(study, "t1", None)
    assert chosen.series.description == "t1_MPRAGEcr_noGRAPPA" and len(chosen.series.files) == 176
    assert sum("field map" in c for c in chosen.candidates) == 2


# ------------------------------------------------------------------------------ bad DICOM, one line each

def _four_d(d: Path) -> Path:
    _t1_series(d / "s", shape=(24, 20, 6))
    for f in sorted((d / "s").glob("*.dcm")):  # a second echo at every position
        ds = pydicom.dcmread(f)
        ds.EchoNumbers, ds.SOPInstanceUID = 2, pydicom.uid.generate_uid()
        ds.save_as(f.with_name("e2_" + f.name))
        ds = pydicom.dcmread(f)
        ds.EchoNumbers = 1
        ds.save_as(f)
    return d / "s"


def _truncated(d: Path) -> Path:
    _t1_series(d / "s", shape=(24, 20, 6))
    f = sorted((d / "s").glob("*.dcm"))[3]
    f.write_bytes(f.read_bytes()[:-500])
    return d / "s"


def _non_image(d: Path) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    (d / "sr").mkdir()
    ds.save_as(d / "sr" / "report.dcm", enforce_file_format=True)
    return d / "sr"


def _two_t1(d: Path) -> Path:
    _t1_series(d / "a", seed=1, description="T1 AX")
    _t1_series(d / "b", seed=2, description="T1 SAG")
    for f in (d / "b").glob("*.dcm"):  # one study, both series in one folder
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = pydicom.dcmread(next((d / "a").glob("*.dcm"))).StudyInstanceUID
        ds.save_as(d / "a" / ("b_" + f.name))
    return d / "a"


BAD = {
    "missing_slice": (lambda d: _unzip(DICOM_DATA / "d2n_missing_slice.zip", d / "s"), ["--source-series", "*"],
                      "1 slice(s) missing"),
    "mixed_orientation": (lambda d: _unzip(DICOM_DATA / "d2n_mixed_orientation.zip", d / "s"),
                          ["--source-series", "*"], "mixed slice orientations"),
    "four_d": (_four_d, [], "4-D series (2 values of echo number"),
    "truncated": (_truncated, [], "truncated pixel data"),
    "non_image": (_non_image, [], "holds no DICOM image series (1 non-image object"),
    "no_t1": (lambda d: EPI, [], "no clear T1 series"),
    "two_t1_in_one_folder": (_two_t1, [], "2 series read as T1"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_dicom_is_one_line(tiny_export, tmp_path, kind):
    make, extra, expect = BAD[kind]
    src = make(tmp_path)
    out = tmp_path / "out"
    line = _one_error_line(_run([*INFER, src, "--out", out, "--model", tiny_export, *FAST, *extra]), expect)
    if kind == "no_t1":
        assert "Zugfahrt" in line and "EPI" in line  # the candidates are listed
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_batch_of_studies_fails_the_bad_ones_and_converts_the_good(tiny_export, tmp_path):
    root = tmp_path / "pacs"
    _t1_series(root / "good" / "t1", seed=3)
    _four_d(root / "fourd")
    _truncated(root / "trunc")
    _unzip(EPI, root / "epi")
    out = tmp_path / "out"
    res = _run([*INFER, "--batch", root, "--out", out, "--model", tiny_export, *FAST, "--dicom-out"])
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    cases = {c["id"]: c for c in json.loads((out / "aldm_report.json").read_text())["cases"]}
    assert cases["good/t1/T1_AX_SE"]["status"] == "done"
    assert "T1 AX SE" in cases["good/t1/T1_AX_SE"]["reason"] and "names T1" in cases["good/t1/T1_AX_SE"]["reason"]
    reasons = {k: c["reason"] for k, c in cases.items() if c["status"] == "failed"}
    assert len(reasons) == 3, cases
    assert any("4-D series" in r for r in reasons.values())
    assert any("truncated pixel data" in r for r in reasons.values())
    assert any("no clear T1" in r and "Zugfahrt" in r for r in reasons.values())
    nii = out / "good" / "t1" / "T1_AX_SE_t2.nii.gz"
    side = json.loads((out / "good" / "t1" / "T1_AX_SE_t2.json").read_text())
    assert side["dicom_source"]["series_description"] == "T1 AX SE"
    assert side["dicom_out"]["folder"] == "T1_AX_SE_t2_dicom"
    assert nib.load(str(nii)).shape == (40, 36, 20)
    assert len(list((out / "good" / "t1" / "T1_AX_SE_t2_dicom").glob("*.dcm"))) == 20
    # a rerun skips the finished case (its DICOM series is part of it)
    res = _run([*INFER, "--batch", root, "--out", out, "--model", tiny_export, *FAST, "--dicom-out"])
    cases = {c["id"]: c for c in json.loads((out / "aldm_report.json").read_text())["cases"]}
    assert cases["good/t1/T1_AX_SE"]["status"] == "skipped"


def test_zip_of_a_study_indexed_and_named_by_series(tiny_export, tmp_path):
    _t1_series(tmp_path / "st" / "SER1", description="T1/AX: SE")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "st").rglob("*.dcm")):
            z.write(f, f.relative_to(tmp_path).as_posix())
        z.writestr("st/DICOMDIR.txt", "not dicom")
    out = tmp_path / "out"
    res = _run([*INFER, archive, "--out", out, "--model", tiny_export, *FAST])
    assert res.returncode == 0, res.stderr
    assert (out / "T1_AX_SE_t2.nii.gz").is_file()  # sanitised SeriesDescription
    res = _run([*INFER, "--batch", archive, "--out", tmp_path / "b", "--model", tiny_export, *FAST])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "st" / "SER1" / "T1_AX_SE_t2.nii.gz").is_file()


# ------------------------------------------------------------------------------ end to end, --dicom-out

def _check_derived(folder: Path, source_files: list[Path], target: str) -> None:
    """The attributes issue 20 lists for a derived series, slice by slice against its source."""
    src = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in source_files),
                 key=lambda d: int(d.InstanceNumber))
    by_uid = {d.SOPInstanceUID: d for d in src}
    out = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    assert len(out) == len(src)
    series_uids = {d.SeriesInstanceUID for d in out}
    assert len(series_uids) == 1 and series_uids.isdisjoint({d.SeriesInstanceUID for d in src})
    assert len({d.SOPInstanceUID for d in out}) == len(out)
    for d in out:
        for uid in (d.SOPInstanceUID, d.SeriesInstanceUID):
            assert uid.is_valid and uid.startswith(UID_ROOTS) and uid not in by_uid
        assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and d.Modality == "MR"
        assert d.StudyInstanceUID == src[0].StudyInstanceUID and d.FrameOfReferenceUID == src[0].FrameOfReferenceUID
        assert list(d.ImageType) == ["DERIVED", "SECONDARY"] and d[0x0008, 0x001C].value == "YES"
        assert "SYNTHETIC" in d.SeriesDescription and "NOT FOR DIAGNOSIS" in d.SeriesDescription
        assert target.upper() in d.SeriesDescription
        assert d.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
        s = by_uid[d.SourceImageSequence[0].ReferencedSOPInstanceUID]  # the slice it replaces
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert np.allclose([float(v) for v in d[key].value], [float(v) for v in s[key].value], atol=1e-6)
        assert (d.Rows, d.Columns) == (s.Rows, s.Columns)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            assert str(d.get(key, "")) == str(s.get(key, ""))
        assert d.Manufacturer == "aldm" and d.SoftwareVersions.startswith("aldm ")
        assert "sha256" in d.DerivationDescription
        assert d.RescaleSlope is not None and d.WindowWidth > 0
        for key in ("RepetitionTime", "InversionTime", "FlipAngle", "SequenceName"):
            assert key not in d  # acquisition parameters are not copied
        assert d.EchoTime is None
        d.pixel_array  # decodes


def test_real_series_end_to_end_with_skull_strip_and_dicom_out(tiny_export, tmp_path):
    series = _unzip(EPI, tmp_path / "in") / "DICOM"
    out = tmp_path / "out"
    res = _run([*INFER, series, "--out", out, "--model", tiny_export, "--targets", "t2,flair", "--steps", "5",
                "--seed", "1", "--source-series", "Zugfahrt", "--skull-strip", "--dicom-out"])
    assert res.returncode == 0, res.stderr
    assert "Zugfahrt" in res.stderr and "--source-series" in res.stderr  # which series, and why
    ref = _dicom2nifti(series, tmp_path / "ref.nii.gz")
    for target in ("t2", "flair"):
        img = nib.load(str(out / f"Zugfahrt_{target}.nii.gz"))
        a, aff_a = _canonical(np.asarray(img.dataobj), img.affine)
        b, aff_b = _canonical(ref.get_fdata(), ref.affine)
        assert a.shape == b.shape
        assert np.abs(_corners(a.shape, aff_a) - _corners(b.shape, aff_b)).max() < 1e-4  # overlays the series
        assert 0 < (a > 0).mean() < (b > 0).mean()  # skull stripped: less than the raw series' support
        side = json.loads((out / f"Zugfahrt_{target}.json").read_text())
        assert side["dicom_source"]["series_number"] == 15
        dicom_dir = out / side["dicom_out"]["folder"]
        _check_derived(dicom_dir, sorted(series.glob("*.dcm")), target)
        # the derived series reads back on the same grid with the NIfTI's voxels (within the uint16 step)
        index, chosen = open_input(dicom_dir, "t1", "*")
        back = load(chosen, chosen.series.files, "d", index, max_voxels=10**9)
        c, aff_c = _canonical(back.data, back.affine)
        assert np.abs(aff_c - aff_a).max() < 1e-4
        assert np.abs(c - a).max() <= float(pydicom.dcmread(next(dicom_dir.glob("*.dcm"))).RescaleSlope)
    assert (out / "Zugfahrt_brainmask.nii.gz").is_file()


@pytest.mark.slow  # ROBEX on a 256x256x176 MPRAGE: minutes on 2 cores
def test_real_t1_study_end_to_end(tiny_export, tmp_path):
    """A real Siemens study (T1 MPRAGE + two field maps): the MPRAGE is chosen and translated."""
    study = need(DATA / "dicom" / "trio_b17")
    out = tmp_path / "out"
    res = _run([*INFER, study, "--out", out, "--model", tiny_export, *FAST, "--skull-strip", "--dicom-out"])
    assert res.returncode == 0, res.stderr
    img = nib.load(str(out / "t1_MPRAGEcr_noGRAPPA_t2.nii.gz"))
    ref = _dicom2nifti(study / "t1_MPRAGEcr_noGRAPPA_19", tmp_path / "ref.nii.gz")
    a, aff_a = _canonical(np.asarray(img.dataobj), img.affine)
    b, aff_b = _canonical(ref.get_fdata(), ref.affine)
    assert a.shape == b.shape and np.abs(_corners(a.shape, aff_a) - _corners(b.shape, aff_b)).max() < 1e-4
    _check_derived(out / "t1_MPRAGEcr_noGRAPPA_t2_dicom", sorted((study / "t1_MPRAGEcr_noGRAPPA_19").glob("*.dcm")),
                   "t2")


# ------------------------------------------------------------------------------ the extra

BLOCK_PYDICOM = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
sys.meta_path.insert(0, _Block())
from aldm.cli.infer import app
sys.argv = ["aldm-infer", *sys.argv[1:]]
try:
    app()
finally:
    assert not any(m == "pydicom" or m.startswith("pydicom.") for m in sys.modules)
"""


def test_without_pydicom_nifti_works_and_dicom_names_the_extra(tiny_export, tmp_path):
    from conftest import write_nifti

    nii = write_nifti(tmp_path / "a.nii.gz", synthetic_volume())
    ok = _run([sys.executable, "-c", BLOCK_PYDICOM, nii, "--out", tmp_path / "o", "--model", tiny_export, *FAST])
    assert ok.returncode == 0 and (tmp_path / "o" / "a_t2.nii.gz").is_file(), ok.stderr
    series = _unzip(EPI, tmp_path / "in")
    bad = _run([sys.executable, "-c", BLOCK_PYDICOM, series, "--out", tmp_path / "o", "--model", tiny_export, *FAST])
    _one_error_line(bad, "pip install 'aldm[dicom]'")
