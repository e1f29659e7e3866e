"""Invertible preprocessing: every step appends a JSON-safe record; `invert` replays them LIFO.

Forward (SPEC §8.1, the official MONAI chain, plus resampling for non-1-mm inputs):
reorient to RAS -> resample to the model spacing (when it differs) -> crop to the foreground
bounding box (source > 0) -> pad / centre-crop to the model crop -> percentiles to [-1, 1].
The inverse puts a model-grid volume back onto the source's exact voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from aldm.errors import InputError
from aldm.runtime.manifest import Preprocessing

SPACING_RTOL = 1e-3  # a source axis coarser than the model's spacing by more than this is upsampled
FINER_TOLERANCE = 0.10  # an axis finer than the model's by at most this is kept (see `preprocess`)


@dataclass
class Prepared:
    x: np.ndarray  # (1, 1, H, W, D) float32 on the model grid, ~[-1, 1]
    record: list[dict[str, Any]]  # the steps taken, JSON-safe, in order
    warnings: list[str] = field(default_factory=list)
    foreground_fraction_kept: float = 1.0


# ------------------------------------------------------------------------------ orientation

def _ras_transform(affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))


def _apply_ornt(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(data, ornt))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `ornt` (axis permutation with flips)."""
    inv = np.zeros_like(ornt)
    for src, (dst, flip) in enumerate(ornt):
        inv[int(dst)] = (src, flip)
    return inv


# ------------------------------------------------------------------------------ resampling

def interp_matrix(n_coarse: int, n_fine: int) -> np.ndarray:
    """(n_fine, n_coarse) linear interpolation from a coarse to a fine grid over the same field
    of view (voxel centres aligned: fine voxel i sits at coarse index (i + 0.5) n_c / n_f - 0.5)."""
    pos = np.clip((np.arange(n_fine) + 0.5) * n_coarse / n_fine - 0.5, 0, n_coarse - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_coarse - 1)
    w = pos - lo
    m = np.zeros((n_fine, n_coarse))
    np.add.at(m, (np.arange(n_fine), lo), 1 - w)
    np.add.at(m, (np.arange(n_fine), hi), w)
    return m


def axis_resampler(n_from: int, n_to: int) -> np.ndarray:
    """(n_to, n_from) matrix taking one axis from n_from to n_to samples.

    Upsampling is linear interpolation; downsampling is its least-squares inverse (the
    pseudo-inverse of interpolating back up), so coarse -> fine -> coarse is the identity and
    fine -> coarse -> fine is the best linear-interpolable approximation.
    """
    if n_to >= n_from:
        return interp_matrix(n_from, n_to)
    return np.linalg.pinv(interp_matrix(n_to, n_from))


