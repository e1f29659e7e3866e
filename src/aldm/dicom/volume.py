"""One DICOM series -> one checked 3-D volume (data, RAS affine), or a one-line reason why not.

Slices (files, or frames of a multi-frame object with per-frame positions) are sorted by their
position along the slice normal (row x column direction cosines). The affine maps voxel (i, j, k)
= (column, row, slice) to the patient's LPS millimetres from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, the slice axis being the step between the first and
last positions, and is flipped to RAS (x, y negated) for NIfTI. Refused: slices of different
sizes, orientations or pixel spacings, repeated positions (echoes, time points: 4-D), missing
slices or uneven steps beyond SPACING_TOL, slices off one line, a single slice, colour images.
RescaleSlope / RescaleIntercept are applied per slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aldm.dicom import pydicom
from aldm.errors import InputError, one_line

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENT_TOL = 1e-4  # direction cosines
SPACING_TOL = 0.01  # mm, plus 1 % of the step: slice steps and in-plane spacings


@dataclass
class Slice:
    position: np.ndarray  # ImagePositionPatient (3,), LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: np.ndarray  # PixelSpacing (row spacing, column spacing) mm
    slope: float
    intercept: float
    file: str
    frame: int | None  # frame index of a multi-frame object; None: the file's only image
    dataset: object  # the header (pixel data dropped once read)
    varies: dict  # echo / time identifiers, to name what repeats at one position


def _frame_value(ds, i: int, group: str, attr: str):
    """A multi-frame attribute: the per-frame functional group first, then the shared one."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", i), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq is not None and len(seq) > idx and group in seq[idx] and len(seq[idx][group].value):
            item = seq[idx][group][0]
            if attr in item:
                return item.get(attr)
    return None


