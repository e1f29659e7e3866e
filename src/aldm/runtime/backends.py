"""Backend names -> runners for the four components; `auto` picks the fastest available and
falls back to the next one, with a warning, when a GPU backend runs out of memory.

On the CPU, OpenVINO (`ov-cpu`) runs these graphs faster than ONNX Runtime (`ort-cpu`), so `auto`
prefers it whenever `openvino` imports; ONNX Runtime stays the CPU backend without it."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import numpy as np

from aldm.errors import BackendError, UsageError
from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH, ModelDir
from aldm.runtime.runners import OrtRunner, Runner, step_graph_loop, trim
from aldm.runtime.sampler import progress_only, wants_x

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ov-cpu", "trt", "torch")
DEFAULT_PRECISION = {"trt": "fp16", "ort-cpu": "fp32", "ort-cuda": "fp32", "ov-cpu": "fp32", "torch": "fp32"}
CPU_BACKENDS = ("ov-cpu", "ort-cpu")


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # no ONNX Runtime at all: the ort-cpu runner says which extra installs it
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def ov_available() -> bool:
    """Whether OpenVINO imports here (the ov-cpu backend; its CPU plugin ships in the wheel)."""
    from aldm.runtime.openvino import import_openvino

    try:
        import_openvino()
    except BackendError:
        return False
    return True


def auto_order(model: ModelDir, precision: str | None = None, *, trt_ok: bool | None = None,
               cuda_ok: bool | None = None, ov_ok: bool | None = None) -> list[str]:
    """Candidates for `auto`, best first: TensorRT (current engines + GPU), ORT CUDA, OpenVINO CPU
    (when openvino imports), ORT CPU."""
    from aldm.runtime import trt

    if trt_ok is None:
        trt_ok = trt.engines_usable(model, precision or DEFAULT_PRECISION["trt"])
    if cuda_ok is None:
        cuda_ok = ort_cuda_available()
    if ov_ok is None:
        ov_ok = ov_available()
    return ((["trt"] if trt_ok else []) + (["ort-cuda"] if cuda_ok else []) + (["ov-cpu"] if ov_ok else [])
            + ["ort-cpu"])


def fallback_chain(order: list[str]) -> list[str]:
    """The backends `auto` runs, in turn, on out-of-memory: the GPU ones, then the first CPU one.
    A CPU backend ends the chain: falling back is for a GPU whose memory ran out, and a second CPU
    engine would compete for the same RAM."""
    cpu = next((i for i, b in enumerate(order) if b in CPU_BACKENDS), len(order) - 1)
    return order[:cpu + 1]


def make_runners(model: ModelDir, backend: str = "ort-cpu", *, threads: int | None = None,
                 precision: str | None = None) -> dict[str, Runner]:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        order = fallback_chain(auto_order(model, precision))
        if len(order) == 1:
            return single_backend(model, order[0], threads=threads, precision=precision)
        made = _made_once(model, threads, precision)
        runners = {c: FallbackRunner(c, [(b, made(b, c)) for b in order]) for c in COMPONENTS}
        # the step graph's runner where the first backend has one (the TensorRT step engine, say),
        # falling back along the backends that have one too
        steps = [b for b in order if STEP_GRAPH in made(b)]
        if steps and steps[0] == order[0]:
            runners[STEP_GRAPH] = FallbackRunner(STEP_GRAPH, [(b, made(b, STEP_GRAPH)) for b in steps])
        return runners
    return single_backend(model, backend, threads=threads, precision=precision)


def single_backend(model: ModelDir, backend: str, *, threads: int | None = None,
                   precision: str | None = None) -> dict[str, Runner]:
    precision = precision or DEFAULT_PRECISION[backend]
    components = COMPONENTS + ((STEP_GRAPH,) if has_step_graph(model, precision) else ())
    if backend in ("ort-cpu", "ort-cuda"):
        device = backend.split("-")[1]
        step = OrtRunner
        if device == "cuda":  # the step graph's runner keeps the DDIM loop on the GPU
            from aldm.runtime.ort_loop import OrtStepRunner as step
        return {c: (step if c == STEP_GRAPH else OrtRunner)(model.component_file(c, precision), model.component(c),
                                                            device=device, threads=threads, precision=precision)
                for c in components}
    if backend == "ov-cpu":
        from aldm.runtime.openvino import OvRunner

        return {c: OvRunner(model.component_file(c, precision), model.component(c), threads=threads,
                            precision=precision) for c in components}
    if backend == "trt":
        from aldm.runtime import trt

        return trt.engine_runners(model, precision=precision)
    if backend in REGISTERED:
        return REGISTERED[backend](model, precision=precision)
    raise BackendError(f"the {backend} backend is not available here: the aldm command line registers it "
                       f"(from Python: aldm.export.torch_backend.register())")


def has_step_graph(model: ModelDir, precision: str) -> bool:
    """Whether the folder has the sampler-step graph at `precision` (a variant written before the
    step graph was added has none: that precision samples with the numpy loop)."""
    return model.has_step_graph and (precision == "fp32" or STEP_GRAPH in model.manifest.variants.get(precision, {}))


# Backends whose runners live above the runtime (the PyTorch reference runs aldm.models): the
# command line registers them, so the runtime never imports torch or the models.
REGISTERED: dict[str, Callable[..., dict[str, Runner]]] = {}


def register_backend(name: str, make: Callable[..., dict[str, Runner]]) -> None:
    """Make `name` a backend whose runners `make(model, precision=...)` builds (name must be one of
    BACKENDS; precision is the one asked for, or the backend's DEFAULT_PRECISION)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend name {name!r}")
    REGISTERED[name] = make


def extra_graph_runners(model: ModelDir, backend: str, threads: int | None = None):
    """(file name, spec) -> runner on `backend` for the folder's extra FP32 graphs (per-class
    MS-SPADE, the decoder's slab graphs), or None where they are not used: a GPU backend (its
    engines are built for the four components) or a reduced precision. `backend` is a resolved
    runner name ("ort-cpu", "ov-cpu", "ort-cpu/fp16", ...)."""
    if backend == "ov-cpu":
        from aldm.runtime.openvino import OvRunner

        return lambda f, spec: OvRunner(model.file(f), spec, threads=threads)
    if backend == "ort-cpu":  # the arena is off: one slab or class graph after another, each once
        return lambda f, spec: OrtRunner(model.file(f), spec, threads=threads, arena=False)
    return None


def _made_once(model: ModelDir, threads, precision):
    """made(backend) -> that backend's runners, made once and shared by every component (the
    TensorRT engines share one stream and scratch block); made(backend, component) -> a factory
    of that runner."""
    cache: dict[str, dict[str, Runner]] = {}

    def made(backend: str, component: str | None = None):
        def runners() -> dict[str, Runner]:
            if backend not in cache:
                cache[backend] = single_backend(model, backend, threads=threads,
                                                precision=precision if backend == "trt" else None)
            return cache[backend]
        return runners() if component is None else (lambda: runners()[component])

    return made


class FallbackRunner:
    """Runs the first candidate backend; on out-of-memory, warns and moves on to the next."""

    def __init__(self, component: str, candidates: list[tuple[str, Callable[[], Runner]]]):
        self.component, self.candidates = component, list(candidates)
        self.current: Runner | None = None

    @property
    def name(self) -> str:
        return self.current.name if self.current else self.candidates[0][0]

    def activate(self) -> None:
        if self.current is None:
            self.current = self.candidates[0][1]()
        self.current.activate()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        while True:
            try:
                self.activate()
                return self.current.infer(feeds)
            except BackendError as exc:
                self._fall_back(exc)

    def ddim_loop(self, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule, noise, *,
                  official_rng: bool = True, callback=None) -> np.ndarray:
        """The step graph's loop on the current backend (its device loop, or the graph called step
        by step). On out-of-memory the next backend reruns it from x_T with the same noise draws
        (recorded as they are made), and the callback hears of each step once."""
        drawn: list[np.ndarray] = []
        heard = 0

        def tell(i: int, total: int, t: int, x) -> None:
            nonlocal heard
            if i >= heard:
                heard = i + 1
                callback(i, total, t, x)

        if callback is not None and not wants_x(callback):
            tell = progress_only(tell)
        while True:
            replay = iter(list(drawn))

            def draw(shape: tuple[int, ...]) -> np.ndarray:
                z = next(replay, None)
                if z is None:
                    z = noise(shape)
                    drawn.append(z)
                return z

            try:
                self.activate()
                return step_graph_loop(self.current, x_T, c_concat, y, schedule, draw, official_rng=official_rng,
                                       callback=tell if callback is not None else None)
            except BackendError as exc:
                self._fall_back(exc)

    def _fall_back(self, exc: BackendError) -> None:
        """Re-raise `exc` unless it is out-of-memory with a candidate left; else warn and move on."""
        if "out of memory" not in str(exc) or len(self.candidates) == 1:
            raise exc
        failed = self.candidates.pop(0)[0]
        self.current.deactivate()
        self.current = None
        warnings.warn(f"{self.component}: {failed} ran out of GPU memory; "
                      f"falling back to {self.candidates[0][0]}", RuntimeWarning, stacklevel=3)

    def trim(self) -> None:
        if self.current is not None:
            trim(self.current, give_back=False)

    def deactivate(self) -> None:
        if self.current is not None:
            self.current.deactivate()
