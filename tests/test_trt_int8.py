"""INT8 TensorRT engines by explicit quantization: built from the QDQ graphs `aldm calibrate`
writes (made symmetric for TensorRT, no calibrator), and keyed by them, so a new calibration
makes the old engines stale. TensorRT is a fake that records what it was given; the QDQ rewrite
is checked numerically with ONNX Runtime."""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aldm.calibration.ort_int8 import add_int8_variant, quantize_component
from aldm.export.trt_qdq import has_qdq, tensorrt_qdq
from aldm.runtime import trt
from aldm.runtime.manifest import ModelDir
from test_trt_plan import FakeTensorRT


def _conv_net(path, seed=0):
    """x (1,4,8,8) -> Conv -> Relu -> Conv -> Relu -> Conv: enough for quantize_static's Q/DQ."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i, (cin, cout) in enumerate([(4, 8), (8, 8), (8, 4)]):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        prev = f"c{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(model_or_path, x):
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_the_qdq_graph_for_tensorrt_is_symmetric_int8_and_agrees_with_the_calibrated_one(tmp_path):
    src = _conv_net(tmp_path / "net.onnx")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(0.5, 1.0, (1, 4, 8, 8)).astype(np.float32)} for _ in range(16)]
    quantize_component(src, tmp_path / "net.int8.onnx", samples, max_samples=16)
    ort_qdq = onnx.load(str(tmp_path / "net.int8.onnx"))
    inits = {i.name: i for i in ort_qdq.graph.initializer}
    zps = [inits[n.input[2]] for n in ort_qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and {z.data_type for z in zps} == {TensorProto.UINT8}  # what ONNX Runtime gets: asymmetric

    sym = tensorrt_qdq(ort_qdq)
    onnx.checker.check_model(sym)
    inits = {i.name: i for i in sym.graph.initializer}
    qdq = [n for n in sym.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and has_qdq(sym)
    for n in qdq:  # TensorRT: signed INT8, zero point 0, nothing dequantized from INT32
        assert inits[n.input[2]].data_type == TensorProto.INT8
        assert not numpy_helper.to_array(inits[n.input[2]]).any()
        if n.input[0] in inits:
            assert inits[n.input[0]].data_type == TensorProto.INT8
    # every activation's symmetric range covers the range it was calibrated to
    old = {i.name: numpy_helper.to_array(i) for i in ort_qdq.graph.initializer}
    for n in ort_qdq.graph.node:
        if n.op_type == "QuantizeLinear":
            s, z = old[n.input[1]].astype(np.float64), old[n.input[2]].astype(np.float64)
            amax = np.maximum(np.abs(-z * s), np.abs((255 - z) * s))
            assert np.allclose(numpy_helper.to_array(inits[n.input[1]]) * 127, amax, rtol=1e-6)

    x = rng.normal(0.5, 1.0, (1, 4, 8, 8)).astype(np.float32)
    ref, asym, out = _run(src, x), _run(ort_qdq, x), _run(sym, x)
    err = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(asym) < 0.05 and err(out) < 0.05, (err(asym), err(out))
    assert err(out) < 3 * err(asym) + 1e-3  # up to one bit of activation resolution lost, no more
    assert tensorrt_qdq(onnx.load(str(src))).SerializeToString() == onnx.load(str(src)).SerializeToString()


def _record(calib, md: ModelDir, seed: int) -> None:
    """Recorded inputs as `aldm calibrate` writes them (random here: only the scales matter)."""
    rng = np.random.default_rng(seed)
    calib.mkdir(exist_ok=True)
    for c in ("decoder", "unet"):
        feeds = {}
        for t in md.component(c).inputs:
            shape = t.concrete(4)
            feeds[t.name] = (rng.integers(0, 3 if t.name == "y" else 1000, shape) if t.dtype == "int64"
                             else rng.normal(0, 1, shape)).astype(t.dtype)
        np.savez(calib / f"{c}_00000.npz", **feeds)


@pytest.fixture
def int8_model(monkeypatch, tiny_export, tmp_path):
    """A copy of the tiny model with an INT8 variant, on a machine with a fake TensorRT and GPU."""
    import aldm.runtime.cuda as cuda

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: cuda.GpuInfo("Fake GPU", "9.0", 80.0))
    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    _record(tmp_path / "calib", ModelDir(d), seed=0)
    add_int8_variant(d, tmp_path / "calib", keep_float=("encoder", "spade"), say=lambda s: None)
    return fake, d


def test_int8_engines_are_parsed_from_the_calibrated_qdq_graphs_without_a_calibrator(int8_model):
    from aldm.export.trt_build import build_engines

    fake, d = int8_model
    docs = build_engines(d, trt.BuildOptions("int8", 2), say=lambda s: None)
    assert fake.calibrators == []  # explicit quantization: the scales are in the graph
    md = ModelDir(d)
    parsed = dict(zip(docs, fake.parsed))
    for c, (path, graph) in parsed.items():
        assert path == str(md.component_file(c, "int8"))
        assert graph.SerializeToString() == tensorrt_qdq(onnx.load(path)).SerializeToString()
    assert sorted(p.rsplit("/", 1)[1] for p, _ in fake.parsed) == [
        "decoder.int8.onnx", "encoder.onnx", "spade.onnx", "unet.int8.onnx"]
    flags = dict(zip(docs, fake.build_flags))
    for c in ("decoder", "unet"):  # quantized: INT8, FP16 for the rest, the plan's FP32 layers obeyed
        assert has_qdq(parsed[c][1]) and flags[c] == ["FP16", "INT8", "OBEY"]
    for c in ("encoder", "spade"):  # kept in float by the variant: no Q/DQ, so no INT8 flag
        assert not has_qdq(parsed[c][1]) and flags[c] == ["FP16", "OBEY"]
    for c, doc in docs.items():
        assert doc["key"]["calibration_sha256"] == md.manifest.files[md.component_file(c, "int8").name]
    assert trt.engines_usable(md, "int8")


def test_a_new_calibration_makes_the_int8_engines_stale_and_they_are_rebuilt(int8_model, tmp_path):
    from aldm.export.trt_build import build_engines

    fake, d = int8_model
    opts = trt.BuildOptions("int8", 2)
    first = build_engines(d, opts, say=lambda s: None)
    build_engines(d, opts, say=lambda s: None)
    assert len(fake.built) == 4  # same calibration: every engine reused
    _record(tmp_path / "calib2", ModelDir(d), seed=1)  # other data, then `aldm calibrate` again
    add_int8_variant(d, tmp_path / "calib2", keep_float=("encoder", "spade"), say=lambda s: None)
    md = ModelDir(d)
    assert not trt.engines_usable(md, "int8")  # the runtime sees the old engines as stale
    for c in ("decoder", "unet"):
        assert trt.current_key(md, c, opts) != first[c]["key"]
        assert trt.current_key(md, c, opts)["calibration_sha256"] != first[c]["key"]["calibration_sha256"]
    second = build_engines(d, opts, say=lambda s: None)
    assert len(fake.built) == 6  # the two quantized components rebuilt, the float ones reused
    assert {c for c in second if second[c]["key_digest"] != first[c]["key_digest"]} == {"decoder", "unet"}
    assert trt.engines_usable(ModelDir(d), "int8")


def test_an_int8_build_without_a_calibration_says_what_to_run(monkeypatch, tiny_export, tmp_path):
    import aldm.runtime.cuda as cuda
    from aldm.errors import ModelError
    from aldm.export.trt_build import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: cuda.GpuInfo("Fake GPU", "9.0", 80.0))
    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    with pytest.raises(ModelError, match="aldm calibrate"):
        build_engines(d, trt.BuildOptions("int8", 2), say=lambda s: None)


def test_the_calibration_is_a_key_field():
    opts, prof = trt.BuildOptions("int8"), {"x": ((1, 4), (3, 4), (3, 4))}
    key = lambda cal: trt.engine_key("a" * 64, opts, prof, "10.15.1", "NVIDIA H100", "9.0", cal)  # noqa: E731
    assert trt.key_digest(key("c" * 64)) == trt.key_digest(key("c" * 64))
    assert trt.key_digest(key("c" * 64)) != trt.key_digest(key("d" * 64)) != trt.key_digest(key(None))


def test_the_precision_plan_never_pins_quantize_or_dequantize_layers(monkeypatch):
    """A Q layer on a plan node's output carries the node's name as a prefix; pinning it to FP32
    would contradict its INT8 output."""
    from aldm.export.trt_build import plan_layers

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    class Layer:
        def __init__(self, name, type):
            self.name, self.type, self.num_outputs, self.precision, self.types = name, type, 1, None, {}

        def get_output(self, j):
            return types.SimpleNamespace(dtype=fake.float16)

        def set_output_type(self, j, t):
            self.types[j] = t

    layers = [Layer("/emb/Mul", "ELEMENTWISE"), Layer("/emb/Mul_output_0_QuantizeLinear", "QUANTIZE"),
              Layer("/emb/Mul_output_0_DequantizeLinear", "DEQUANTIZE"), Layer("/conv/Conv", "CONVOLUTION"),
              Layer("/norm/InstanceNormalization", "NORMALIZATION")]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert plan_layers(net, {"/emb/Mul"}) == ["/emb/Mul", "/norm/InstanceNormalization"]
    assert [layer.precision for layer in layers] == ["float32", None, None, None, "float32"]
