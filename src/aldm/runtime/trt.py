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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from aldm.errors import BackendError
from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH, ComponentSpec, ModelDir
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
    opt = max_batch if spec.name in ("spade", "unet", STEP_GRAPH) else 1
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
    if component not in COMPONENTS + (STEP_GRAPH,) or precision not in PRECISIONS:
        raise BackendError(f"no engine for {component!r} at precision {precision!r}; components: "
                           f"{', '.join(COMPONENTS + (STEP_GRAPH,))}, precisions: {', '.join(PRECISIONS)}")
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
    """TensorRT, a GPU and current engines of the four components are all present (the step
    engine is optional: without a current one the pipeline runs the host loop)."""
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


def engine_components(model: ModelDir, precision: str = "fp32") -> tuple[str, ...]:
    """The components that get an engine: the four, and the sampler-step graph where the folder has
    it (at INT8 only where `aldm calibrate` quantized it too: its engine is parsed from that graph)."""
    step = model.has_step_graph and (precision != "int8" or STEP_GRAPH in model.manifest.variants.get("int8", {}))
    return COMPONENTS + ((STEP_GRAPH,) if step else ())


def engine_runners(model: ModelDir, *, precision: str = "fp16") -> dict[str, "TrtRunner"]:
    """Runners for the four engines, plus the step engine's (`TrtStepRunner`, the DDIM loop on the
    GPU) where the folder has a step graph and its engine is current: without it the pipeline
    runs the host loop over the UNet engine. All share one stream and one scratch block."""
    if tensorrt_version() is None:
        raise BackendError("TensorRT is not installed (pip install 'aldm[gpu]' from NVIDIA's index)")
    if not engines_usable(model, precision):
        raise BackendError(f"no current {precision} TensorRT engines for {model.path} on this GPU "
                           f"and TensorRT version; build them with `aldm build {model.path}`")
    from aldm.runtime.trt_loop import TrtStepRunner

    memory = EngineMemory()
    runners = {}
    for c in engine_components(model, precision):
        engine, side = engine_paths(model, c, precision)
        if c == STEP_GRAPH:
            key = current_key(model, c, read_options(model, precision))
            if key is None or not is_current(side, key, engine):  # built before the folder had its step graph
                warnings.warn(f"{model.path}: no current {precision} engine for the sampler-step graph: DDIM runs "
                              f"a host loop over the UNet engine (x crosses to the host every step); "
                              f"`aldm build {model.path}` builds it", RuntimeWarning, stacklevel=2)
                continue
        reg = registration(engine)
        cls = TrtStepRunner if c == STEP_GRAPH else TrtRunner
        runners[c] = cls(engine, model.component(c), registration=reg, memory=memory,
                         cuda_graph=reg.options.cuda_graph and c in ("unet", STEP_GRAPH))
    return runners


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
       "BOOL": np.bool_}


class EngineMemory:
    """What the engines of one model share on the GPU: one stream (they run one after another) and
    one scratch block for their execution contexts, sized to the largest engine's need (as
    TensorRT's diffusion demo does), instead of one volume-sized block per engine.

    Contexts are created without device memory (ExecutionContextAllocationStrategy.USER_MANAGED,
    or create_execution_context_without_device_memory before TensorRT 10) and pointed at the block;
    when an engine that needs more is activated, the block grows, every context is re-pointed and
    every captured CUDA graph is dropped (a graph bakes in the scratch addresses it was captured with)."""

    def __init__(self):
        self.stream = None
        self.block = None  # DeviceBuffer
        self.contexts: dict[int, tuple[Any, str, Any]] = {}  # id -> (context, name, on_move)

    def create_context(self, engine, name: str, on_move=lambda: None):
        """A context pointed at the shared block; `on_move()` is called before the block moves."""
        import tensorrt as trt

        from aldm.runtime.cuda import Stream

        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {name}")
        size = int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2")
                   else engine.device_memory_size)
        if self.stream is None:
            self.stream = Stream()
        if size > 0 and (self.block is None or self.block.nbytes < size):
            self._grow(size)
        self.contexts[id(context)] = (context, name, on_move)
        self._point(context, name)
        return context

    def _grow(self, size: int) -> None:
        from aldm.runtime.cuda import DeviceBuffer

        self.stream.sync()  # nothing may still run in the old block
        for _, _, on_move in self.contexts.values():
            on_move()
        old, self.block = self.block, DeviceBuffer(size)
        for context, name, _ in self.contexts.values():
            self._point(context, name)
        if old is not None:
            old.free()

    def _point(self, context, name: str) -> None:
        ptr, size = (self.block.ptr, self.block.nbytes) if self.block is not None else (0, 0)  # none needed
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: with its size
            context.set_device_memory(ptr, size)
        else:
            context.device_memory = ptr

    def release(self, context) -> None:
        """Forget a context; with the last one, free the block and the stream."""
        self.contexts.pop(id(context), None)
        if not self.contexts:
            if self.stream is not None:
                self.stream.sync()
                self.stream.destroy()
                self.stream = None
            if self.block is not None:
                self.block.free()
                self.block = None


