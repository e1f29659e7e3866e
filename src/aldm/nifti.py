"""NIfTI in and out: validated loading with one-line errors, atomic writes in the source's space.

An image is (data, affine, header). Outputs reuse the source's header: same grid, same affine,
qform/sform and their codes; only the data type becomes float32.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aldm.atomic import atomic_path
from aldm.errors import InputError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_VOXELS = 1024**3  # refused before any data is read (a header can claim any size); --max-voxels


@dataclass
class Volume:
    path: Path
    data: np.ndarray  # (X, Y, Z) float32, scaling applied
    affine: np.ndarray  # 4x4
    header: object  # nibabel Nifti1Header / Nifti2Header
    shape: tuple[int, ...]  # the file's shape (a singleton 4th axis included)
    brain_mask: np.ndarray | None = None  # set by --skull-strip: data outside it was zeroed
    dicom: object | None = None  # aldm.dicom.source.DicomSeries when read from a DICOM series


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path(output: Path) -> Path:
    """The JSON sidecar beside an aldm output: `<stem>.json`."""
    return output.with_name(stem(output) + ".json")


def load_volume(path: str | Path, *, max_voxels: int = MAX_VOXELS) -> Volume:
    """Load and validate one 3-D NIfTI volume; every problem is an InputError naming the file.

    The header is checked first (dimensions, voxel count, a usable affine), so a file that
    claims a huge grid is refused before its data is read."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a NIfTI file")
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{path}: not a NIfTI image (nibabel reads it as {type(img).__name__})")
        shape = tuple(int(s) for s in img.shape)
        _check_header(path, shape, np.asarray(img.affine, np.float64), max_voxels)
        dtype = np.dtype(img.get_data_dtype())
        if dtype.kind not in "biuf":
            raise InputError(f"{path}: voxels of type {dtype} (complex or RGB); aldm needs real-valued intensities")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except InputError:
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip data ({one_line(exc)})") from None
    except ImageFileError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({one_line(exc)})") from None
    except MemoryError:
        raise InputError(f"{path}: too large to load into memory") from None
    except Exception as exc:  # nibabel raises many kinds on malformed headers; none is a crash
        raise InputError(f"{path}: unreadable ({type(exc).__name__}: {one_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        what = {2: "a 2-D image", 4: f"a 4-D series of {shape[-1]} volumes"}.get(data.ndim, f"{data.ndim}-D")
        raise InputError(f"{path}: is {what} (shape {'x'.join(map(str, shape))}); "
                         "aldm needs one 3-D volume")
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        raise InputError(f"{path}: contains {bad} NaN or Inf voxels")
    if not data.any():
        raise InputError(f"{path}: every voxel is 0")
    return Volume(path, data, np.asarray(img.affine, np.float64), img.header, shape)


def _check_header(path: Path, shape: tuple[int, ...], affine: np.ndarray, max_voxels: int) -> None:
    """Refuse what cannot be a volume before reading data: empty or huge grids, a broken affine."""
    if not shape or min(shape) < 1:
        raise InputError(f"{path}: header declares an empty grid ({'x'.join(map(str, shape))})")
    n = int(np.prod(np.asarray(shape, dtype=object)))
    if n > max_voxels:
        raise InputError(f"{path}: header declares {'x'.join(map(str, shape))} = {n:,} voxels, over the "
                         f"limit of {max_voxels:,} (raise it with --max-voxels)")
    m = affine[:3, :3]
    norms = np.sqrt((m**2).sum(axis=0)) if np.isfinite(affine).all() else np.zeros(3)
    if not (norms > 0).all() or abs(np.linalg.det(m)) <= 1e-6 * float(np.prod(norms)):
        raise InputError(f"{path}: the header's affine (sform/qform) is degenerate "
                         "(a zero or collinear voxel axis, or NaN); fix the header, e.g. reset the sform")


def save_like(source: Volume, data: np.ndarray, path: str | Path, description: str = "") -> Path:
    """Write `data` (source grid) as float32 NIfTI with the source's header, atomically."""
    import nibabel as nib

    path = Path(path)
    arr = np.asarray(data, np.float32).reshape(source.shape)
    hdr = source.header.copy()
    hdr.set_data_dtype(np.float32)
    cls = nib.Nifti2Image if isinstance(source.header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(arr, source.affine, header=hdr)
    img.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
    img.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    if description:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
