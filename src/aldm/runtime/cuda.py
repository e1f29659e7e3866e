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


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate())

    def htod(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        rt = cudart()
        src = np.ascontiguousarray(src)
        check(rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst.ctypes.data, src.ptr, dst.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle))

    def sync(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def begin_capture(self) -> None:
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))

    def end_capture(self):
        """Finish a capture and return an instantiated, launchable graph."""
        rt = cudart()
        graph = check(rt.cudaStreamEndCapture(self.handle))
        return check(rt.cudaGraphInstantiate(graph, 0))

    def launch(self, graph_exec) -> None:
        check(cudart().cudaGraphLaunch(graph_exec, self.handle))

    def destroy(self) -> None:
        check(cudart().cudaStreamDestroy(self.handle))
