"""One small runner protocol for every backend: activate / infer(feeds) / deactivate.

The pipeline drives runners without knowing which backend they are. Backends load lazily:
onnxruntime here, TensorRT in `aldm.runtime.trt`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np

from aldm.errors import BackendError, InputError, ModelError, require
from aldm.runtime.manifest import ComponentSpec

ORT = ("onnxruntime", "cpu", "gpu")  # the module and the extras that install it (CPU or CUDA build)


class Runner(Protocol):
    name: str  # backend name, e.g. "ort-cpu"

    def activate(self) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...


class BindingRunner(Runner, Protocol):
    """A CPU runner that also writes outputs into arrays the caller owns (the slab decoder's
    buffers): infer(feeds, out={name: C-contiguous array of the output's shape and dtype}); the
    result holds those arrays. `trim` frees the working memory of the last inference but keeps
    the loaded graph (the next inference allocates it again, without reloading)."""

    def infer(self, feeds: Mapping[str, np.ndarray],
              out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]: ...

    def trim(self) -> None: ...


class StepLoopRunner(Runner, Protocol):
    """A runner of the sampler-step graph (manifest.STEP_GRAPH) that runs the whole DDIM loop
    where its tensors live (a GPU): c_concat and y bound once per translation, x kept on the
    device between steps and copied to the host at the end (and for a callback that asks for it).
    Same noise draws, callbacks and result as aldm.runtime.sampler.ddim_sample_steps."""

    def ddim_loop(self, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule, noise, *,
                  official_rng: bool = True, callback=None) -> np.ndarray: ...


def step_graph_loop(runner: Runner, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule, noise, *,
                    official_rng: bool = True, callback=None) -> np.ndarray:
    """DDIM through a runner of the step graph: its own device loop where it has one
    (StepLoopRunner), else the graph called once per step by aldm.runtime.sampler.ddim_sample_steps."""
    from aldm.runtime.sampler import ddim_sample_steps

    if hasattr(runner, "ddim_loop"):
        return runner.ddim_loop(x_T, c_concat, y, schedule, noise, official_rng=official_rng, callback=callback)
    out = runner.spec.outputs[0].name if hasattr(runner, "spec") else "x_prev"

    def step(x: np.ndarray, t: np.ndarray, coef: np.ndarray, z: np.ndarray) -> np.ndarray:
        return runner.infer({"x_t": x, "t": t, "c_concat": c_concat, "y": y, "coef": coef, "noise": z})[out]

    return ddim_sample_steps(step, x_T, schedule, noise, official_rng=official_rng, callback=callback)


def trim(runner: Runner, give_back: bool = True) -> None:
    """Free a runner's working memory: `trim` where it has one (its graph stays loaded), else
    `deactivate`. give_back: also hand the freed heap back to the system (glibc keeps the freed
    blocks of the engines' threads in its arenas). Between the stages of a translation that lowers
    the next stage's peak (bundled model, 3 targets: 1.7 GB instead of 1.9 GB); between the steps
    of one decode it costs more than it saves (page faults: 14.8 s instead of 11.9 s per 3 decodes)."""
    getattr(runner, "trim", runner.deactivate)()
    if give_back:
        return_freed_memory()


def return_freed_memory() -> None:
    """malloc_trim(0) where the C library is glibc; a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def check_out(spec: ComponentSpec, out: Mapping[str, np.ndarray]) -> None:
    """Arrays to write outputs into: known names, float32, C-contiguous and writable."""
    names = {t.name for t in spec.outputs}
    for name, arr in out.items():
        if name not in names:
            raise InputError(f"{spec.name}: no output named {name!r} (outputs: {sorted(names)})")
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
            raise InputError(f"{spec.name}: the array for output {name!r} must be a writable, "
                             f"C-contiguous float32 array")


def check_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Every input present with the spec's dtype and shape, one batch size, nothing extra."""
    names = {t.name for t in spec.inputs}
    extra = set(feeds) - names
    missing = names - set(feeds)
    if missing or extra:
        raise InputError(f"{spec.name}: inputs must be {sorted(names)}; "
                         f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    batch = set()
    for t in spec.inputs:
        t.check(feeds[t.name], spec.name)
        if t.shape and t.shape[0] == "batch":  # per-graph constants (a slab's norm statistics) have none
            batch.add(feeds[t.name].shape[0])
    if len(batch) > 1:
        raise InputError(f"{spec.name}: inputs have different batch sizes {sorted(batch)}")


class OrtRunner:
    """ONNX Runtime session for one component (CPU or CUDA execution provider)."""

    def __init__(self, path: str | Path, spec: ComponentSpec, *, device: str = "cpu",
                 threads: int | None = None, io_binding: bool | None = None,
                 arena: bool | None = None, precision: str = "fp32"):
        self.path, self.spec, self.device, self.threads = Path(path), spec, device, threads
        self.name = f"ort-{device}" + ("" if precision == "fp32" else f"/{precision}")
        # ORT's CPU arena keeps every freed block. For volume-sized activations (encoder,
        # decoder: 1 GB each at 144x192x144) that piles up past 24 GB; without it the decoder
        # peaks near 6 GB at the same speed. For the UNet the arena saves ~30% per step.
        self.arena = spec.name not in ("encoder", "decoder") if arena is None else arena
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        self.session = self._binding = None

    def activate(self) -> None:
        if self.session is not None:
            return
        ort = require(*ORT)

        providers: Sequence[str] = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime has no CUDA execution provider (pip install 'aldm[gpu]' "
                                   "into an environment without the CPU onnxruntime, and a CUDA runtime)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = self.arena
        opts.enable_mem_pattern = self.arena
        try:
            self.session = ort.InferenceSession(os.fspath(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load {self.path} in onnxruntime: {str(exc).splitlines()[0]}") from None

    def infer(self, feeds: Mapping[str, np.ndarray],
              out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        if out:
            check_out(self.spec, out)
        self.activate()
        names = [t.name for t in self.spec.outputs]
        try:
            if out:
                return self._infer_into(feeds, names, out)
            if self.io_binding:
                return self._infer_bound(feeds, names)
            return dict(zip(names, self.session.run(names, dict(feeds))))
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "memory" in msg.lower() or "alloc" in msg.lower():
                raise BackendError(f"{self.name} out of memory in {self.spec.name}: {msg}") from None
            raise BackendError(f"{self.name} failed in {self.spec.name}: {msg}") from None

    def _infer_bound(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Through one IO binding kept for the session (each call rebinds the same names)."""
        if self._binding is None:
            self._binding = self.session.io_binding()
        binding = self._binding
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for n in names:
            binding.bind_output(n, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _infer_into(self, feeds: Mapping[str, np.ndarray], names: list[str],
                    out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs read in place, the `out` outputs written in place (CPU only)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for n in names:
            if n in out:
                binding.bind_ortvalue_output(n, ort.OrtValue.ortvalue_from_numpy(out[n]))
            else:
                binding.bind_output(n, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: out[n] if n in out else v.numpy() for n, v in zip(names, values)}

    def trim(self) -> None:
        """Without its arena (the encoder, decoder and slab graphs) ORT frees as it goes: nothing
        to do. With it, the arena keeps every block until the session goes."""
        if self.arena:
            self.deactivate()

    def deactivate(self) -> None:
        self.session = self._binding = None
