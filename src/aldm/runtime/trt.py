"""TensorRT backend: the engine cache (keyed by content, never by a file's existence) and the
runner. Engines are built by `aldm build` (`aldm.runtime.trt_build`).

An engine is current only if its JSON sidecar matches, field for field, the key it would be
built with now: sha256 of the ONNX bytes, precision, optimisation profile, build flags,
TensorRT version, GPU name and compute capability. Anything else is stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from aldm.errors import BackendError
from aldm.runtime.manifest import COMPONENTS, ComponentSpec, ModelDir
from aldm.runtime.runners import check_feeds

ENGINE_DIR = "engines"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    max_targets: int = 3  # batch rows the profiles allow (targets x sources)
    workspace_gb: float = 8.0
    version_compatible: bool = False
    hardware_compatible: bool = False  # Ampere+ portable engines
    cuda_graph: bool = True  # capture the UNet step as a CUDA graph at run time


def profile(spec: ComponentSpec, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Explicit optimisation profile: batch 1..max_batch (optimised for max_batch), spatial dims
    fixed by the manifest."""
    if max_batch < 1:
        raise BackendError(f"max batch must be >= 1, got {max_batch}")
    opt = max_batch if spec.name in ("spade", "unet") else 1
    return {t.name: (t.concrete(1), t.concrete(opt), t.concrete(max_batch)) for t in spec.inputs}


def engine_key(onnx_sha256: str, options: BuildOptions, prof: Mapping[str, Any], trt_version: str,
               gpu_name: str, compute_capability: str) -> dict[str, Any]:
    """Everything that determines an engine; stored beside it and compared on every use."""
    return {
        "onnx_sha256": onnx_sha256, "precision": options.precision,
        "profile": {k: [list(s) for s in v] for k, v in prof.items()},
        "version_compatible": options.version_compatible,
        "hardware_compatible": options.hardware_compatible,
        "tensorrt": trt_version, "gpu": gpu_name, "compute_capability": compute_capability,
    }


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def engine_paths(model: ModelDir, component: str, precision: str) -> tuple[Path, Path]:
    base = model.path / ENGINE_DIR / f"{component}.{precision}.plan"
    return base, base.with_name(base.name + ".json")


def is_current(sidecar: Path, key: Mapping[str, Any], engine: Path) -> bool:
    """True only if the sidecar records exactly `key` and the engine bytes it hashed."""
    if not (sidecar.is_file() and engine.is_file()):
        return False
    try:
        doc = json.loads(sidecar.read_text())
    except ValueError:
        return False
    from aldm.runtime.manifest import sha256_file

    return doc.get("key") == json.loads(json.dumps(key)) and doc.get("engine_sha256") == sha256_file(engine)


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return getattr(trt, "__version__", None)


def current_key(model: ModelDir, component: str, options: BuildOptions) -> dict[str, Any] | None:
    """The key an engine for `component` must have on this machine, or None without TRT or GPU."""
    from aldm.runtime.cuda import gpu_info

    version, gpu = tensorrt_version(), gpu_info()
    if version is None or gpu is None:
        return None
    onnx_file = model.component_file(component, "fp32")
    return engine_key(model.manifest.files[onnx_file.name], options,
                      profile(model.component(component), options.max_targets), version,
                      gpu.name, gpu.compute_capability)


def read_options(model: ModelDir, precision: str) -> BuildOptions | None:
    """The options the engines of a precision were built with (from the UNet's sidecar)."""
    _, side = engine_paths(model, "unet", precision)
    try:
        return BuildOptions(**json.loads(side.read_text())["options"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def engines_usable(model: ModelDir, precision: str = "fp16") -> bool:
    """TensorRT, a GPU and current engines of every component are all present."""
    options = read_options(model, precision)
    if options is None:
        return False
    for c in COMPONENTS:
        key = current_key(model, c, options)
        engine, side = engine_paths(model, c, precision)
        if key is None or not is_current(side, key, engine):
            return False
    return True


def make_runners(model: ModelDir, *, precision: str = "fp16") -> dict[str, "TrtRunner"]:
    if tensorrt_version() is None:
        raise BackendError("TensorRT is not installed (pip install 'aldm[gpu]' from NVIDIA's index)")
    if not engines_usable(model, precision):
        raise BackendError(f"no current {precision} TensorRT engines for {model.path} on this GPU "
                           f"and TensorRT version; build them with `aldm build {model.path}`")
    options = read_options(model, precision)
    return {c: TrtRunner(engine_paths(model, c, precision)[0], model.component(c),
                         cuda_graph=options.cuda_graph and c == "unet") for c in COMPONENTS}


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
       "BOOL": np.bool_}


class TrtRunner:
    """One engine behind the runner protocol; device buffers via cuda-python, optional CUDA graph."""

    def __init__(self, engine_path: Path, spec: ComponentSpec, *, cuda_graph: bool = False):
        self.path, self.spec, self.cuda_graph = Path(engine_path), spec, cuda_graph
        self.name = "trt"
        self.engine = self.context = self.stream = None
        self.buffers: dict[str, Any] = {}
        self._graph = None
        self._graph_shapes = None

    def activate(self) -> None:
        if self.context is not None:
            return
        import tensorrt as trt

        from aldm.runtime.cuda import Stream

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        runtime.engine_host_code_allowed = True  # version-compatible engines embed a lean runtime
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.path}")
        self.context = self.engine.create_execution_context()
        self.stream = Stream()
        self._io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in self._io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._dtype = {n: _NP[self.engine.get_tensor_dtype(n).name] for n in self._io}

    def _buffer(self, name: str, nbytes: int):
        from aldm.runtime.cuda import DeviceBuffer

        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self.buffers[name] = DeviceBuffer(nbytes)
            self._graph = None  # addresses changed
        return buf

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        self.activate()
        shapes = tuple(feeds[n].shape for n in self._inputs)
        for n in self._inputs:
            arr = np.ascontiguousarray(feeds[n], dtype=self._dtype[n])
            self.context.set_input_shape(n, arr.shape)
            buf = self._buffer(n, arr.nbytes)
            self.context.set_tensor_address(n, buf.ptr)
            self.stream.htod(buf, arr)
        outputs = {}
        for n in self._io:
            if n in self._inputs:
                continue
            out = np.empty(tuple(self.context.get_tensor_shape(n)), self._dtype[n])
            self.context.set_tensor_address(n, self._buffer(n, out.nbytes).ptr)
            outputs[n] = out
        self._execute(shapes)
        for n, out in outputs.items():
            self.stream.dtoh(out, self.buffers[n])
        self.stream.sync()
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in outputs.items()}

    def _execute(self, shapes) -> None:
        if not self.cuda_graph:
            if not self.context.execute_async_v3(self.stream.handle):
                raise BackendError(f"TensorRT failed to run {self.spec.name}")
            return
        if self._graph is None or self._graph_shapes != shapes:
            self.context.execute_async_v3(self.stream.handle)  # warm-up before capture
            self.stream.begin_capture()
            self.context.execute_async_v3(self.stream.handle)
            self._graph, self._graph_shapes = self.stream.end_capture(), shapes
        self.stream.launch(self._graph)

    def deactivate(self) -> None:
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        self._graph = None
        self.context = self.engine = None
        if self.stream is not None:
            self.stream.destroy()
            self.stream = None


def sidecar_doc(key: Mapping[str, Any], options: BuildOptions, engine_sha256: str, build_s: float) -> dict:
    return {"key": dict(key), "key_digest": key_digest(key), "options": asdict(options),
            "engine_sha256": engine_sha256, "build_seconds": round(build_s, 1)}
