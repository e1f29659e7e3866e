"""The model's input contract: a skull-stripped brain, on slices not far coarser than the training data.

aldm's model was trained on BraTS volumes: skull-stripped brains on a zero background at 1 mm. A raw
clinical scan (skull, scalp, neck, scanner noise in the air) still goes through the preprocessing and
comes out as a plausible-looking texture, so `Translator.load` refuses it (unless
`Options.skull_check` is off, `--no-skull-check`), and warns when the slices are far apart.

The rule: the fraction of the field of view that is non-zero (voxels > 0, the same test the
preprocessing's foreground crop uses). A stripped brain lies on an exactly-zero background and
fills a minority of its grid; a raw scan has tissue or noise almost everywhere. The rule does not
use the voxel spacing. Measured with `(data > 0).mean()` on each whole volume (../shared/data):

    volume                                         non-zero %   [in the foreground's bounding box %]
    BraTS 2018, 18 cases x t1/t1ce/t2/flair        12.1 - 19.4  [42.2 - 47.9]
    BraTS 2023 naming example, t1n/t1c/t2w/t2f     11.4         [36.3]
    IXI002-Guys-0828 T1 / T2 (HD-BET), examples/   13.0 / 15.0  [43.7 / 45.1]
    TCGA-FG-6692 t1_hdbet / t2_hdbet               23.7 / 23.7  [47.6 / 45.0]
    TCGA-FG-6692 t1_raw / t2_raw (skull, neck)     96.2 / 96.9  [96.6 / 97.8]
    tests' synthetic_volume (ball, 40x36x20 ...)   21.6 - 23.2  [51.3 - 55.0]

Other features measured on the same volumes separate them as well but were not needed: the share
of non-zero voxels on the six faces of the grid (stripped <= 1.4 %, raw 89 - 93 %) and the share of
the non-zero voxels dimmer than 5 % of the 99th percentile (stripped <= 3.5 %, raw 52 %).

Threshold: 75 %. Every stripped volume is at most 23.7 % (a margin of 51 points), and even a
stripped brain cropped tight to its bounding box stays near 45 - 55 % (a ball fills 52 % of its
box); both raw scans are at least 96.2 % (21 points above). A stripped volume whose background is
not exactly 0 (small positive noise left by a resampling) is refused too: the preprocessing takes
every voxel > 0 as brain, so it would not be translated correctly either.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_NONZERO_FRACTION = 0.75  # of the whole grid; stripped <= 0.237 measured, raw >= 0.962
COARSE_FACTOR = 2.0  # a voxel axis more than this times the model spacing gets a warning


def nonzero_fraction(data: np.ndarray) -> float:
    """Share of the voxels that are > 0 (the preprocessing's foreground)."""
    data = np.asarray(data)
    return float(np.count_nonzero(data > 0)) / max(data.size, 1)


def skull_reason(data: np.ndarray) -> str | None:
    """Why `data` does not look skull-stripped (one line), or None when it does."""
    frac = nonzero_fraction(data)
    if frac <= MAX_NONZERO_FRACTION:
        return None
    return (f"looks like a scan with skull ({100 * frac:.0f} % of the field of view is non-zero; "
            f"skull-stripped brains lie on a background of exactly 0 and fill < {100 * MAX_NONZERO_FRACTION:.0f} %); "
            "aldm's model was trained on skull-stripped brains: strip it first (e.g. HD-BET) "
            "or pass --no-skull-check")


def coarse_slice_warning(affine: np.ndarray, model_spacing: Sequence[float],
                         factor: float = COARSE_FACTOR) -> str | None:
    """A warning when a voxel axis is more than `factor` times coarser than the model's spacing
    (compared axis by axis in RAS order, as the preprocessing resamples), else None."""
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = io_orientation(affine)  # voxel axis i -> RAS axis ornt[i, 0]
    worst = None
    for i, z in enumerate(zooms):
        axis = ornt[i, 0]
        model = float(model_spacing[int(axis)] if np.isfinite(axis) else max(model_spacing))
        ratio = z / model
        if ratio > factor and (worst is None or ratio > worst[0]):
            worst = (ratio, float(z), model)
    if worst is None:
        return None
    _, z, model = worst
    return (f"slices are {z:.3g} mm apart (model: {model:.3g} mm): "
            "the output between slices is interpolated, not seen")
