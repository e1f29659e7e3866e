"""NIfTI in and out: validated loading with one-line errors, atomic writes in the source's space.

An image is (data, affine, header). Outputs reuse the source's header: same grid, same affine,
qform/sform and their codes; only the data type becomes float32.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aldm.errors import AldmError, InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    path: Path
    data: np.ndarray  # (X, Y, Z) float32, scaling applied
    affine: np.ndarray  # 4x4
    header: object  # nibabel Nifti1Header / Nifti2Header
    shape: tuple[int, ...]  # the file's shape (a singleton 4th axis included)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_volume(path: str | Path) -> Volume:
    """Load and validate one 3-D NIfTI volume; every problem is an InputError naming the file."""
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
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except InputError:
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    except ImageFileError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({str(exc).splitlines()[0] or type(exc).__name__})") from None
    shape = tuple(int(s) for s in img.shape)
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
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    tmp = path.with_name(f".{stem(path)}.partial-{os.getpid()}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise AldmError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
