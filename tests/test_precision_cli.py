"""FP16 copies and INT8 calibration on CPU through the CLI: variants land in the manifest (hashed),
FP16 agrees with FP32 end to end, and `aldm build` says why it cannot build engines here."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from aldm.cli.main import app
from aldm.runtime import trt
from aldm.runtime.manifest import ModelDir
from conftest import synthetic_volume, write_nifti


def run(*args):
    """Invoke the CLI; an exception other than a deliberate exit fails the test. (CliRunner
    catches exceptions into `res.exception` and never prints a traceback into `res.output`.)"""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 0 or "error: " in res.output or "FAIL" in res.output, res.output
    return res


def test_the_helper_sees_a_crash(tiny_export, tmp_path, monkeypatch):
    """A command that crashes (not an AldmError) must fail `run`, though no traceback is printed."""
    import aldm.export.precision as precision

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(precision, "add_fp16_variant", boom)
    d = tmp_path / "model"
    shutil.copytree(tiny_export, d)
    res = CliRunner().invoke(app, ["build", str(d), "--onnx-only"])
    assert isinstance(res.exception, RuntimeError) and "Traceback" not in res.output
    with pytest.raises(AssertionError, match="RuntimeError"):
        run("build", d, "--onnx-only")


@pytest.fixture(scope="module")
def model(tiny_export, tmp_path_factory):
    d = tmp_path_factory.mktemp("prec") / "model"
    shutil.copytree(tiny_export, d)
    return d


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return [write_nifti(d / f"cal{i}.nii.gz", synthetic_volume((36, 34, 18), seed=10 + i)) for i in range(3)]


def test_fp16_copy_via_build_onnx_only(model):
    res = run("build", model, "--onnx-only")
    assert res.exit_code == 0, res.output
    md = ModelDir(model)  # verifies every hash, the new files included
    assert md.precisions == ["fp32", "fp16"]
    assert md.component_file("unet", "fp16").name == "unet.fp16.onnx"


def test_build_without_tensorrt_explains(model):
    if trt.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    res = run("build", model)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "error: TensorRT is not installed here" in res.output


def test_fp16_end_to_end_agrees_with_fp32(model, sources):
    from aldm.export.e2e_check import e2e_precision

    assert run("build", model, "--onnx-only").exit_code == 0
    results = e2e_precision(model, sources[2:], "fp16", steps=5, say=lambda s: None)
    assert len(results) == 2 and all(r.psnr >= 45 for r in results), [str(r) for r in results]


def test_int8_calibration_writes_a_qdq_variant(model, sources, tmp_path, tiny_model):
    from aldm.models.checkpoint import save_official

    save_official(tmp_path / "tiny.ckpt", tiny_model.official_state_dict())
    res = run("calibrate", model, "--calib", sources[0], "--calib", sources[1], "--steps", 5,
              "--out", tmp_path / "rec")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "rec").glob("unet_*.npz"))) == 2 * 5  # every step, both sources
    md = ModelDir(model)
    assert "int8" in md.precisions
    g = onnx.load(str(md.component_file("unet", "int8")))
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # the first convolution and the time embedding stay float: nothing quantizes their inputs
    first_conv = next(n for n in g.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in g.graph.node for o in n.output}
    assert producers.get(first_conv.input[0]) != "DequantizeLinear"
    res = run("check", model, "--precisions", "int8", "--backends", "ort-cpu",
              "--reference", tmp_path / "tiny.ckpt")
    assert "ort-cpu/int8" in res.output  # ran; a random-weight model is not held to the tolerances
    # by default the encoder and MS-SPADE stay FP32 in the int8 variant (their errors become codes
    # and the sampler's start); --keep-float '' quantizes everything, and switching back deletes
    # the files the variant no longer uses, hashes included
    assert md.component_file("encoder", "int8").name == "encoder.onnx"
    assert md.component_file("spade", "int8").name == "spade.onnx"
    assert md.component_file("decoder", "int8").name == "decoder.int8.onnx"
    assert run("calibrate", model, "--calib", tmp_path, "--out", tmp_path / "rec", "--skip-record",
               "--keep-float", "").exit_code == 0
    assert ModelDir(model).component_file("encoder", "int8").name == "encoder.int8.onnx"
    assert run("calibrate", model, "--calib", tmp_path, "--out", tmp_path / "rec", "--skip-record").exit_code == 0
    md = ModelDir(model)
    assert not (model / "encoder.int8.onnx").exists() and "encoder.int8.onnx" not in md.manifest.files
    assert "encoder.onnx" in md.manifest.files and (model / "encoder.onnx").exists()
    # recordings kept outside the model folder feed the component check through --calib
    res = run("check", model, "--precisions", "fp32", "--backends", "ort-cpu", "--inputs", "recorded",
              "--calib", tmp_path / "rec", "--reference", tmp_path / "tiny.ckpt")
    assert "inputs: recorded" in res.output and res.exit_code == 0, res.output