def resample(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample every axis of `a` to `shape`; resampling back to the old shape undoes it exactly
    for the axes that were upsampled."""
    out = np.asarray(a, np.float64)
    for axis, n_to in enumerate(shape):
        if out.shape[axis] != n_to:
            m = axis_resampler(out.shape[axis], n_to)
            out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------ forward

def preprocess(data: np.ndarray, affine: np.ndarray, pre: Preprocessing,
               finer_tolerance: float = FINER_TOLERANCE) -> Prepared:
    """A source volume (X, Y, Z) with its affine -> the model input and the record to invert it.

    Spacing policy, per axis: coarser than the model grid -> upsampled (linear interpolation,
    exactly invertible); finer by more than `finer_tolerance` -> downsampled (least squares, which
    loses detail the model grid cannot hold); finer by less -> kept, accepting a scale error of at
    most `finer_tolerance` rather than losing detail (0 resamples every differing axis).
    """
    if data.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {data.shape}")
    record: list[dict[str, Any]] = []
    warns: list[str] = []
    v = np.asarray(data, np.float32)

    ornt = _ras_transform(affine)
    record.append({"op": "reorient", "ornt": ornt.tolist(), "shape": list(v.shape)})
    v = _apply_ornt(v, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = [float(zooms[int(src)]) for src in np.argsort(ornt[:, 0])]  # RAS axis order

    ratio = np.asarray(spacing) / np.asarray(pre.spacing, np.float64)  # > 1: source coarser
    change = (ratio > 1 + SPACING_RTOL) | (ratio < 1 - max(finer_tolerance, SPACING_RTOL))
    if change.any():
        new_shape = [max(1, int(round(n * r))) if c else n for n, r, c in zip(v.shape, ratio, change)]
        record.append({"op": "resample", "shape": list(v.shape), "to_shape": new_shape,
                       "spacing": spacing, "to_spacing": [s * n / m for s, n, m in zip(spacing, v.shape, new_shape)]})
        # Least-squares downsampling leaves tiny values all over the background: keep the
        # foreground where the resampled foreground mask has weight (exact for upsampling).
        weight = resample((v > 0).astype(np.float32), new_shape)
        v = np.where(weight > 1e-4, resample(v, new_shape), np.float32(0))

    fg = v > 0
    if not fg.any():
        raise InputError("the volume has no foreground (no voxel > 0)")
    idx = np.nonzero(fg)
    start = [int(i.min()) for i in idx]
    stop = [int(i.max()) + 1 for i in idx]
    record.append({"op": "crop_foreground", "shape": list(v.shape), "start": start, "stop": stop})
    v = v[tuple(slice(a, b) for a, b in zip(start, stop))]

    crop = pre.crop_size
    before = [max(0, (c - n) // 2) for n, c in zip(v.shape, crop)]
    after = [max(0, c - n) - b for n, c, b in zip(v.shape, crop, before)]
    if any(before) or any(after):
        record.append({"op": "pad", "before": before, "after": after})
        v = np.pad(v, list(zip(before, after)))

    cstart = [n // 2 - c // 2 if n > c else 0 for n, c in zip(v.shape, crop)]
    kept = 1.0
    if any(n > c for n, c in zip(v.shape, crop)):
        window = tuple(slice(s, s + c) for s, c in zip(cstart, crop))
        total = int((v > 0).sum())
        kept = int((v[window] > 0).sum()) / max(total, 1)
        record.append({"op": "center_crop", "shape": list(v.shape), "start": cstart})
        v = v[window]
        if kept < 0.9999:
            warns.append(f"the {'x'.join(map(str, crop))} model crop cut off "
                         f"{100 * (1 - kept):.2f}% of the foreground; outputs are 0 there")

    v, step = _scale_intensity(v, pre)
    record.append(step)
    return Prepared(v[None, None], record, warns, kept)


def _scale_intensity(v: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, dict[str, Any]]:
    """0.5/99.5 percentiles of the whole model-grid volume -> [-1, 1], unclipped (float32 maths)."""
    lo_q, hi_q = pre.percentiles
    p_lo, p_hi = (float(p) for p in np.percentile(v, [lo_q, hi_q]))
    if p_hi <= p_lo:
        raise InputError("the volume has no intensity range between its percentiles "
                         f"{lo_q} and {hi_q} (constant image?)")
    b_min, b_max = pre.intensity_range
    step = {"op": "scale_intensity", "p_lo": p_lo, "p_hi": p_hi, "b_min": b_min, "b_max": b_max}
    return ((v - p_lo) / (p_hi - p_lo) * (b_max - b_min) + b_min).astype(np.float32), step


def replay(data: np.ndarray, record: list[dict[str, Any]], pre: Preprocessing) -> Prepared:
    """Apply the spatial steps of another volume's record to a co-registered volume (the official
    pipeline crops every modality with the T1's box), then scale it by its own percentiles."""
    v = np.asarray(data, np.float32)
    steps = [s for s in record if s["op"] != "scale_intensity"]
    for step in steps:
        op = step["op"]
        if op == "reorient":
            if list(v.shape) != step["shape"]:
                raise InputError(f"volume shape {v.shape} differs from the reference {step['shape']}")
            v = _apply_ornt(v, np.asarray(step["ornt"]))
        elif op == "resample":
            v = resample(v, step["to_shape"])
        elif op == "crop_foreground":
            v = v[tuple(slice(a, b) for a, b in zip(step["start"], step["stop"]))]
        elif op == "pad":
            v = np.pad(v, list(zip(step["before"], step["after"])))
        elif op == "center_crop":
            v = v[tuple(slice(s, s + c) for s, c in zip(step["start"], pre.crop_size))]
    v, scale = _scale_intensity(v, pre)
    return Prepared(v[None, None], steps + [scale])


# ------------------------------------------------------------------------------ inverse

def invert(y: np.ndarray, record: list[dict[str, Any]], *, intensity: str = "unit") -> np.ndarray:
    """A model-grid volume (H, W, D) -> the source voxel grid, replaying `record` last-in-first-out.

    intensity: "unit" maps the model range [b_min, b_max] to [0, 1] (clipped); "source" maps it
    to the source's [p_lo, p_hi] percentile range (the exact inverse of the forward scaling);
    "model" leaves the model's values.
    """
    v = np.asarray(y, np.float32)
    unit = False  # [0, 1] is promised; the least-squares inverse of a resampling may overshoot it
    for step in reversed(record):
        op = step["op"]
        if op == "scale_intensity":
            u = (v - step["b_min"]) / (step["b_max"] - step["b_min"])
            if intensity == "unit":
                v = np.clip(u, 0, 1)
            elif intensity == "source":
                v = u * (step["p_hi"] - step["p_lo"]) + step["p_lo"]
            elif intensity != "model":
                raise ValueError(f"intensity must be unit, source or model, not {intensity!r}")
            unit = intensity == "unit"
        elif op == "center_crop":
            full = np.zeros(step["shape"], np.float32)
            full[tuple(slice(s, s + n) for s, n in zip(step["start"], v.shape))] = v
            v = full
        elif op == "pad":
            v = v[tuple(slice(b, n - a) for b, a, n in zip(step["before"], step["after"], v.shape))]
        elif op == "crop_foreground":
            full = np.zeros(step["shape"], np.float32)
            full[tuple(slice(a, b) for a, b in zip(step["start"], step["stop"]))] = v
            v = full
        elif op == "resample":
            v = resample(v, step["shape"])
        elif op == "reorient":
            v = _apply_ornt(v, _inverse_ornt(np.asarray(step["ornt"])))
        else:
            raise ValueError(f"unknown preprocessing step {op!r}")
    if unit:
        v = np.clip(v, 0, 1)
    return v.astype(np.float32)
