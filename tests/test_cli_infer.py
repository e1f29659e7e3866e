"""aldm-infer end to end on a tiny random-weight model: outputs in the source's space, and one
clear error (exit 2 for usage, 1 for failures, never a traceback) for every kind of bad input."""

from __future__ import annotations

import gzip
import json
import zlib

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aldm.cli.infer import app
from aldm.errors import UsageError
from aldm.runtime.manifest import sha256_file
from conftest import DATA, need, synthetic_volume, write_nifti


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    # CliRunner catches exceptions instead of printing a traceback: an escaped one is here
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


@pytest.fixture()
def src(tmp_path):
    affine = np.array([[-1.0, 0, 0, 30], [0, -1.0, 0, 20], [0, 0, 1.0, -10], [0, 0, 0, 1]])
    return write_nifti(tmp_path / "case01_t1.nii.gz", synthetic_volume(), affine, qform_code=2, sform_code=1)


def _model(tiny_export):
    return ["--model", tiny_export, "--steps", 5, "--seed", 3, "--quiet"]


def test_translates_into_the_source_space_with_sidecars(tiny_export, src, tmp_path):
    from aldm.runtime.backends import auto_order
    from aldm.runtime.manifest import ModelDir

    out = tmp_path / "out"
    res = run(src, "--targets", "t2,flair", "--out", out, *_model(tiny_export))
    assert res.exit_code == 0, res.output
    auto_backend = auto_order(ModelDir(tiny_export))[0]  # ov-cpu on a CPU with openvino, else ort-cpu
    source = nib.load(str(src))
    for target in ("t2", "flair"):
        img = nib.load(str(out / f"case01_t1_{target}.nii.gz"))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
        assert int(img.header["qform_code"]) == 2 and int(img.header["sform_code"]) == 1
        assert img.get_data_dtype() == np.float32
        data = img.get_fdata()
        assert data.min() >= 0 and data.max() <= 1
        assert (data[np.asarray(source.dataobj) == 0] == 0).all()  # background stays 0
        side = json.loads((out / f"case01_t1_{target}.json").read_text())
        assert side["target"] == target and side["steps"] == 5 and side["strength"] == 1.0
        assert side["seed"] == (3 * 1_000_003 + zlib.crc32(b"case01_t1.nii.gz")) % 2**31  # per-case seed
        assert side["output_sha256"] == sha256_file(out / f"case01_t1_{target}.nii.gz")
        assert side["backend"] == auto_backend and len(side["manifest_sha256"]) == 64
        assert side["aldm_version"] and "timings_s" in side and side["preprocessing"]
    assert not list(out.glob(".*partial*"))


