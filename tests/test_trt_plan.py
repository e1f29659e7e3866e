"""Everything in the TensorRT path that does not need TensorRT: profiles, cache keys, staleness,
precision plans, the FP16 copy, backend order and out-of-memory fallback."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import warnings

import numpy as np
import onnx
import pytest

from aldm.errors import BackendError
from aldm.export.precision import fp32_nodes, node_scope, to_fp16
from aldm.export.stable_norm import MARK as NORM_MARK
from aldm.export.trt_compat import check_file
from aldm.runtime import trt
from aldm.runtime.backends import FallbackRunner, auto_order, fallback_chain
from aldm.runtime.manifest import ModelDir, sample_feeds, sha256_file
from aldm.runtime.runners import OrtRunner


def test_profiles_cover_batch_1_to_max_targets(tiny_export):
    md = ModelDir(tiny_export)
    unet = trt.profile(md.component("unet"), 3)
    assert unet["x_t"] == ((1, 4, 8, 8, 4), (3, 4, 8, 8, 4), (3, 4, 8, 8, 4))
    assert unet["t"] == ((1,), (3,), (3,))
    enc = trt.profile(md.component("encoder"), 3)
    assert enc["x"][1] == (1, 1, 32, 32, 16)  # volumes: optimised for one at a time
    with pytest.raises(BackendError):
        trt.profile(md.component("unet"), 0)


def _key(**over):
    opts = trt.BuildOptions(**{k: v for k, v in over.items() if k in trt.BuildOptions.__dataclass_fields__})
    base = dict(onnx_sha256="a" * 64, trt_version="10.15.1", gpu_name="NVIDIA H100", compute_capability="9.0")
    base.update({k: v for k, v in over.items() if k in base})
    return trt.engine_key(base["onnx_sha256"], opts, {"x": ((1, 4), (3, 4), (3, 4))}, base["trt_version"],
                          base["gpu_name"], base["compute_capability"])


@pytest.mark.parametrize("change", [dict(onnx_sha256="b" * 64), dict(precision="int8"), dict(max_targets=4),
                                    dict(trt_version="10.16.0"), dict(gpu_name="NVIDIA L4"),
                                    dict(compute_capability="8.9"), dict(version_compatible=True)])
def test_every_key_field_matters(change):
    assert trt.key_digest(_key()) == trt.key_digest(_key())
    if "max_targets" in change:  # the profile is passed in; a different batch range is a different profile
        k2 = trt.engine_key("a" * 64, trt.BuildOptions(), {"x": ((1, 4), (4, 4), (4, 4))}, "10.15.1",
                            "NVIDIA H100", "9.0")
    else:
        k2 = _key(**change)
    assert trt.key_digest(k2) != trt.key_digest(_key())


def test_an_engine_is_current_only_with_its_exact_key_and_bytes(tmp_path):
    engine, side = tmp_path / "unet.fp16.plan", tmp_path / "unet.fp16.plan.json"
    key = _key()
    assert not trt.is_current(side, key, engine)  # nothing there
    engine.write_bytes(b"serialized engine")
    assert not trt.is_current(side, key, engine)  # an engine without a sidecar is not trusted
    side.write_text(json.dumps(trt.sidecar_doc(key, trt.BuildOptions(), sha256_file(engine), 1.0)))
    assert trt.is_current(side, key, engine)
    assert not trt.is_current(side, _key(gpu_name="NVIDIA A100"), engine)  # another GPU: rebuild
    engine.write_bytes(b"replaced engine")
    assert not trt.is_current(side, key, engine)  # bytes changed behind the sidecar
    side.write_text("not json")
    assert not trt.is_current(side, key, engine)


def test_without_tensorrt_the_backend_says_why(tiny_export):
    if trt.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    md = ModelDir(tiny_export)
    assert not trt.engines_usable(md)
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        trt.engine_runners(md)


def test_auto_order_given_the_probe_results():
    """Only the ordering: every probe is given (the probes themselves are tested below and in
    test_openvino)."""
    assert auto_order(None, trt_ok=True, cuda_ok=True, ov_ok=False) == ["trt", "ort-cuda", "ort-cpu"]
    assert auto_order(None, trt_ok=False, cuda_ok=True, ov_ok=False) == ["ort-cuda", "ort-cpu"]
    assert auto_order(None, trt_ok=False, cuda_ok=False, ov_ok=False) == ["ort-cpu"]
    assert auto_order(None, trt_ok=True, cuda_ok=True, ov_ok=True) == ["trt", "ort-cuda", "ov-cpu", "ort-cpu"]
    assert auto_order(None, trt_ok=False, cuda_ok=False, ov_ok=True) == ["ov-cpu", "ort-cpu"]


def test_out_of_memory_fallback_ends_at_the_first_cpu_backend():
    """A GPU that ran out of memory falls back to the best CPU engine; the CPU ones do not chain."""
    assert fallback_chain(["trt", "ort-cuda", "ov-cpu", "ort-cpu"]) == ["trt", "ort-cuda", "ov-cpu"]
    assert fallback_chain(["trt", "ort-cuda", "ort-cpu"]) == ["trt", "ort-cuda", "ort-cpu"]
    assert fallback_chain(["ov-cpu", "ort-cpu"]) == ["ov-cpu"]
    assert fallback_chain(["ort-cpu"]) == ["ort-cpu"]


class FakeTensorRT(types.ModuleType):
    """Just enough of `tensorrt` to build and deserialise engines; every build (its bytes and the
    config's flags), parse (the ONNX graph), flag, calibrator and deserialisation is recorded."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.99.0"
        self.built, self.deserialized, self.flags = [], [], []
        self.build_flags, self.parsed, self.calibrators = [], [], []  # per build, per parse, any set
        fake = self
        ns = types.SimpleNamespace
        self.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
        self.BuilderFlag = ns(TF32="TF32", FP16="FP16", INT8="INT8", VERSION_COMPATIBLE="VERSION_COMPATIBLE",
                              OBEY_PRECISION_CONSTRAINTS="OBEY")
        self.LayerType = ns(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX", QUANTIZE="QUANTIZE",
                            DEQUANTIZE="DEQUANTIZE", CONVOLUTION="CONVOLUTION", ELEMENTWISE="ELEMENTWISE")
        self.float32, self.float16 = "float32", "float16"
        self.TensorIOMode = ns(INPUT="INPUT", OUTPUT="OUTPUT")
        self.ExecutionContextAllocationStrategy = ns(USER_MANAGED=2)

        class Logger:
            WARNING = 2

            def __init__(self, level=None):
                pass

        class Config:
            def __init__(self):
                object.__setattr__(self, "flags", [])

            def __setattr__(self, name, value):
                if name == "int8_calibrator":
                    fake.calibrators.append(value)
                object.__setattr__(self, name, value)

            def set_memory_pool_limit(self, *a):
                pass

            def clear_flag(self, flag):
                pass

            def set_flag(self, flag):
                self.flags.append(flag)
                fake.flags.append(flag)

            def add_optimization_profile(self, prof):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return ns(num_layers=0)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return ns(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                blob = f"engine {len(fake.built)}".encode() * 20
                fake.built.append(blob)
                fake.build_flags.append(sorted(config.flags))
                return blob

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, model, path=None):
                fake.parsed.append((path, onnx.ModelProto.FromString(bytes(model))))
                return True

            def parse_from_file(self, path):
                fake.parsed.append((path, onnx.load(path)))
                return True

        class Engine:
            num_io_tensors = 0
            device_memory_size_v2 = 0  # no scratch memory: nothing to allocate

            def create_execution_context(self, strategy):
                return ns(set_device_memory=lambda ptr, size: None)

        class Runtime:
            def __init__(self, logger):
                self.engine_host_code_allowed = False

            def deserialize_cuda_engine(self, data):
                fake.deserialized.append((bytes(data), self.engine_host_code_allowed))
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime


@pytest.fixture
def fake_gpu(monkeypatch, tiny_export, tmp_path):
    """A copy of the tiny model on a machine with a fake TensorRT and a fake GPU."""
    import shutil

    import aldm.runtime.cuda as cuda

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: cuda.GpuInfo("Fake GPU", "9.0", 80.0))

    class Stream:
        def sync(self):
            pass

        def destroy(self):
            pass

    monkeypatch.setattr(cuda, "Stream", Stream)
    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    return fake, d


