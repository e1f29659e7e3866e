"""Previews: labelled columns, the same anatomical slice in every column, one scale, own windows."""

from __future__ import annotations

import io

import numpy as np
import pytest

PIL = pytest.importorskip("PIL", reason="Pillow is a base dependency (pip install -e .)")

from aldm.preview import centre_of, preview, sheet  # noqa: E402


def _brain(shape=(36, 48, 36), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((g - np.array([0.3, -0.2, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.35  # off-centre
    v = np.where(inside, 1 + rng.random(shape), 0).astype(np.float32)
    return v - 1  # background at the minimum, like the model's [-1, 1] input


def test_every_column_shows_the_same_slice_at_one_scale_and_own_window():
    src = _brain()
    at = centre_of(src > src.min())
    marked = src.copy()
    marked[at] = 50.0  # a bright voxel at the slice centre of the source foreground
    dim = marked * 0.01  # a column 100x darker: its own window makes it look the same
    img = np.asarray(sheet({"t1 (source)": marked, "t2": dim, "flair": marked}))
    side, gap = max(src.shape), 4
    left = img.shape[1] - 3 * (side + gap)
    top = img.shape[0] - 3 * (side + gap)
    tiles = [[img[top + r * (side + gap): top + r * (side + gap) + side,
                  left + c * (side + gap): left + c * (side + gap) + side] for c in range(3)] for r in range(3)]
    for r in range(3):
        ref = tiles[r][0]
        assert ref.shape == (side, side)
        np.testing.assert_array_equal(tiles[r][2], ref)  # same volume, same pixels
        assert np.abs(tiles[r][1].astype(int) - ref.astype(int)).max() <= 1  # own window
        peak = np.unravel_index(np.argmax(ref), ref.shape)
        assert ref[peak] == 255 and tiles[r][1][peak] >= 254  # the marker, same place in every column
    assert (img[:top, left:] > 0).any()  # column labels drawn above the tiles
    assert (img[top:, :left] > 0).any()  # row labels (axial, coronal, sagittal)


def test_labels_differ_by_column_and_the_file_is_a_png(tmp_path):
    v = _brain()
    a = np.asarray(sheet({"t1 (source)": v, "t2": v}))
    b = np.asarray(sheet({"t1 (source)": v, "flair": v}))
    assert (a != b).any() and a.shape == b.shape  # only the label differs
    out = preview(tmp_path / "p.png", {"t1 (source)": v, "t2": v}, title="case: synthetic")
    from PIL import Image

    with Image.open(io.BytesIO(out.read_bytes())) as im:
        assert im.format == "PNG" and im.size[0] > 2 * max(v.shape)
    assert not list(tmp_path.glob(".*partial*"))