def test_same_seed_same_output(tiny_export, src, tmp_path):
    for d in ("a", "b"):
        assert run(src, "--targets", "t2", "--out", tmp_path / d, *_model(tiny_export)).exit_code == 0
    a = nib.load(str(tmp_path / "a" / "case01_t1_t2.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b" / "case01_t1_t2.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_brasyn_naming_source_intensity_and_preview(tiny_export, tmp_path):
    src = write_nifti(tmp_path / "BraTS-GLI-00001-000-t1n.nii.gz", synthetic_volume())
    out = tmp_path / "out"
    res = run(src, "--targets", "t2,flair,t1ce", "--naming", "brasyn", "--intensity", "source",
              "--preview", "--out", out, *_model(tiny_export))
    assert res.exit_code == 0, res.output
    for suffix in ("t2w", "t2f", "t1c"):
        assert (out / f"BraTS-GLI-00001-000-{suffix}.nii.gz").exists()
    data = nib.load(str(out / "BraTS-GLI-00001-000-t2w.nii.gz")).get_fdata()
    assert data.max() > 1.5  # mapped into the source's intensity range, not [0, 1]
    png = (out / "BraTS-GLI-00001-000-t1n_preview.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_singleton_fourth_axis_is_accepted(tiny_export, tmp_path):
    src = write_nifti(tmp_path / "four.nii.gz", synthetic_volume()[..., None])
    res = run(src, "--targets", "t2", "--out", tmp_path, *_model(tiny_export))
    assert res.exit_code == 0, res.output
    assert nib.load(str(tmp_path / "four_t2.nii.gz")).shape == (40, 36, 20, 1)


def test_strength_starts_from_the_spade_latent_and_runs_fewer_steps(tiny_export, src, tmp_path):
    res = run(src, "--targets", "t2", "--out", tmp_path, "--strength", "0.4", *_model(tiny_export))
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "case01_t1_t2.json").read_text())
    assert side["strength"] == 0.4 and side["steps"] == 5


# ------------------------------------------------------------------------------ bad inputs

def _bad(tmp_path, kind):
    p = tmp_path / "bad.nii.gz"
    if kind == "missing":
        return tmp_path / "nope.nii.gz", "no such file"
    if kind == "not_nifti":
        p = tmp_path / "notes.txt"
        p.write_text("hello")
        return p, "not a NIfTI file"
    if kind == "garbage_nifti":
        p.write_bytes(gzip.compress(b"\x00" * 400))
        return p, "not a readable NIfTI"
    if kind == "corrupt_gzip":
        write_nifti(p, synthetic_volume())
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "corrupt or truncated"
    if kind == "2d":
        write_nifti(p, np.ones((20, 20), np.int16))
        return p, "2-D"
    if kind == "4d":
        write_nifti(p, np.ones((20, 20, 10, 3), np.int16))
        return p, "4-D series of 3 volumes"
    if kind == "nan":
        v = synthetic_volume().astype(np.float32)
        v[5, 5, 5] = np.nan
        v[6, 6, 6] = np.inf
        write_nifti(p, v)
        return p, "2 NaN or Inf voxels"
    if kind == "zeros":
        write_nifti(p, np.zeros((20, 20, 10), np.int16))
        return p, "every voxel is 0"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "not_nifti", "garbage_nifti", "corrupt_gzip", "2d", "4d",
                                  "nan", "zeros"])