@pytest.mark.parametrize("version_compatible", [False, True])
def test_built_engines_are_registered_and_loaded_only_as_registered(fake_gpu, version_compatible):
    from aldm.export.trt_build import build_engines

    fake, d = fake_gpu
    stale = d / trt.ENGINE_DIR / ".unet.fp32.partial-1-abcd.plan"  # left by a killed build
    stale.parent.mkdir()
    stale.write_bytes(b"half an engine")
    docs = build_engines(d, trt.BuildOptions("fp32", 2, version_compatible=version_compatible), say=lambda s: None)
    assert not stale.exists()
    assert sorted(p.name for p in (d / trt.ENGINE_DIR).iterdir()) == sorted(
        f"{c}.fp32.plan{ext}" for c in docs for ext in ("", ".json"))  # no temporary files left
    for c, blob in zip(docs, fake.built):
        assert docs[c]["engine_sha256"] == hashlib.sha256(blob).hexdigest()  # the bytes built
        assert (d / trt.ENGINE_DIR / f"{c}.fp32.plan").read_bytes() == blob
    assert ("VERSION_COMPATIBLE" in fake.flags) == version_compatible
    md = ModelDir(d)
    assert trt.engines_usable(md, "fp32")
    assert auto_order(md, "fp32")[0] == "trt"  # the real probe, not a given answer
    runners = trt.engine_runners(md, precision="fp32")
    for r in runners.values():
        r.activate()
    assert [b for b, _ in fake.deserialized] == fake.built
    assert {h for _, h in fake.deserialized} == {version_compatible}  # host code only if built so
    assert set(docs) == {"encoder", "spade", "unet", "decoder", "unet_step"}  # the export has the step graph
    # a rebuild with the same options reuses every engine (nothing built)
    build_engines(d, trt.BuildOptions("fp32", 2, version_compatible=version_compatible), say=lambda s: None)
    assert len(fake.built) == len(docs)


