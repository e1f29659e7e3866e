"""Slab-wise decoding (aldm.runtime.tiled) equals the whole-volume decode; folders without the
decoder cut still load and decode whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aldm.errors import ModelError
from aldm.runtime.manifest import FORMAT_VERSION, ModelDir
from aldm.runtime.pipeline import Pipeline
from aldm.runtime.tiled import DEFAULT_TILE_ROWS, Stats, slab_rows
from conftest import edit_manifest, rel_err, synthetic_volume, write_nifti

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "aldm" / "assets" / "default_model"


def _latents(model: ModelDir, n: int, seed: int = 0) -> np.ndarray:
    """Latents as the sampler hands them to decode (scaled), spread like real ones."""
    z = np.random.default_rng(seed).standard_normal((n,) + tuple(model.manifest.latent_shape))
    return (z * model.manifest.scale_factor).astype(np.float32)


def _whole_and_tiled(folder, rows: int, n: int = 1, backend: str = "ort-cpu"):
    with Pipeline.load(folder, backend=backend, tile_rows=0) as whole, \
         Pipeline.load(folder, backend=backend, tile_rows=rows) as tiled:
        assert whole.tiles is None and tiled.tiles is not None
        z = _latents(whole.model, n)
        return whole.decode(z), tiled.decode(z)


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
@pytest.mark.parametrize("rows", [4, 8, 32])
def test_tiled_decode_equals_the_whole_decode_on_the_tiny_model(tiny_export, rows, backend):
    ref, got = _whole_and_tiled(tiny_export, rows, n=2, backend=backend)  # two volumes: statistics are per volume
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_tiled_decode_equals_the_whole_decode_on_the_golden_model(golden_export, backend):
    ref, got = _whole_and_tiled(golden_export, 8, backend=backend)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.skipif(not (BUNDLED / "manifest.json").is_file(), reason="no bundled model in this checkout")
@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_tiled_decode_equals_the_whole_decode_on_the_bundled_model(backend):
    model = ModelDir(BUNDLED)
    assert model.manifest.decoder_tiling, "the bundled model must carry the decoder cut"
    ref, got = _whole_and_tiled(BUNDLED, 16, backend=backend)
    assert ref.shape == (1, 1, 144, 192, 144)
    assert rel_err(got, ref) <= 1e-5


def test_the_upsample_as_eight_small_convolutions_is_the_same_function():
    import torch
    import torch.nn.functional as F

    from aldm.export.tiled import upsample_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 6, 7, 7, 4, dtype=torch.float64)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        assert (upsample_conv(conv, x) - ref).abs().max() < 1e-12
        # a slab: rows 1..3 with one context row each side -> full-resolution rows 2..7
        assert (upsample_conv(conv, x[:, :, 0:5], context=1) - ref[:, :, 2:8]).abs().max() < 1e-12
        # two rows of context: rows 2..3 with 0..1 and 4..5 around -> full-resolution rows 3..8
        assert (upsample_conv(conv, x[:, :, 0:6], context=2) - ref[:, :, 3:9]).abs().max() < 1e-12
        # the first slab: zero rows stand for the padding above the volume
        top = F.pad(x[:, :, 0:3], (0, 0, 0, 0, 1, 0))
        assert (upsample_conv(conv, top, context=1) - ref[:, :, 0:4]).abs().max() < 1e-12


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=6), st.integers(1, 4), st.integers(0, 2**31))
def test_merged_slab_statistics_equal_the_whole_groups(sizes, groups, seed):
    rng = np.random.default_rng(seed)
    channels = groups * 2
    slabs = [rng.normal(3.0, 2.0, (channels, n, 5)).astype(np.float32) for n in sizes]
    stats = Stats()
    for s in slabs:
        stats.add(s[0].size, s.mean(axis=(1, 2)), s.var(axis=(1, 2)))
    mean, rstd = stats.channel_norm(groups, 1e-6)
    whole = np.concatenate(slabs, axis=1).astype(np.float64).reshape(groups, -1)
    np.testing.assert_allclose(mean, np.repeat(whole.mean(1), 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, np.repeat(1 / np.sqrt(whole.var(1) + 1e-6), 2), rtol=1e-5)


def test_slab_rows_divide_the_grid_evenly():
    assert slab_rows(144, 16) == 16 and slab_rows(144, 20) == 18 and slab_rows(144, 1000) == 144
    assert slab_rows(32, 5) == 4 and slab_rows(32, 0) == 4
    for rows in range(1, 200):
        r = slab_rows(144, rows)
        assert 144 % r == 0 and r % 2 == 0 and r >= 4


def _copy(folder: Path, dst: Path) -> Path:
    return Path(shutil.copytree(folder, dst / "m"))


def test_a_format_1_folder_loads_and_decodes_whole_volumes(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    tiling = json.loads((d / "manifest.json").read_text())["decoder_tiling"]

    def to_v1(m):
        m.pop("decoder_tiling")
        m["format_version"] = 1
        m["components"].pop("unet_step")  # format 4's optional step graph
        for f in [tiling["head"]] + [s["file"] for s in tiling["steps"]]:
            m["files"].pop(f)
            (d / f).unlink()
    edit_manifest(d, to_v1)
    assert FORMAT_VERSION >= 3
    with Pipeline.load(d, backend="ort-cpu") as old, Pipeline.load(tiny_export, backend="ort-cpu", tile_rows=0) as new:
        assert old.tiles is None
        z = _latents(old.model, 1)
        np.testing.assert_array_equal(old.decode(z), new.decode(z))
    from aldm.runtime.tiled import TiledDecoder

    with pytest.raises(ModelError, match="re-export it with `aldm export`"):
        TiledDecoder(ModelDir(d), lambda f, spec: None)


def test_a_format_2_folder_loads_and_decodes_whole_volumes(tiny_export, tmp_path):
    """Format 2's decoder cut took channels-first slabs; its graphs stay in the folder, unused."""
    d = _copy(tiny_export, tmp_path)

    def to_v2(m):
        m["format_version"] = 2
        m["components"].pop("unet_step")  # format 4's optional step graph
        m["decoder_tiling"].update(axis=2)
        m["decoder_tiling"].pop("layout")
    edit_manifest(d, to_v2)
    with Pipeline.load(d, backend="ort-cpu", tile_rows=16) as old, \
         Pipeline.load(tiny_export, backend="ort-cpu", tile_rows=0) as new:
        assert old.model.manifest.decoder_tiling is None and old.tiles is None
        z = _latents(old.model, 1)
        np.testing.assert_array_equal(old.decode(z), new.decode(z))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=FORMAT_VERSION + 1), "upgrade aldm"),
    (lambda m: m["decoder_tiling"].update(axis=2), "decoder_tiling is malformed"),
    (lambda m: m.update(format_version=0), "re-export the model"),
    (lambda m: m["decoder_tiling"].update(steps=[]), "decoder_tiling is malformed"),
    (lambda m: m["decoder_tiling"]["steps"][0].update(kind="deconv"), "decoder_tiling is malformed"),
    (lambda m: m["decoder_tiling"].update(head="../decoder.onnx"), "decoder_tiling.head"),
    (lambda m: m["decoder_tiling"]["steps"][1].update(file="other.onnx"), "not hashed"),
])
def test_a_bad_decoder_cut_is_one_clear_model_error(tiny_export, tmp_path, edit, message):
    d = _copy(tiny_export, tmp_path)
    edit_manifest(d, edit)
    with pytest.raises(ModelError, match=message) as exc:
        ModelDir(d)
    assert "\n" not in str(exc.value)