def test_bad_input_files_fail_with_one_line(tiny_export, tmp_path, kind):
    path, message = _bad(tmp_path, kind)
    res = run(path, "--targets", "t2", "--out", tmp_path / "out", *_model(tiny_export))
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert message in errors[0], res.output
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_one_bad_source_does_not_stop_the_others(tiny_export, src, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    res = run(missing, src, "--targets", "t2", "--out", tmp_path / "out", *_model(tiny_export))
    assert res.exit_code == 1 and "1 of 2 source(s) failed" in res.output
    assert (tmp_path / "out" / "case01_t1_t2.nii.gz").exists()


@pytest.mark.parametrize("args,message", [
    (["--targets", "t5"], "unknown target 't5'"),
    (["--targets", "t1,t2"], "target t1 is the source modality"),
    (["--targets", "t2", "--naming", "weird"], "--naming must be"),
    (["--targets", "t2", "--steps", "7"], "not a valid count"),
    (["--targets", "t2", "--backend", "cuda9"], "unknown backend"),
    (["--targets", "t2", "--strength", "1.5"], "--strength must be in [0, 1]"),
    (["--targets", "t2", "--strength", "-0.1"], "--strength must be in [0, 1]"),
])
def test_usage_errors_exit_2(tiny_export, src, tmp_path, args, message):
    res = run(src, *args, "--model", tiny_export, "--out", tmp_path, "--quiet")
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_unwritable_output_folder(tiny_export, src, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run(src, "--targets", "t2", "--out", blocker / "sub", *_model(tiny_export))
    assert res.exit_code == 1 and "not writable" in res.output


def test_existing_output_needs_overwrite(tiny_export, src, tmp_path):
    assert run(src, "--targets", "t2", "--out", tmp_path, *_model(tiny_export)).exit_code == 0
    out = tmp_path / "case01_t1_t2.nii.gz"
    before = out.read_bytes()
    res = run(src, "--targets", "t2", "--out", tmp_path, *_model(tiny_export))
    assert res.exit_code == 1 and "exists; pass --overwrite" in res.output
    assert out.read_bytes() == before
    res = run(src, "--targets", "t2", "--out", tmp_path, "--overwrite", *_model(tiny_export))
    assert res.exit_code == 0


def test_a_failed_write_leaves_no_file_under_the_final_name(tiny_export, src, tmp_path, monkeypatch):
    import nibabel

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nibabel, "save", broken_save)
    res = run(src, "--targets", "t2", "--out", tmp_path, *_model(tiny_export))
    assert res.exit_code == 1 and "no space left on device" in res.output.lower()
    assert not (tmp_path / "case01_t1_t2.nii.gz").exists()
    assert not list(tmp_path.glob(".*partial*"))


# ------------------------------------------------------------------------------ real headers

@pytest.mark.parametrize("case", ["brats_lps_int16", "ras", "ixi_t1"])
def test_real_volumes_come_back_on_their_own_grid(tiny_export_fullcrop, tmp_path, case):
    if case == "ixi_t1":
        src = need(DATA / "ixi" / "IXI002-Guys-0828" / "IXI002-Guys-0828-T1.nii.gz")
    else:
        src = need(DATA / "brats18" / "Brats18_2013_11_1" / "Brats18_2013_11_1_t1.nii.gz")
    if case == "ras":
        img = nib.load(str(src))
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [-119, -119, -77]
        src = write_nifti(tmp_path / "ras.nii.gz", np.asarray(img.dataobj)[::-1, ::-1], affine)
    res = run(src, "--targets", "flair", "--out", tmp_path / "out", "--model", tiny_export_fullcrop,
              "--steps", 5, "--seed", 0, "--quiet")
    assert res.exit_code == 0, res.output
    source = nib.load(str(src))
    (out,) = (tmp_path / "out").glob("*_flair.nii.gz")
    img = nib.load(str(out))
    assert img.shape == source.shape
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
    np.testing.assert_allclose(img.header.get_qform(), source.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(img.header.get_sform(), source.header.get_sform(), atol=1e-6)


def test_strength_runs_round_strength_times_steps_unet_calls(tiny_export):
    from aldm.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_export)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, *pipe.manifest.preprocessing.crop_size)).astype(np.float32)
    calls = []
    tr = pipe.translate(x, ["t2"], steps=5, strength=0.4, seed=0, callback=lambda i, n, t, z: calls.append((n, t)))
    assert calls == [(2, 201), (2, 1)] and tr.strength == 0.4
    with pytest.raises(UsageError, match="ddim"):
        pipe.translate(x, ["t2"], strength=0.4, sampler="ddpm", seed=0)


def test_strength_zero_decodes_the_spade_latent_without_a_unet_call(tiny_export):
    """--strength 0: no diffusion; the output is the decoder's image of the MS-SPADE latent,
    whatever the seed."""
    from aldm.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_export)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, *pipe.manifest.preprocessing.crop_size)).astype(np.float32)
    called = []
    real_run = pipe._run
    pipe._run = lambda name, **kw: (called.append(name), real_run(name, **kw))[1]
    a = pipe.translate(x, ["t2"], steps=5, strength=0.0, seed=0, callback=lambda *a: called.append("step"))
    b = pipe.translate(x, ["t2"], steps=5, strength=0.0, seed=7)
    assert "unet" not in called and "step" not in called and a.strength == 0.0
    np.testing.assert_array_equal(a.volumes["t2"], b.volumes["t2"])
    c = pipe.condition(pipe.encode(x), np.array([2]))
    np.testing.assert_allclose(a.volumes["t2"], pipe.decode(c[:, c.shape[1] // 2:]), rtol=0, atol=0)


def test_a_case_is_written_whole_or_not_at_all(tiny_export, src, tmp_path, monkeypatch):
    """The second target's write fails (disk full): the first target's output is removed too."""
    from aldm import translator as I

    real = I.save_like
    calls = []

    def save_like(vol, data, path, description=""):
        calls.append(path)
        if len(calls) == 2:
            raise I.AldmError(f"cannot write {path}: no space left on device")
        return real(vol, data, path, description)

    monkeypatch.setattr(I, "save_like", save_like)
    res = run(src, "--targets", "t2,flair", "--out", tmp_path / "o", *_model(tiny_export))
    assert res.exit_code == 1 and "no space left" in res.output
    assert len(calls) == 2 and not list((tmp_path / "o").iterdir())