def test_a_tampered_engine_is_stale_for_the_probe_and_refused_by_the_runner(fake_gpu):
    from aldm.export.trt_build import build_engines

    fake, d = fake_gpu
    build_engines(d, trt.BuildOptions("fp32", 2), say=lambda s: None)
    md = ModelDir(d)
    runners = trt.engine_runners(md, precision="fp32")
    engine = d / trt.ENGINE_DIR / "unet.fp32.plan"
    engine.write_bytes(b"x" + engine.read_bytes()[1:])  # changed after the runners were made
    with pytest.raises(BackendError, match="unet.fp32.plan: sha256 does not match"):
        runners["unet"].activate()
    assert fake.deserialized == []
    assert not trt.engines_usable(md, "fp32")
    assert "trt" not in auto_order(md, "fp32")
    with pytest.raises(BackendError, match="no current fp32 TensorRT engines"):
        trt.engine_runners(md, precision="fp32")


class _Fake:
    def __init__(self, name, error=None):
        self.name, self.error, self.calls, self.active = name, error, 0, False

    def activate(self):
        self.active = True

    def infer(self, feeds):
        self.calls += 1
        if self.error:
            raise BackendError(self.error)
        return {"out": np.ones(1)}

    def deactivate(self):
        self.active = False


def test_out_of_memory_falls_back_to_the_next_backend_with_a_warning():
    gpu, cpu = _Fake("trt", "trt out of memory in unet: CUDA out of memory"), _Fake("ort-cpu")
    r = FallbackRunner("unet", [("trt", lambda: gpu), ("ort-cpu", lambda: cpu)])
    assert r.name == "trt"
    with pytest.warns(RuntimeWarning, match="trt ran out of GPU memory; falling back to ort-cpu"):
        assert r.infer({})["out"][0] == 1
    assert r.name == "ort-cpu" and not gpu.active and cpu.calls == 1
    r.infer({})
    assert gpu.calls == 1  # the failed backend is not retried