def slices_of(ds, file: str) -> list[Slice]:
    """The slices of one header: one for a classic image, one per frame for a multi-frame one."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if frames > 1:
            raise InputError(f"{Path(file).name}: a multi-frame object of {frames} frames without per-frame positions; "
                             "it cannot be stacked into a volume")
        return [_classic(ds, file)]
    out = []
    for i in range(frames):
        pos = _frame_value(ds, i, "PlanePositionSequence", "ImagePositionPatient")
        ori = _frame_value(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _frame_value(ds, i, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or ori is None or spacing is None:
            raise InputError(f"{Path(file).name}: frame {i + 1} of {frames} has no position, orientation or pixel "
                             "spacing; it cannot be stacked into a volume")
        slope = _frame_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _frame_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        varies = {"echo time": _frame_value(ds, i, "MREchoSequence", "EffectiveEchoTime"),
                  "temporal position": _frame_value(ds, i, "FrameContentSequence", "TemporalPositionIndex")}
        out.append(Slice(_vec(pos, 3, file, "position"), _vec(ori, 6, file, "orientation"),
                         _vec(spacing, 2, file, "pixel spacing"), float(slope if slope is not None else 1),
                         float(inter if inter is not None else 0), file, i, ds, varies))
    return out


def _classic(ds, file: str) -> Slice:
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if key not in ds or ds.get(key) in (None, ""):
            raise InputError(f"{Path(file).name}: no {key}; a slice without it cannot be placed in a volume")
    varies = {"echo number": ds.get("EchoNumbers"), "echo time": ds.get("EchoTime"),
              "temporal position": ds.get("TemporalPositionIdentifier"),
              "acquisition": ds.get("AcquisitionNumber"), "trigger time": ds.get("TriggerTime"),
              "b-value": ds.get("DiffusionBValue")}
    return Slice(_vec(ds.ImagePositionPatient, 3, file, "position"),
                 _vec(ds.ImageOrientationPatient, 6, file, "orientation"),
                 _vec(ds.PixelSpacing, 2, file, "pixel spacing"),
                 float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0),
                 file, None, ds, {k: (str(v) if v is not None else None) for k, v in varies.items()})


def _vec(value, n: int, file: str, what: str) -> np.ndarray:
    try:
        v = np.asarray([float(x) for x in value], np.float64)
    except (TypeError, ValueError):
        v = np.zeros(0)
    if v.shape != (n,) or not np.isfinite(v).all():
        raise InputError(f"{Path(file).name}: unusable {what} {value!r}")
    return v


def geometry(slices: list[Slice], label: str) -> tuple[list[Slice], np.ndarray]:
    """(slices sorted along the normal, RAS affine); an InputError for what is not one volume."""
    if len(slices) < 2:
        raise InputError(f"{label}: a single slice is a 2-D image, not a volume")
    first = slices[0]
    shapes = {(int(s.dataset.Rows), int(s.dataset.Columns)) for s in slices}
    if len(shapes) > 1:
        raise InputError(f"{label}: slices of different sizes {sorted(shapes)}; not one volume")
    for s in slices:
        if np.abs(s.orientation - first.orientation).max() > ORIENT_TOL:
            raise InputError(f"{label}: mixed slice orientations ({_fmt(first.orientation)} and "
                             f"{_fmt(s.orientation)}); not one volume")
        if np.abs(s.spacing - first.spacing).max() > SPACING_TOL:
            raise InputError(f"{label}: mixed pixel spacings ({_fmt(first.spacing)} and {_fmt(s.spacing)} mm)")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(f"{label}: ImageOrientationPatient {_fmt(first.orientation)} is not two "
                         "orthogonal unit vectors")
    depth = np.array([s.position @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    slices, depth = [slices[i] for i in order], depth[order]
    _check_repeats(slices, depth, label)
    steps = np.diff(depth)
    step = float(np.median(steps))
    tol = SPACING_TOL + 0.01 * step
    bad = np.flatnonzero(np.abs(steps - step) > tol)
    if bad.size:
        i = int(bad[0])
        missing = steps[i] / step - 1
        if abs(missing - round(missing)) * step <= tol and round(missing) >= 1:
            raise InputError(f"{label}: {round(missing)} slice(s) missing between positions {depth[i]:.2f} and "
                             f"{depth[i + 1]:.2f} mm (the series steps {step:.3f} mm)")
        raise InputError(f"{label}: inconsistent slice spacing ({steps.min():.3f} to {steps.max():.3f} mm, "
                         f"tolerance {tol:.3f} mm)")
    n = len(slices)
    slice_vec = (slices[-1].position - slices[0].position) / (n - 1)
    line = slices[0].position + np.outer(np.arange(n), slice_vec)
    off = np.abs(np.array([s.position for s in slices]) - line).max()
    if off > tol:
        raise InputError(f"{label}: slice positions do not lie on one line (off by {off:.3f} mm)")
    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]  # i: along a row (column index), PixelSpacing[1]
    lps[:3, 1] = col * first.spacing[0]  # j: down a column (row index), PixelSpacing[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = slices[0].position
    return slices, LPS_TO_RAS @ lps


def _check_repeats(slices: list[Slice], depth: np.ndarray, label: str) -> None:
    """Several slices at one position: several echoes, time points or b-values (a 4-D series)."""
    groups = np.round(depth / 1e-3).astype(np.int64)
    uniq, counts = np.unique(groups, return_counts=True)
    if counts.max() == 1:
        return
    what = "repeated slices"
    for key in slices[0].varies:
        values = {s.varies.get(key) for s in slices}
        if len(values) > 1:
            what = f"{len(values)} values of {key}"
            break
    raise InputError(f"{label}: a 4-D series ({what}; up to {counts.max()} slices at one position, "
                     f"{len(uniq)} positions); aldm needs one 3-D volume")


def _fmt(v: np.ndarray) -> str:
    return "/".join(f"{x:.4g}" for x in v)


def read_series(files: list[str], label: str, *, max_voxels: int) -> tuple[np.ndarray, np.ndarray, list[Slice]]:
    """(data (X, Y, Z) float32 with rescale applied, RAS affine, sorted slices) of one series."""
    pd = pydicom()
    slices: list[Slice] = []
    for f in files:
        try:
            ds = pd.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"{label}: {Path(f).name}: unreadable DICOM ({type(exc).__name__}: {one_line(exc)})") from None
        slices.extend(slices_of(ds, f))
    slices, affine = geometry(slices, label)
    rows, cols = int(slices[0].dataset.Rows), int(slices[0].dataset.Columns)
    n = rows * cols * len(slices)
    if n > max_voxels:
        raise InputError(f"{label}: {cols}x{rows}x{len(slices)} = {n:,} voxels, over the limit of "
                         f"{max_voxels:,} (raise it with --max-voxels)")
    data = np.empty((cols, rows, len(slices)), np.float32)  # (X = column, Y = row, Z = slice)
    pixels: dict[str, np.ndarray] = {}
    for k, s in enumerate(slices):
        if s.file not in pixels:
            pixels = {s.file: _pixels(s.file, label)}  # one multi-frame object at a time
        arr = pixels[s.file]
        arr = arr[s.frame] if s.frame is not None else arr
        if arr.shape != (rows, cols):
            raise InputError(f"{label}: {Path(s.file).name}: pixel data of shape {arr.shape}, expected {rows}x{cols} "
                             "(colour or multi-frame where one grey slice was expected)")
        data[:, :, k] = (arr.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)).T
    return data, affine, slices


def _pixels(path: str, label: str) -> np.ndarray:
    name, ds = Path(path).name, None
    try:
        ds = pydicom().dcmread(path)
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise InputError(f"{label}: {name}: a colour image ({ds.get('PhotometricInterpretation')}); "
                             "aldm needs grey-scale MR")
        arr = ds.pixel_array
    except InputError:
        raise
    except Exception as exc:  # truncated pixel data, a codec pydicom lacks, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        how = f" (transfer syntax {ts.name})" if ts is not None and ts.is_compressed else ""
        raise InputError(f"{label}: {name}: unreadable or truncated pixel data{how} "
                         f"({type(exc).__name__}: {one_line(exc)})") from None
    if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
        arr = arr.max() - arr
    return np.asarray(arr)
