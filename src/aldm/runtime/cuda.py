"""Minimal CUDA runtime helpers over cuda-python (no torch): device buffers, a stream, copies,
CUDA graphs, device properties. Imported only by the TensorRT backend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aldm.errors import BackendError


def cudart():
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python
        except ImportError:
            raise BackendError("cuda-python is not installed: pip install 'aldm[gpu]'") from None
    return rt


def check(result):
    """cuda-python returns (err, *values); raise on error, return the values."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        name = rt.cudaGetErrorName(err)[1].decode() if hasattr(rt, "cudaGetErrorName") else str(err)
        if "MemoryAllocation" in name:
            raise BackendError(f"CUDA out of memory ({name})")
        raise BackendError(f"CUDA error {name}")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_gb: float


def gpu_info(device: int = 0) -> GpuInfo | None:
    """The GPU's name and compute capability, or None without CUDA."""
    try:
        rt = cudart()
        props = check(rt.cudaGetDeviceProperties(device))
    except BackendError:
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\x00"), f"{props.major}.{props.minor}", props.totalGlobalMem / 2**30)


ALIGN = 256  # TensorRT: tensor addresses and the context's device memory must be 256-byte aligned


def aligned(nbytes: int, align: int = ALIGN) -> int:
    """nbytes rounded up to a multiple of `align`."""
    return -(-int(nbytes) // align) * align


class DeviceBuffer:
    """cudaMalloc'd memory (aligned to at least 256 bytes)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost): copies from and to it run at full bus speed and
    truly asynchronously. `array(shape, dtype)` views its first bytes as a numpy array."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes)))

    def array(self, shape, dtype) -> np.ndarray:
        import ctypes

        count = int(np.prod(shape, dtype=np.int64))
        dtype = np.dtype(dtype)
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"{count * dtype.itemsize} bytes do not fit a {self.nbytes}-byte pinned buffer")
        raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype, count).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr))
            self.ptr = 0


class Graph:
    """A captured CUDA graph and its executable instance; `destroy` releases both."""

    def __init__(self, graph, exec_):
        self.graph, self.exec = graph, exec_

    def destroy(self) -> None:
        rt = cudart()
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if self.graph is not None:
            check(rt.cudaGraphDestroy(self.graph))
            self.graph = None


class Event:
    """A CUDA event without timing: marks a point in a stream the host can wait for."""

    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))

    def record(self, stream: "Stream") -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle))

    def sync(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaEventDestroy(self.handle))
            self.handle = None


_COPY_KINDS = {"htod": "cudaMemcpyHostToDevice", "dtoh": "cudaMemcpyDeviceToHost",
               "dtod": "cudaMemcpyDeviceToDevice"}


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate())

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        """cudaMemcpyAsync between raw addresses; kind: "htod", "dtoh" or "dtod"."""
        rt = cudart()
        kind = getattr(rt.cudaMemcpyKind, _COPY_KINDS[kind])
        check(rt.cudaMemcpyAsync(int(dst), int(src), int(nbytes), kind, self.handle))

    def htod(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        """Copy `src` to the device. The copy is asynchronous: keep `src` alive and unchanged until
        the stream has passed it (page-locked `src` for a truly asynchronous copy)."""
        self.copy(dst.ptr, src.ctypes.data, src.nbytes, "htod")

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        self.copy(dst.ctypes.data, src.ptr, dst.nbytes, "dtoh")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        check(cudart().cudaMemsetAsync(int(ptr), int(value), int(nbytes), self.handle))

    def sync(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def begin_capture(self) -> None:
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))

    def end_capture(self) -> Graph:
        """Finish a capture; the graph and its launchable instance (destroy it when done)."""
        rt = cudart()
        graph = check(rt.cudaStreamEndCapture(self.handle))
        try:
            exec_ = check(rt.cudaGraphInstantiate(graph, 0))
        except BackendError:
            check(rt.cudaGraphDestroy(graph))
            raise
        return Graph(graph, exec_)

    def launch(self, graph: Graph) -> None:
        check(cudart().cudaGraphLaunch(graph.exec, self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None