def test_other_errors_are_not_hidden_by_the_fallback():
    r = FallbackRunner("unet", [("trt", lambda: _Fake("trt", "engine is corrupt")),
                                ("ort-cpu", lambda: _Fake("ort-cpu"))])
    with pytest.raises(BackendError, match="corrupt"):
        r.infer({})


def test_precision_plan_keeps_norms_quantizer_and_time_embedding_in_fp32(tiny_export):
    enc = onnx.load(str(tiny_export / "encoder.onnx"))
    keep = fp32_nodes(enc)
    by_name = {n.name: n for n in enc.graph.node}
    ops_kept = {by_name[k].op_type for k in keep}
    assert {"ReduceMean", "Sqrt", "ArgMin", "MatMul", "Gather"} <= ops_kept  # staged norms, quantizer
    assert all("quantize" in node_scope(n) for n in enc.graph.node if n.op_type == "ArgMin")
    assert not any(by_name[k].op_type == "Conv" for k in keep)
    unet = onnx.load(str(tiny_export / "unet.onnx"))
    keep = fp32_nodes(unet)
    kept_ops = [n.op_type for n in unet.graph.node if n.name in keep]
    assert {"ReduceMean", "Sqrt", "Softmax", "Cos", "Sin", "Gemm"} <= set(kept_ops)
    marked = [n.name for n in unet.graph.node if any(p.key == NORM_MARK for p in n.metadata_props)]
    assert marked and set(marked) <= keep  # every node of a rewritten normalisation stays FP32
    cos = next(n for n in unet.graph.node if n.op_type == "Cos")
    producer = next(n for n in unet.graph.node if cos.input[0] in n.output)
    assert producer.name in keep  # t * freqs is computed in FP32 too
    assert not any(n.op_type == "Conv" and n.name in keep for n in unet.graph.node)


def test_fp16_copy_keeps_fp32_islands_exact_and_stays_trt_compatible(tiny_export, tmp_path):
    md = ModelDir(tiny_export)
    for c in ("encoder", "unet"):
        dst = tmp_path / f"{c}.fp16.onnx"
        to_fp16(md.component_file(c), dst)
        assert check_file(dst) == []
        m = onnx.load(str(dst))
        assert sum(1 for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16) > 5
        feeds = sample_feeds(md.component(c), 2, 0)
        a = OrtRunner(md.component_file(c), md.component(c)).infer(feeds)
        b = OrtRunner(dst, md.component(c)).infer(feeds)
        (name,) = a
        assert b[name].dtype == np.float32
        rel = np.abs(a[name] - b[name]).max() / np.abs(a[name]).max()
        assert rel < 3e-2
        if c == "unet":
            assert rel > 0  # really computed in FP16
        else:  # FP16 convolutions, FP32 quantizer: the same codebook entries come out exactly
            assert rel == 0
    # between two FP32 nodes the quantizer's data is never rounded through FP16
    m = onnx.load(str(tmp_path / "encoder.fp16.onnx"))
    argmin = next(n for n in m.graph.node if n.op_type == "ArgMin")
    producer = next(n for n in m.graph.node if argmin.input[0] in n.output)
    assert producer.op_type == "Sub"


@pytest.mark.gpu
def test_build_and_run_engines_on_a_gpu(tiny_export, tmp_path):
    from aldm.runtime.cuda import gpu_info

    if trt.tensorrt_version() is None:
        pytest.skip("TensorRT's builder is not installed (PyPI serves only stubs here; needs NVIDIA's index)")
    if gpu_info() is None:
        pytest.skip("no CUDA GPU on this machine")
    import shutil

    from aldm.runtime.pipeline import Pipeline
    from aldm.export.trt_build import build_engines

    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    build_engines(d, trt.BuildOptions("fp32", 2))
    assert trt.engines_usable(ModelDir(d), "fp32")
    x = sample_feeds(ModelDir(d).component("encoder"), 1, 0)["x"]
    a = Pipeline.load(d, backend="trt", precision="fp32").translate(x, ["t2"], steps=5, seed=0)
    b = Pipeline.load(d, backend="ort-cpu").translate(x, ["t2"], steps=5, seed=0)
    assert np.abs(a.volumes["t2"] - b.volumes["t2"]).max() < 1e-2