def test_a_replaced_slab_graph_is_caught_by_its_hash(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    step = json.loads((d / "manifest.json").read_text())["decoder_tiling"]["steps"][2]["file"]
    (d / step).write_bytes((d / step).read_bytes() + b"\0")
    with pytest.raises(ModelError, match="sha256 does not match"):
        ModelDir(d)


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_aldm_infer_tile_rows_0_and_default_give_the_same_volume(tiny_export, tmp_path, backend):
    src = tmp_path / "s.nii.gz"
    write_nifti(src, synthetic_volume(shape=(40, 36, 20), seed=3))
    outs = {}
    for rows in ("0", "8", None):  # None: the default, slabs
        out = tmp_path / f"out{rows}"
        res = subprocess.run([sys.executable, "-m", "aldm.cli.infer", str(src), "--model", str(tiny_export),
                              "--targets", "t2", "--seed", "1", "--steps", "2", "--backend", backend,
                              *(["--tile-rows", rows] if rows else []), "--out", str(out), "-q"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        outs[rows] = np.asarray(nib.load(out / "s_t2.nii.gz").dataobj, np.float64)
    assert rel_err(outs["8"], outs["0"]) <= 1e-5
    assert rel_err(outs[None], outs["0"]) <= 1e-5
    assert DEFAULT_TILE_ROWS > 0
    bad = subprocess.run([sys.executable, "-m", "aldm.cli.infer", str(src), "--model", str(tiny_export),
                          "--tile-rows", "-1", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--tile-rows must be 0" in bad.stderr


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_a_runner_writes_into_the_callers_array_and_a_plain_call_never_does(tiny_export, backend):
    """The slab decoder's binding: outputs land in the view given, inputs are read in place; a
    later call without `out` returns its own arrays (the bound one is not written again); trim
    keeps the graph usable and the results the same."""
    from aldm.runtime.backends import extra_graph_runners
    from aldm.runtime.tiled import step_spec

    md = ModelDir(tiny_export)
    t, full = md.manifest.decoder_tiling, tuple(md.manifest.preprocessing.crop_size)
    st = next(s for s in t["steps"] if s["kind"] == "conv")
    runner = extra_graph_runners(md, backend)(st["file"], step_spec(st, 0, full))
    rng = np.random.default_rng(0)
    _, w, d = full
    x = rng.standard_normal((6, w, d, st["in_channels"])).astype(np.float32)
    feeds = {"x": x, "mean": np.zeros(st["in_channels"], np.float32),
             "rstd": np.ones(st["in_channels"], np.float32), "mask": np.ones(6, np.float32)}
    big = np.full((8, w, d, st["channels"]), 7.0, np.float32)
    res = runner.infer(feeds, out={"y": big[2:6]})
    assert res["y"] is not None and np.shares_memory(res["y"], big)
    assert np.all(big[:2] == 7.0) and np.all(big[6:] == 7.0) and not np.all(big[2:6] == 7.0)
    kept = big.copy()
    plain = runner.infer(dict(feeds, x=x * 2))
    assert not np.shares_memory(plain["y"], big) and np.array_equal(big, kept)
    runner.trim()
    again = runner.infer(feeds)
    np.testing.assert_array_equal(again["y"], kept[2:6])
    with pytest.raises(Exception, match="C-contiguous float32"):
        runner.infer(feeds, out={"y": big[2:6, :, :, :1]})
    runner.deactivate()
