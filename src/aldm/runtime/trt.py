"""TensorRT backend: the engine cache (keyed by content, never by a file's existence) and the
runner. Engines are built by `aldm build` (`aldm.export.trt_build`).

An engine is current only if its JSON sidecar matches, field for field, the key it would be
built with now: sha256 of the ONNX bytes, precision, optimisation profile, build flags,
TensorRT version, GPU name and compute capability, and for INT8 the sha256 of the calibrated QDQ
graph the engine is parsed from. Anything else is stale.

The sidecar is also the engine's registration: its `engine_sha256` is the only thing that lets a
plan be deserialised. TrtRunner reads the engine once, hashes those bytes, compares them with the
registered sha256 and only then hands the same bytes to TensorRT; a plan without a sidecar is
never loaded, and embedded host code (the lean runtime of a version-compatible engine) is allowed
only when the sidecar's build options say `version_compatible`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
               gpu_name: str, compute_capability: str, calibration_sha256: str | None = None) -> dict[str, Any]:
    """Everything that determines an engine; stored beside it and compared on every use.
    `calibration_sha256`: for INT8, the sha256 of the QDQ graph `aldm calibrate` wrote (its scales
    are the calibration), so a new calibration makes the old engine stale."""
    return {
        "onnx_sha256": onnx_sha256, "precision": options.precision, "calibration_sha256": calibration_sha256,
        "profile": {k: [list(s) for s in v] for k, v in prof.items()},
        "version_compatible": options.version_compatible,
        "hardware_compatible": options.hardware_compatible,
        "tensorrt": trt_version, "gpu": gpu_name, "compute_capability": compute_capability,
    }


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def engine_paths(model: ModelDir, component: str, precision: str) -> tuple[Path, Path]:
    if component not in COMPONENTS or precision not in PRECISIONS:
        raise BackendError(f"no engine for {component!r} at precision {precision!r}; components: "
                           f"{', '.join(COMPONENTS)}, precisions: {', '.join(PRECISIONS)}")
    base = model.path / ENGINE_DIR / f"{component}.{precision}.plan"
    return base, sidecar_path(base)


def sidecar_path(engine: Path) -> Path:
    """Where an engine is registered: `<engine>.json` beside it."""
    return engine.with_name(engine.name + ".json")


def is_current(sidecar: Path, key: Mapping[str, Any], engine: Path) -> bool:
    """True only if the sidecar records exactly `key` and the engine bytes it hashed."""
    if sidecar.is_symlink() or engine.is_symlink() or not (sidecar.is_file() and engine.is_file()):
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
    calibration = None
    if options.precision == "int8":  # the engine is parsed from the calibrated QDQ graph
        calibration = model.manifest.files[model.component_file(component, "int8").name]
    return engine_key(model.manifest.files[onnx_file.name], options,
                      profile(model.component(component), options.max_targets), version,
                      gpu.name, gpu.compute_capability, calibration)


def read_options(model: ModelDir, precision: str) -> BuildOptions | None:
    """The options the engines of a precision were built with (from the UNet's sidecar)."""
    if precision not in PRECISIONS:
        return None
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


@dataclass(frozen=True)
class Registration:
    """What the sidecar says about an engine: its sha256 and the options it was built with."""

    engine_sha256: str
    options: BuildOptions


def registration(engine: Path) -> Registration:
    """The registration of `engine` from its sidecar; BackendError if it has none or a broken one."""
    side = sidecar_path(engine)
    if side.is_symlink() or not side.is_file():
        raise BackendError(f"{engine} is not registered (no {side.name} beside it); "
                           f"only engines built by `aldm build` are loaded")
    try:
        doc = json.loads(side.read_text())
        digest, options = doc["engine_sha256"], BuildOptions(**doc["options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{engine} is not registered: unreadable {side.name} ({exc})") from None
    if not (isinstance(digest, str) and len(digest) == 64):
        raise BackendError(f"{engine} is not registered: {side.name} has no engine sha256")
    return Registration(digest.lower(), options)


def read_engine(path: Path) -> bytes:
    """The bytes of a regular file, read once through one descriptor; a symbolic link is refused."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if Path(path).is_symlink():
            raise BackendError(f"{path}: is a symbolic link; engines are loaded only from regular files") from None
        raise BackendError(f"cannot read engine {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackendError(f"{path}: not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_engine(path: Path, reg: Registration | None = None):
    """Deserialise a registered engine: read once, hash those bytes, compare with the registered
    sha256, then deserialise the same bytes. Returns (runtime, engine); keep the runtime alive."""
    import tensorrt as trt

    path = Path(path)
    reg = reg or registration(path)
    data = read_engine(path)
    if hashlib.sha256(data).hexdigest() != reg.engine_sha256:
        raise BackendError(f"{path}: sha256 does not match its registration in {sidecar_path(path).name} "
                           f"(changed after it was built); rebuild it with `aldm build`")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    # a version-compatible engine embeds a lean runtime (host code): allowed for those alone
    runtime.engine_host_code_allowed = bool(reg.options.version_compatible)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BackendError(f"TensorRT could not deserialize {path}")
    return runtime, engine


def engine_runners(model: ModelDir, *, precision: str = "fp16") -> dict[str, "TrtRunner"]:
    if tensorrt_version() is None:
        raise BackendError("TensorRT is not installed (pip install 'aldm[gpu]' from NVIDIA's index)")
    if not engines_usable(model, precision):
        raise BackendError(f"no current {precision} TensorRT engines for {model.path} on this GPU "
                           f"and TensorRT version; build them with `aldm build {model.path}`")
    runners = {}
    for c in COMPONENTS:
        engine = engine_paths(model, c, precision)[0]
        reg = registration(engine)
        runners[c] = TrtRunner(engine, model.component(c), cuda_graph=reg.options.cuda_graph and c == "unet",
                               registration=reg)
    return runners


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
       "BOOL": np.bool_}


class TrtRunner:
    """One engine behind the runner protocol; device buffers via cuda-python, optional CUDA graph.

    The engine must be registered (its sidecar, or `registration`): see `load_engine`."""

    def __init__(self, engine_path: Path, spec: ComponentSpec, *, cuda_graph: bool = False,
                 registration: Registration | None = None):
        self.path, self.spec, self.cuda_graph = Path(engine_path), spec, cuda_graph
        self.registration = registration
        self.name = "trt"
        self.engine = self.context = self.stream = self.runtime = None
        self.buffers: dict[str, Any] = {}
        self._graph = None
        self._graph_shapes = None

    def activate(self) -> None:
        if self.context is not None:
            return
        import tensorrt as trt

        from aldm.runtime.cuda import Stream

        self.runtime, self.engine = load_engine(self.path, self.registration)
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
        self.context = self.engine = self.runtime = None
        if self.stream is not None:
            self.stream.destroy()
            self.stream = None


def sidecar_doc(key: Mapping[str, Any], options: BuildOptions, engine_sha256: str, build_s: float) -> dict:
    return {"key": dict(key), "key_digest": key_digest(key), "options": asdict(options),
            "engine_sha256": engine_sha256, "build_seconds": round(build_s, 1)}
