"""Preview PNG a person can read: one labelled column per volume (the source, then each target),
one row per view (axial, coronal, sagittal), the same anatomical slice in every column.

All volumes share one grid (the model's RAS grid, 1 mm isotropic), so a slice index is the same
anatomy in every column; every tile is centred on a square canvas of the same size, so rows and
columns line up at one scale and aspect. Each volume is windowed by its own 0.5/99.5 percentiles
inside the source's foreground (outside it is black), so a dark target is not washed out by the
source's range. Text is drawn with Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from aldm.atomic import write_bytes

VIEWS = ("axial", "coronal", "sagittal")
MODALITY_LABELS = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def window(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 of `v`, 0.5/99.5 percentiles of its own values inside `mask` -> 0/255; 0 outside."""
    inside = v[mask] if mask.any() else v.ravel()
    lo, hi = np.percentile(inside, [0.5, 99.5])
    out = np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.where(mask, out, 0).astype(np.uint8)


def centre_of(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre of the mask's bounding box (the array centre if the mask is empty)."""
    if not mask.any():
        return tuple(s // 2 for s in mask.shape)  # type: ignore[return-value]
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(int((i[0] + i[-1]) // 2) for i in idx)  # type: ignore[return-value]


def ras_views(v: np.ndarray, at: tuple[int, int, int] | None = None) -> list[np.ndarray]:
    """Slices of a RAS volume (X, Y, Z) through `at`, as radiologists look at them (top = up)."""
    x, y, z = at if at is not None else tuple(s // 2 for s in v.shape)
    axial = np.rot90(v[:, :, z])  # anterior up, patient's right on the left
    coronal = np.rot90(v[:, y, :])  # superior up
    sagittal = np.fliplr(np.rot90(v[x, :, :]))  # superior up, anterior left
    return [axial, coronal, sagittal]


def _square(tile: np.ndarray, side: int) -> np.ndarray:
    h, w = tile.shape
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(tile, ((top, side - h - top), (left, side - w - left)))


def label(name: str) -> str:
    return MODALITY_LABELS.get(name.lower(), name)


def sheet(volumes: Mapping[str, np.ndarray], *, title: str = "", gap: int = 4):
    """The contact sheet as a Pillow image; the first volume is the source (its foreground masks
    and centres every column)."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(volumes)
    source = np.asarray(volumes[names[0]], np.float32)
    mask = source > source.min() + 1e-6 * max(float(np.ptp(source)), 1e-12)
    at = centre_of(mask)
    side = max(source.shape)
    font = ImageFont.load_default(size=max(12, side // 10))
    head = int(font.size * 1.6)
    left = int(font.size * 5.5)
    top = head * (2 if title else 1)
    width = left + len(names) * (side + gap)
    height = top + len(VIEWS) * (side + gap)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 2), title, fill=255, font=font)
    for c, name in enumerate(names):
        views = ras_views(window(np.asarray(volumes[name], np.float32), mask), at)
        x0 = left + c * (side + gap)
        draw.text((x0 + 4, top - head + 2), label(name), fill=255, font=font)
        for r, tile in enumerate(views):
            img.paste(Image.fromarray(_square(tile, side)), (x0, top + r * (side + gap)))
    for r, view in enumerate(VIEWS):
        draw.text((4, top + r * (side + gap) + side // 2 - font.size // 2), view, fill=255, font=font)
    return img


def preview(path: str | Path, volumes: Mapping[str, np.ndarray], *, title: str = "") -> Path:
    """Write the contact sheet of `volumes` (source first) as a PNG, atomically."""
    buf = io.BytesIO()
    sheet(volumes, title=title).save(buf, format="PNG", optimize=True)
    write_bytes(path, buf.getvalue())
    return Path(path)