class TrtRunner:
    """One engine behind the runner protocol: device buffers and page-locked host staging reused
    from call to call (grown when a call needs more), CUDA graphs per input-shape set, every
    TensorRT call's result checked. I/O keeps the dtypes the engine declares; FP16 outputs are
    widened to float32 on the host after the copy (cuda-python has no kernels to do it on the GPU).

    The engine must be registered (its sidecar, or `registration`): see `load_engine`."""

    def __init__(self, engine_path: Path, spec: ComponentSpec, *, cuda_graph: bool = False,
                 registration: Registration | None = None, memory: EngineMemory | None = None):
        self.path, self.spec, self.cuda_graph = Path(engine_path), spec, cuda_graph
        self.registration = registration
        self.memory = memory or EngineMemory()
        self.name = "trt"
        self.engine = self.context = self.stream = self.runtime = None
        self.buffers: dict[str, Any] = {}  # name -> DeviceBuffer
        self.pinned: dict[str, Any] = {}  # name -> PinnedBuffer
        self.graphs: dict[Any, Any] = {}  # key (shapes, ...) -> cuda.Graph
        self.max_batch: int | None = None

    def activate(self) -> None:
        if self.context is not None:
            return
        import tensorrt as trt

        self.runtime, self.engine = load_engine(self.path, self.registration)
        self.context = self.memory.create_context(self.engine, self.spec.name, on_move=self.drop_graphs)
        self.stream = self.memory.stream
        self._io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in self._io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._dtype = {n: _NP[self.engine.get_tensor_dtype(n).name] for n in self._io}
        batched = [t.name for t in self.spec.inputs if t.shape and t.shape[0] == "batch"]
        if batched and hasattr(self.engine, "get_tensor_profile_shape"):
            self.max_batch = int(self.engine.get_tensor_profile_shape(batched[0], 0)[2][0])
        elif self.registration is not None:
            self.max_batch = self.registration.options.max_targets

    def check_batch(self, batch: int) -> None:
        """A batch the engine's optimisation profile does not cover is refused before any call:
        before activation by the registered build options, after it by the engine's profile."""
        limit = self.max_batch
        if limit is None and self.registration is not None:
            limit = self.registration.options.max_targets
        if limit is not None and batch > limit:
            raise BackendError(f"{self.spec.name}: batch {batch} is above the TensorRT engine's maximum "
                               f"{limit} (targets x sources); translate fewer at once or "
                               f"rebuild with `aldm build --max-targets {batch}`")

    def call(self, ok, what: str) -> None:
        """TensorRT reports failure by returning False: a BackendError naming the engine."""
        if ok is False or ok is None:
            raise BackendError(f"TensorRT {what} failed for the {self.spec.name} engine ({self.path.name})")

    def _buffer(self, name: str, nbytes: int):
        from aldm.runtime.cuda import DeviceBuffer

        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            self.drop_graphs()  # captured addresses change
            if buf is not None:
                self.stream.sync()
                buf.free()
            buf = self.buffers[name] = DeviceBuffer(nbytes)
        return buf

    def _pinned(self, name: str, nbytes: int):
        from aldm.runtime.cuda import PinnedBuffer

        buf = self.pinned.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.stream.sync()
                buf.free()
            buf = self.pinned[name] = PinnedBuffer(nbytes)
        return buf

    def set_input(self, name: str, shape) -> None:
        self.call(self.context.set_input_shape(name, tuple(shape)), f"set_input_shape({name}, {tuple(shape)})")

    def bind(self, name: str, ptr: int) -> None:
        self.call(self.context.set_tensor_address(name, ptr), f"set_tensor_address({name})")

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"TensorRT could not infer the shape of {name} for the {self.spec.name} engine")
        return shape

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        batch = next((feeds[t.name].shape[0] for t in self.spec.inputs if t.shape and t.shape[0] == "batch"), 1)
        self.check_batch(batch)
        self.activate()
        self.check_batch(batch)
        shapes = tuple(feeds[n].shape for n in self._inputs)
        for n in self._inputs:
            arr = feeds[n]
            self.set_input(n, arr.shape)
            nbytes = arr.size * np.dtype(self._dtype[n]).itemsize
            buf, stage = self._buffer(n, nbytes), self._pinned(n, nbytes)
            np.copyto(stage.array(arr.shape, self._dtype[n]), arr, casting="unsafe")
            self.stream.copy(buf.ptr, stage.ptr, nbytes, "htod")
            self.bind(n, buf.ptr)
        outputs = {}
        for n in self._io:
            if n not in self._inputs:
                shape = self.output_shape(n)
                nbytes = int(np.prod(shape)) * np.dtype(self._dtype[n]).itemsize
                self.bind(n, self._buffer(n, nbytes).ptr)
                outputs[n] = (shape, nbytes)
        self.execute(shapes)
        for n, (_, nbytes) in outputs.items():
            self.stream.copy(self._pinned(n, nbytes).ptr, self.buffers[n].ptr, nbytes, "dtoh")
        self.stream.sync()
        # copies out of the staging buffers (the next call reuses them), widened to float32
        return {n: self.pinned[n].array(shape, self._dtype[n]).astype(
                    np.float32 if self._dtype[n] == np.float16 else self._dtype[n])
                for n, (shape, _) in outputs.items()}

    def execute(self, key) -> None:
        """Run the engine on the stream with the addresses bound now: directly, or through the CUDA
        graph captured for `key` (the input shapes and whatever else fixes the addresses)."""
        if not self.cuda_graph:
            self.call(self.context.execute_async_v3(self.stream.handle), "execute_async_v3")
            return
        graph = self.graphs.get(key)
        if graph is None:
            # TensorRT does its first-run work (allocations, shape setup) outside the capture
            self.call(self.context.execute_async_v3(self.stream.handle), "execute_async_v3")
            self.stream.begin_capture()
            try:
                ok = self.context.execute_async_v3(self.stream.handle)
            finally:
                graph = self.stream.end_capture()
            if not ok:
                graph.destroy()
                self.call(ok, "execute_async_v3 (CUDA graph capture)")
            self.graphs[key] = graph
        self.stream.launch(graph)

    def drop_graphs(self) -> None:
        """Destroy every captured graph (cudaGraphExecDestroy + cudaGraphDestroy)."""
        if self.graphs and self.stream is not None:
            self.stream.sync()
        for graph in self.graphs.values():
            graph.destroy()
        self.graphs.clear()

    def deactivate(self) -> None:
        if self.context is None:
            return
        self.drop_graphs()
        self.stream.sync()
        for buf in list(self.buffers.values()) + list(self.pinned.values()):
            buf.free()
        self.buffers.clear()
        self.pinned.clear()
        self.memory.release(self.context)
        self.context = self.engine = self.runtime = self.stream = None


def sidecar_doc(key: Mapping[str, Any], options: BuildOptions, engine_sha256: str, build_s: float) -> dict:
    return {"key": dict(key), "key_digest": key_digest(key), "options": asdict(options),
            "engine_sha256": engine_sha256, "build_seconds": round(build_s, 1)}
