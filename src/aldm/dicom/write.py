"""A volume as a DICOM MR series: classic MR Image Storage, one file per slice, written whole.

`write_derived` writes a synthetic series over its source series, the way a viewer overlays it:
same StudyInstanceUID, FrameOfReferenceUID and slice geometry (each slice's position,
orientation, spacing and thickness copied from the source slice it replaces), new Series and
SOP Instance UIDs, ImageType DERIVED\\SECONDARY, Synthetic Data = YES, a SeriesDescription that
says it is synthetic and not for diagnosis, references to the source series and slices, aldm as
the equipment (version, model hash), rescale and window set. Patient and study data are copied
from the source, never invented; acquisition parameters (TE, TR, TI, flip angle...) are not.
`write_volume` writes any NIfTI volume (data, RAS affine) as a new series of its own (tests: the
round trip NIfTI -> DICOM -> NIfTI).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from aldm.atomic import atomic_dir
from aldm.dicom import pydicom
from aldm.dicom.volume import LPS_TO_RAS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PATIENT_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                 "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "OtherPatientIDsSequence",
                 "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                 "AccessionNumber", "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator",
                 "PatientPosition", "BodyPartExamined")
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation")
NOT_FOR_DIAGNOSIS = "SYNTHETIC - NOT FOR DIAGNOSIS"


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) as precise as it can be."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def encode(data: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """(stored values, slope, intercept, pixel representation): integers in the int16/uint16
    range are stored exactly; anything else is scaled onto uint16's full range."""
    finite = np.asarray(data, np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if np.array_equal(finite, np.round(finite)):
        if lo >= 0 and hi <= 65535:
            return finite.astype(np.uint16), 1.0, 0.0, 0
        if lo >= -32768 and hi <= 32767:
            return finite.astype(np.int16), 1.0, 0.0, 1
    intercept = min(lo, 0.0)
    slope = (hi - intercept) / 65535 if hi > intercept else 1.0
    return np.round((finite - intercept) / slope).astype(np.uint16), slope, intercept, 0


def window(data: np.ndarray) -> tuple[float, float]:
    """(center, width) from the 0.5 / 99.5 percentiles of the non-zero voxels."""
    fg = data[data != 0]
    lo, hi = np.percentile(fg, [0.5, 99.5]) if fg.size else (0.0, 1.0)
    return (lo + hi) / 2, max(hi - lo, 1e-6)


def _now() -> tuple[str, str]:
    t = datetime.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")


def _write(folder: Path, data: np.ndarray, geometry: list[dict], common, overwrite: bool) -> Path:
    """One file per slice k of data (X, Y, Z): pixel rows are data[:, :, k].T."""
    pd = pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    stored, slope, intercept, signed = encode(data)
    center, width = window(data)
    date, time = _now()
    with atomic_dir(folder, overwrite) as tmp:
        for k, geo in enumerate(geometry):
            ds = pd.Dataset()
            ds.update(common)
            uid = generate_uid()
            ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, uid
            ds.InstanceNumber = k + 1
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
            ds.ContentDate, ds.ContentTime = date, time
            for key, value in geo.items():
                setattr(ds, key, value)
            pixels = np.ascontiguousarray(stored[:, :, k].T)  # (rows, columns)
            ds.Rows, ds.Columns = pixels.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
            ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
            ds.PixelData = pixels.tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return folder


def _series_common(description: str, number: int, derivation: str, equipment: tuple[str, str, str]):
    """Series-level attributes every aldm series carries."""
    from pydicom.uid import generate_uid

    ds = pydicom().Dataset()
    date, time = _now()
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SyntheticData = "YES"
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = derivation[:1024]
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = equipment
    ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"  # research mode: no acquisition took place
    for key in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "PatientOrientation",
                "Laterality"):
        setattr(ds, key, None)  # type 2: present, empty (acquisition parameters are not copied)
    return ds


def write_derived(data: np.ndarray, source, folder: Path, *, target: str, aldm_version: str,
                  model_sha256: str, number_offset: int = 1000, overwrite: bool = False) -> tuple[Path, str]:
    """(folder, SeriesInstanceUID): a synthetic `target` series over `source` (a DicomSeries
    whose slices were read)."""
    pd = pydicom()
    slices = source.slices
    first = slices[0].dataset
    derivation = (f"aldm {aldm_version} translated series {source.series.uid} "
                  f"('{source.series.description}') into a synthetic {target.upper()} with model "
                  f"sha256 {model_sha256}. {NOT_FOR_DIAGNOSIS}.")
    src_number = int(source.series.info.get("SeriesNumber") or 0)
    common = _series_common(f"{target.upper()} {NOT_FOR_DIAGNOSIS} aldm", src_number + number_offset, derivation,
                            ("aldm", f"aldm model {model_sha256[:12]}", f"aldm {aldm_version}"))
    for key in PATIENT_STUDY:
        if key in first:
            common[key] = first[key]
    ref = pd.Dataset()
    ref.SeriesInstanceUID = source.series.uid
    ref.ReferencedInstanceSequence = [_ref(s.dataset) for s in slices]
    common.ReferencedSeriesSequence = [ref]
    geometry = []
    for s in slices:
        geo = {k: s.dataset[k].value for k in GEOMETRY if k in s.dataset}
        if s.frame is not None:  # a frame of a multi-frame source: its own plane
            geo |= {"ImagePositionPatient": [_ds(v) for v in s.position],
                    "ImageOrientationPatient": [_ds(v) for v in s.orientation],
                    "PixelSpacing": [_ds(v) for v in s.spacing]}
        geo["SourceImageSequence"] = [_ref(s.dataset, s.frame)]
        geometry.append(geo)
    return _write(folder, data, geometry, common, overwrite), str(common.SeriesInstanceUID)


def _ref(ds, frame: int | None = None):
    item = pydicom().Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def write_volume(data: np.ndarray, affine: np.ndarray, folder: Path, *, description: str,
                 aldm_version: str, overwrite: bool = False) -> Path:
    """Any volume (X, Y, Z) with its RAS affine as a new series in a new study and frame of
    reference; no patient data (none is invented: the type-2 patient attributes are empty)."""
    from pydicom.uid import generate_uid

    common = _series_common(description, 1, f"aldm {aldm_version}: written from a NIfTI volume",
                            ("aldm", "aldm", f"aldm {aldm_version}"))
    common.ImageType = ["DERIVED", "PRIMARY"]
    common.SyntheticData = "NO"
    common.StudyInstanceUID, common.FrameOfReferenceUID = generate_uid(), generate_uid()
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator"):
        setattr(common, key, None)
    lps = LPS_TO_RAS @ np.asarray(affine, np.float64)
    dx, dy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [_ds(v) for v in np.concatenate([lps[:3, 0] / dx, lps[:3, 1] / dy])]
    thickness = abs(float(np.cross(lps[:3, 0] / dx, lps[:3, 1] / dy) @ lps[:3, 2]))
    geometry = [{"ImagePositionPatient": [_ds(v) for v in lps[:3, :] @ np.array([0, 0, k, 1.0])],
                 "ImageOrientationPatient": orientation, "PixelSpacing": [_ds(dy), _ds(dx)],
                 "SliceThickness": _ds(thickness)} for k in range(data.shape[2])]
    return _write(folder, np.asarray(data), geometry, common, overwrite)
