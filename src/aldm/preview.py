"""Preview PNG: mid axial, coronal and sagittal slices of the source and every output, side by side.

Written with numpy + zlib only (no plotting library on the inference path).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from aldm.atomic import write_bytes


def write_png(path: str | Path, gray: np.ndarray) -> None:
    """8-bit grayscale PNG from a 2-D uint8 array (rows top to bottom)."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in gray.astype(np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    write_bytes(path, png)  # atomic: temporary name, fsync, rename


def _to_uint8(v: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(v, [0.5, 99.5])
    return (np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def ras_views(v: np.ndarray) -> list[np.ndarray]:
    """Mid slices of a RAS volume (X, Y, Z), oriented as radiologists look at them (top = up)."""
    x, y, z = (s // 2 for s in v.shape)
    axial = np.rot90(v[:, :, z])  # anterior up
    coronal = np.rot90(v[:, y, :])  # superior up
    sagittal = np.fliplr(np.rot90(v[x, :, :]))  # superior up, anterior left
    return [axial, coronal, sagittal]


def preview(path: str | Path, volumes: Mapping[str, np.ndarray]) -> Path:
    """One row per view, one column per volume (labels are the column order: source first)."""
    cols = [[_to_uint8(s) for s in ras_views(v)] for v in volumes.values()]
    rows = []
    for r in range(3):
        height = max(c[r].shape[0] for c in cols)
        tiles = [np.pad(c[r], ((0, height - c[r].shape[0]), (0, 4))) for c in cols]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]))) for r in rows], axis=0)
    write_png(path, sheet)
    return Path(path)
