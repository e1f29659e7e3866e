"""Batch-report thumbnails: the preview contact sheet (aldm.preview.sheet) of one case, small.

Built from the files on disk (the source and each output, which share the source's grid), so the
same code serves a local batch, a Ray or `--server` batch and `aldm report` on a finished folder.
Every volume is turned to RAS by axis swaps and flips only (no interpolation), cropped to the
source's foreground box and sampled nearest-neighbour onto square pixels of one size, at most
`PX` across; the sheet then puts the same slice positions in every column.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from aldm.atomic import write_bytes
from aldm.preview import sheet

PX = 96  # longest side of a tile
QUALITY = 80  # JPEG: ~20 kB for a 3-column BraTS sheet (a PNG of it: 35 kB); every browser reads it
MARGIN = 2  # voxels kept around the foreground box


def ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data, voxel sizes in mm), axes swapped and flipped to RAS (X, Y, Z)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    out = nib.orientations.apply_orientation(data, ornt)
    return out, zooms[np.argsort(ornt[:, 0])]


def foreground_box(v: np.ndarray) -> tuple[slice, ...]:
    mask = v > v.min()
    if not mask.any():
        return tuple(slice(0, s) for s in v.shape)
    box = []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(0, idx[0] - MARGIN), min(v.shape[ax], idx[-1] + 1 + MARGIN)))
    return tuple(box)


def square_pixels(v: np.ndarray, zooms: np.ndarray, px: int = PX) -> np.ndarray:
    """Nearest-neighbour sample of `v` on an isotropic grid whose longest side is `px` voxels."""
    extent = np.array(v.shape) * zooms  # mm
    step = float(extent.max()) / px
    idx = [np.minimum(((np.arange(max(1, round(e / step))) + 0.5) * step / z).astype(int), s - 1)
           for e, z, s in zip(extent, zooms, v.shape)]
    return v[np.ix_(*idx)]


def small_volumes(volumes: Mapping[str, tuple[np.ndarray, np.ndarray]], px: int = PX) -> dict[str, np.ndarray]:
    """name -> (data, affine) on one grid, the first one the source -> small RAS arrays, one box."""
    turned = {k: ras(np.asarray(d, np.float32), a) for k, (d, a) in volumes.items()}
    first = next(iter(turned.values()))
    box = foreground_box(first[0])
    return {k: square_pixels(v[box], z, px) for k, (v, z) in turned.items()}


def thumbnail_bytes(volumes: Mapping[str, tuple[np.ndarray, np.ndarray]], px: int = PX) -> bytes:
    """The labelled thumbnail of one case, as JPEG bytes. `volumes`: column label -> (data, affine),
    all on one grid, the source (or else the first output) first."""
    buf = io.BytesIO()
    sheet(small_volumes(volumes, px), gap=2).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def case_thumbnail(path: Path, volumes: Mapping[str, tuple[np.ndarray, np.ndarray]], px: int = PX) -> Path:
    """`thumbnail_bytes` written to `path`, atomically."""
    return write_bytes(path, thumbnail_bytes(volumes, px))
