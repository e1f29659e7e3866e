"""The DDIM loop stays on the GPU (issue 19, items 2 and 3), proven without a GPU: fake `tensorrt`,
`cuda.bindings.runtime` and onnxruntime modules record every call. The fake device memory is real
host memory, the fake stream runs its work only when synchronised (so a missing sync reads stale
data), and the fake engines compute a simple deterministic step from what they read at the bound
addresses, so the device loop's result is checked for equality against the numpy host loop, not
only by counting calls."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil
import sys
import types

import numpy as np
import pytest

from aldm.errors import BackendError
from aldm.runtime import sampler as S
from aldm.runtime import trt
from aldm.runtime.manifest import MANIFEST, STEP_GRAPH, ComponentSpec, ModelDir, TensorSpec, sha256_file

f32 = np.float32
SCRATCH = {"encoder": 3000, "spade": 1000, "unet": 2000, "decoder": 5000, STEP_GRAPH: 2500}


# ------------------------------------------------------------------------------------ fake CUDA
class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime over host memory: allocations are real (256-byte aligned) buffers,
    work queued on a stream runs when the stream (or an event on it) is synchronised, a capture
    collects the work into a graph that a launch replays. Every call is recorded."""

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        ns = types.SimpleNamespace
        self.cudaError_t = ns(cudaSuccess=0)
        self.cudaMemcpyKind = ns(cudaMemcpyHostToDevice="htod", cudaMemcpyDeviceToHost="dtoh",
                                 cudaMemcpyDeviceToDevice="dtod")
        self.cudaStreamCaptureMode = ns(cudaStreamCaptureModeGlobal=0)
        self.cudaEventDisableTiming = 2
        self.keep, self.device, self.host = {}, {}, {}  # ptr -> nbytes
        self.queues, self.capturing, self.graphs, self.execs, self.events = {}, {}, {}, {}, {}
        self.copies, self.mallocs, self.frees, self.destroyed = [], [], [], []
        self.launches = 0
        self._next = 1000

    def _handle(self):
        self._next += 1
        return self._next

    def _alloc(self, n, table):
        buf = ctypes.create_string_buffer(n + 256)
        ptr = (ctypes.addressof(buf) + 255) // 256 * 256
        self.keep[ptr], table[ptr] = buf, n
        return ptr

    def where(self, ptr, n):
        """'device', 'pinned' or 'host' (pageable) for the range [ptr, ptr + n)."""
        for name, table in (("device", self.device), ("pinned", self.host)):
            for base, size in table.items():
                if base <= ptr and ptr + n <= base + size:
                    return name
        return "host"

    # memory
    def cudaMalloc(self, n):
        ptr = self._alloc(n, self.device)
        self.mallocs.append((ptr, n))
        return 0, ptr

    def cudaFree(self, ptr):
        assert ptr in self.device, "cudaFree of memory not from cudaMalloc"
        del self.device[ptr]
        self.frees.append(ptr)
        return (0,)

    def cudaMallocHost(self, n):
        return 0, self._alloc(n, self.host)

    def cudaFreeHost(self, ptr):
        assert ptr in self.host
        del self.host[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        want = {"htod": ("device", "host"), "dtoh": ("host", "device"), "dtod": ("device", "device")}[kind]
        got = (self.where(dst, n), self.where(src, n))
        assert tuple("host" if g == "pinned" else g for g in got) == want, f"{kind} copy between {got}"
        self.copies.append(dict(kind=kind, dst=dst, src=src, n=n, pinned="pinned" in got))
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, n))
        return (0,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        assert self.where(ptr, n) == "device"
        self.enqueue(stream, lambda: ctypes.memset(ptr, value, n))
        return (0,)

    # streams, graphs, events
    def enqueue(self, stream, op):
        if self.capturing.get(stream) is not None:
            self.capturing[stream].append(op)
        else:
            self.queues[stream].append(op)

    def cudaStreamCreate(self):
        h = self._handle()
        self.queues[h] = []
        return 0, h

    def cudaStreamDestroy(self, h):
        assert not self.queues.pop(h), "stream destroyed with work pending"
        return (0,)

    def cudaStreamSynchronize(self, h):
        queue = self.queues[h]
        while queue:
            queue.pop(0)()
        return (0,)

    def cudaStreamBeginCapture(self, h, mode):
        self.capturing[h] = []
        return (0,)

    def cudaStreamEndCapture(self, h):
        g = self._handle()
        self.graphs[g] = self.capturing.pop(h)
        return 0, g

    def cudaGraphInstantiate(self, g, flags):
        e = self._handle()
        self.execs[e] = g
        return 0, e

    def cudaGraphLaunch(self, e, h):
        self.launches += 1
        for op in self.graphs[self.execs[e]]:
            self.enqueue(h, op)
        return (0,)

    def cudaGraphExecDestroy(self, e):
        self.destroyed.append(("exec", e))
        del self.execs[e]
        return (0,)

    def cudaGraphDestroy(self, g):
        self.destroyed.append(("graph", g))
        del self.graphs[g]
        return (0,)

    def cudaEventCreateWithFlags(self, flags):
        e = self._handle()
        self.events[e] = None
        return 0, e

    def cudaEventRecord(self, e, h):
        self.events[e] = h
        return (0,)

    def cudaEventSynchronize(self, e):
        if self.events[e] is not None:
            self.cudaStreamSynchronize(self.events[e])  # the stream up to now covers the event
        return (0,)

    def cudaEventDestroy(self, e):
        del self.events[e]
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert self.where(ptr, n) == "device", "an engine read memory that is not on the device"
        return np.frombuffer((ctypes.c_ubyte * n).from_address(ptr), dtype).reshape(shape).copy()

    def write(self, ptr, arr):
        arr = np.ascontiguousarray(arr)
        assert self.where(ptr, arr.nbytes) == "device"
        ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)


# ------------------------------------------------------------------------------- fake TensorRT
def fake_eps(x, t, c, y):
    """The fake UNet: deterministic, and it uses every input (t, c_concat, y per batch row)."""
    col = (-1,) + (1,) * (x.ndim - 1)
    return (f32(0.1) * x + f32(1e-4) * t.reshape(col).astype(f32) + f32(0.01) * c[:, :x.shape[1]]
            + f32(1e-3) * y.reshape(col).astype(f32)).astype(f32)


def fake_compute(component, ins):
    if component == "unet":
        return {"eps": fake_eps(ins["x_t"], ins["t"], ins["c_concat"], ins["y"])}
    if component == STEP_GRAPH:
        eps = fake_eps(ins["x_t"], ins["t"], ins["c_concat"], ins["y"])
        return {"x_prev": S.ddim_update(ins["x_t"], eps, ins["coef"], ins["noise"]).astype(f32)}
    return None  # the others: see FakeContext.execute_async_v3


def row_mean(first, shape):
    """The encoder, SPADE and decoder stand-in: each output row is 0.5 + the mean of that row of
    the first input (so a volume depends on the latent it was decoded from)."""
    m = first.reshape(first.shape[0], -1).astype(np.float64).mean(1).astype(f32)
    return np.broadcast_to((f32(0.5) + m).reshape((-1,) + (1,) * (len(shape) - 1)), shape)


_TRT_DTYPE = {"float32": "FLOAT", "int64": "INT64", "float16": "HALF"}


class FakeTensorRT(types.ModuleType):
    """Builds engines (a JSON blob naming the component and the profile's maximum batch) and runs
    them: contexts check shapes against the profile, addresses for 256-byte alignment, and the
    device memory they were given; execute_async_v3 queues the fake computation on the stream with
    the addresses bound at that moment (as TensorRT does)."""

    def __init__(self, rt: FakeCudart, specs: dict[str, ComponentSpec]):
        super().__init__("tensorrt")
        self.__version__ = "10.99.0"
        ns = types.SimpleNamespace
        self.rt, self.specs = rt, specs
        self.contexts, self.fail_execute = [], set()
        self.calls = []  # (component, method, args)
        self.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
        self.BuilderFlag = ns(TF32="TF32", FP16="FP16", INT8="INT8", VERSION_COMPATIBLE="VC", OBEY_PRECISION_CONSTRAINTS="O")
        self.TensorIOMode = ns(INPUT="INPUT", OUTPUT="OUTPUT")
        self.ExecutionContextAllocationStrategy = ns(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level=None):
                pass

        class Network:
            num_layers = 0

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Config:
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, *a):
                pass

            def clear_flag(self, flag):
                pass

            def set_flag(self, flag):
                pass

            def add_optimization_profile(self, prof):
                self.profiles.append(prof)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                shapes = {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()}
                return json.dumps({"component": network.component, "profile": shapes}).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                name = path.rsplit("/", 1)[-1]
                self.network.component = next(c for c, s in fake.specs.items() if s.file == name)
                return True

        class Runtime:
            def __init__(self, logger):
                self.engine_host_code_allowed = False

            def deserialize_cuda_engine(self, data):
                doc = json.loads(bytes(data))
                return FakeEngine(fake, doc["component"], {k: tuple(map(tuple, v)) for k, v in doc["profile"].items()})

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime


class FakeEngine:
    def __init__(self, trt_, component, profile):
        self.trt, self.component, self.profile = trt_, component, profile
        self.spec = trt_.specs[component]
        self.names = [t.name for t in self.spec.inputs + self.spec.outputs]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = SCRATCH[component]

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in {t.name for t in self.spec.inputs} else "OUTPUT"

    def get_tensor_dtype(self, name):
        t = next(t for t in self.spec.inputs + self.spec.outputs if t.name == name)
        return types.SimpleNamespace(name=_TRT_DTYPE[t.dtype])

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile[name]

    def create_execution_context(self, strategy=0):
        assert strategy == self.trt.ExecutionContextAllocationStrategy.USER_MANAGED, "context owns memory"
        ctx = FakeContext(self)
        self.trt.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.rt = engine, engine.trt.rt
        self.shapes, self.addresses, self.memory = {}, {}, None
        self.executed = 0

    def _log(self, method, *args):
        self.engine.trt.calls.append((self.engine.component, method, args))

    def set_device_memory(self, ptr, size):
        self._log("set_device_memory", ptr, size)
        assert ptr % 256 == 0 and size >= self.engine.device_memory_size_v2
        assert self.rt.where(ptr, size) == "device"
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self._log("set_input_shape", name, tuple(shape))
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self._log("set_tensor_address", name, ptr)
        if ptr % 256:
            return False
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        if self.engine.get_tensor_mode(name) == "INPUT":
            return self.shapes.get(name, (-1,))
        batch = {self.shapes[t.name][0] for t in self.engine.spec.inputs
                 if t.shape and t.shape[0] == "batch" and t.name in self.shapes}
        if len(batch) != 1:
            return (-1,)
        out = next(t for t in self.engine.spec.outputs if t.name == name)
        return out.concrete(batch.pop())

    def execute_async_v3(self, stream):
        self._log("execute_async_v3", stream)
        if self.engine.component in self.engine.trt.fail_execute:
            return False
        assert self.memory is not None, "executed without device memory"
        spec = self.engine.spec
        addr, shapes, mem = dict(self.addresses), dict(self.shapes), self.memory  # read now, as TensorRT does
        out_shapes = {t.name: tuple(self.get_tensor_shape(t.name)) for t in spec.outputs}

        def run():
            # a graph replayed after the scratch block moved would run in freed memory
            assert mem[1] == 0 or self.rt.where(*mem) == "device", "ran in a freed scratch block"
            ins = {t.name: self.rt.read(addr[t.name], shapes[t.name], t.dtype) for t in spec.inputs}
            outs = fake_compute(self.engine.component, ins) or {
                t.name: row_mean(ins[spec.inputs[0].name], out_shapes[t.name]) for t in spec.outputs}
            for t in spec.outputs:
                self.rt.write(addr[t.name], np.asarray(outs[t.name], t.dtype).reshape(out_shapes[t.name]))
            self.executed += 1

        self.rt.enqueue(stream, run)
        return True


# ------------------------------------------------------------------------------------- fixtures
def add_step_graph(d):
    """Give a model folder a (stand-in) step graph: the fake parser never reads its bytes."""
    md = ModelDir(d)
    unet = md.component("unet")
    x = next(t for t in unet.inputs if t.name == "x_t")
    spec = ComponentSpec(STEP_GRAPH, f"{STEP_GRAPH}.onnx", unet.inputs + (
        TensorSpec("coef", (4,), "float32"), TensorSpec("noise", x.shape, "float32")),
        (TensorSpec("x_prev", x.shape, "float32"),))
    (d / spec.file).write_bytes(b"stand-in for the step graph")
    m = md.manifest
    new = dataclasses.replace(m, components=dict(m.components) | {STEP_GRAPH: spec},
                              files=dict(m.files) | {spec.file: sha256_file(d / spec.file)})
    (d / MANIFEST).write_text(new.to_json())
    return ModelDir(d)


@pytest.fixture
def gpu(monkeypatch, tiny_export, tmp_path):
    """The tiny model with a step graph, its fp32 engines built by the fake TensorRT on a fake GPU."""
    import aldm.runtime.cuda as cuda
    from aldm.export.trt_build import build_engines

    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    md = add_step_graph(d)
    rt = FakeCudart()
    fake = FakeTensorRT(rt, dict(md.manifest.components))
    pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    pkg.bindings, bindings.runtime = bindings, rt
    for name, mod in (("cuda", pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt),
                      ("tensorrt", fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: cuda.GpuInfo("Fake GPU", "9.0", 80.0))
    build_engines(d, trt.BuildOptions("fp32", max_targets=2), say=lambda s: None)
    return types.SimpleNamespace(rt=rt, trt=fake, model=ModelDir(d))


def loop_inputs(md, batch=2, seed=0, steps=10, eta=0.0):
    rng = np.random.default_rng(seed)
    C, h, w, dd = md.manifest.latent_shape
    x_T = rng.standard_normal((batch, C, h, w, dd), dtype=f32)
    c = rng.standard_normal((batch, 2 * C, h, w, dd), dtype=f32)
    y = np.arange(batch, dtype=np.int64) % 4
    sched = S.ddim_schedule(md.schedule()["alphas_cumprod"], steps, eta)
    return x_T, c, y, sched


def host_reference(x_T, c, y, sched, noise, **kw):
    step = lambda x, t, coef, z: S.ddim_update(x, fake_eps(x, t, c, y), coef, z)  # noqa: E731
    return S.ddim_sample_steps(step, x_T, sched, noise, **kw)


def copies_to(rt, ptrs, kind):
    return [c for c in rt.copies if c["kind"] == kind and c["dst"] in ptrs]


# ---------------------------------------------------------------------------------------- tests
def test_a_folder_with_a_step_graph_gets_a_step_engine_and_runner(gpu):
    from aldm.runtime.trt_loop import TrtStepRunner

    assert (gpu.model.path / trt.ENGINE_DIR / f"{STEP_GRAPH}.fp32.plan").is_file()
    runners = trt.engine_runners(gpu.model, precision="fp32")
    assert sorted(runners) == sorted(("encoder", "spade", "unet", "decoder", STEP_GRAPH))
    assert isinstance(runners[STEP_GRAPH], TrtStepRunner) and hasattr(runners[STEP_GRAPH], "ddim_loop")
    assert len({id(r.memory) for r in runners.values()}) == 1  # one stream, one scratch block
    assert trt.profile(gpu.model.component(STEP_GRAPH), 2)["x_t"][1][0] == 2  # optimised for the batch


def test_a_stale_step_engine_leaves_the_host_loop_over_the_four(gpu):
    (gpu.model.path / trt.ENGINE_DIR / f"{STEP_GRAPH}.fp32.plan").write_bytes(b"changed")
    assert trt.engines_usable(gpu.model, "fp32")
    with pytest.warns(RuntimeWarning, match="no current fp32 engine for the sampler-step graph.*aldm build"):
        runners = trt.engine_runners(gpu.model, precision="fp32")
    assert sorted(runners) == ["decoder", "encoder", "spade", "unet"]


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_eta0_loop_uploads_once_keeps_x_on_the_device_and_equals_the_host_loop(gpu, cuda_graph):
    """The acceptance case: 10 steps, eta 0, 2 targets, a progress-only callback."""
    rt = gpu.rt
    runners = trt.engine_runners(gpu.model, precision="fp32")
    step = runners[STEP_GRAPH]
    step.cuda_graph = cuda_graph
    x_T, c, y, sched = loop_inputs(gpu.model, batch=2, steps=10, eta=0.0)
    draws, seen = [], []

    def noise(shape):
        draws.append(shape)
        return np.random.default_rng(len(draws)).standard_normal(shape, dtype=f32)

    out = step.ddim_loop(x_T, c, y, sched, noise, official_rng=True,
                         callback=S.progress_only(lambda i, n, t, x: seen.append((i, n, t, x))))
    ref = host_reference(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)), official_rng=False)
    np.testing.assert_array_equal(out, ref)  # the same numbers, bit for bit
    assert len(draws) == 10  # official RNG consumption: drawn every step, though σ = 0
    assert [s[:3] for s in seen] == [(i, 10, int(sched.timesteps[9 - i])) for i in range(10)]
    assert all(s[3] is None for s in seen)

    calls = [(m, a) for comp, m, a in gpu.trt.calls if comp == STEP_GRAPH]
    bound = lambda name: [a[1] for m, a in calls if m == "set_tensor_address" and a[0] == name]  # noqa: E731
    assert len(copies_to(rt, set(bound("c_concat")), "htod")) == 1  # uploaded once per translation
    assert len(copies_to(rt, set(bound("y")), "htod")) == 1
    assert len(set(bound("x_t"))) == 2 and set(bound("x_t")) == set(bound("x_prev"))  # two buffers
    assert copies_to(rt, set(bound("noise")), "htod") == []  # σ = 0: never uploaded
    x_down = [c_ for c_ in rt.copies if c_["kind"] == "dtoh"]
    assert len(x_down) == 1 and x_down[0]["src"] in set(bound("x_t")) and x_down[0]["pinned"]
    assert len([c_ for c_ in rt.copies if c_["kind"] == "htod"]) == 5  # x_T, c_concat, y, t and coef tables
    assert all(c_["kind"] == "dtod" and c_["n"] % 256 == 0 for c_ in rt.copies[5:-1])  # per step: rows
    if cuda_graph:
        assert len(rt.graphs) == 2 and rt.launches == 10  # one graph per ping-pong direction
    else:
        assert rt.launches == 0 and sum(m == "execute_async_v3" for m, _ in calls) == 10
    for r in runners.values():
        r.deactivate()
    assert rt.graphs == {} and rt.execs == {}  # every graph destroyed (exec and graph)
    assert rt.device == {} and rt.host == {}  # and every buffer freed


def test_eta1_noise_goes_up_per_step_through_pinned_memory_and_replays_the_host_loop(gpu):
    rt = gpu.rt
    step = trt.engine_runners(gpu.model, precision="fp32")[STEP_GRAPH]
    x_T, c, y, sched = loop_inputs(gpu.model, batch=2, steps=10, eta=1.0)
    xs = []
    out = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(7)),
                         callback=lambda i, n, t, x: xs.append(x))
    got = []
    ref = host_reference(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(7)),
                         callback=lambda i, n, t, x: got.append(x))
    np.testing.assert_array_equal(out, ref)
    assert len(xs) == 10 and all(np.array_equal(a, b) for a, b in zip(xs, got))  # x each step when wanted
    noise_ups = [c_ for c_ in rt.copies if c_["kind"] == "htod" and c_["n"] == x_T.nbytes and c_["pinned"]]
    assert len(noise_ups) == 1 + 10  # x_T, then one noise per step
    assert len([c_ for c_ in rt.copies if c_["kind"] == "dtoh"]) == 10  # x for the callback; not again at the end
    # the next translation reuses every buffer: nothing new is allocated
    n = len(rt.mallocs)
    again = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(7)))
    np.testing.assert_array_equal(again, ref)
    assert len(rt.mallocs) == n
    step.deactivate()


def test_one_scratch_block_shared_by_every_context_sized_to_the_largest(gpu):
    rt = gpu.rt
    runners = trt.engine_runners(gpu.model, precision="fp32")
    for r in runners.values():  # the decoder, which needs the most, is not the first
        r.activate()
    last = {}
    for comp, m, a in gpu.trt.calls:
        if m == "set_device_memory":
            last[comp] = a
    assert sorted(last) == sorted(runners)
    assert len(set(last.values())) == 1  # the same pointer and size for every context
    ptr, size = next(iter(last.values()))
    assert size == max(SCRATCH.values())
    live = [p for p, n in rt.mallocs if p in rt.device]
    assert live == [ptr]  # one block alive; the smaller first one was freed when it grew
    for r in runners.values():
        r.deactivate()
    assert rt.device == {}


def test_graphs_captured_before_the_scratch_block_grew_are_recaptured(gpu):
    """The step engine runs (graphs captured against the first block), then the decoder, which
    needs more scratch, is activated: the block moves, so the old graphs must not be replayed."""
    rt = gpu.rt
    runners = trt.engine_runners(gpu.model, precision="fp32")
    step = runners[STEP_GRAPH]
    x_T, c, y, sched = loop_inputs(gpu.model, batch=2, steps=10, eta=0.0)
    first = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
    captured = dict(rt.graphs)
    runners["decoder"].activate()  # 5000 bytes of scratch: the block grows
    assert not set(captured) & set(rt.graphs)  # the old graphs were destroyed
    again = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))  # fake asserts the block
    np.testing.assert_array_equal(first, again)
    for r in runners.values():
        r.deactivate()


def test_the_four_engine_path_still_works_and_reuses_its_buffers(gpu):
    rt = gpu.rt
    runners = trt.engine_runners(gpu.model, precision="fp32")
    unet = runners["unet"]
    x_T, c, y, sched = loop_inputs(gpu.model, batch=2, steps=5, eta=0.0)
    denoise = lambda x, t: unet.infer({"x_t": x, "t": t, "c_concat": c, "y": y})["eps"]  # noqa: E731
    out = S.ddim_sample(denoise, x_T, sched, S.gaussian_noise(np.random.default_rng(0)))
    ref = host_reference(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
    np.testing.assert_array_equal(out, ref)
    assert len(rt.mallocs) == 1 + 5  # the scratch block and 5 I/O buffers, allocated at the first call
    assert all(c_["pinned"] for c_ in rt.copies)
    assert len(rt.graphs) == 1  # one shape set, one graph
    unet.deactivate()
    assert rt.graphs == {}


def test_a_batch_above_the_profile_is_a_clear_error_before_any_tensorrt_call(gpu):
    runners = trt.engine_runners(gpu.model, precision="fp32")
    x_T, c, y, sched = loop_inputs(gpu.model, batch=3, steps=10)  # profile: 1..2
    feeds = {"x_t": x_T, "t": np.zeros(3, np.int64), "c_concat": c, "y": y}
    for active in (False, True):  # by the registration before loading, by the engine's profile after
        if active:
            runners[STEP_GRAPH].activate()
            runners["unet"].activate()
        before = len(gpu.trt.calls)
        with pytest.raises(BackendError, match=r"unet_step: batch 3 is above the TensorRT engine's maximum 2"):
            runners[STEP_GRAPH].ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
        with pytest.raises(BackendError, match=r"unet: batch 3 is above .* maximum 2"):
            runners["unet"].infer(feeds)
        assert gpu.trt.calls[before:] == []  # not one TensorRT call
    assert runners["unet"].max_batch == 2  # read from the engine's profile


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_an_engine_that_fails_is_a_backend_error_naming_it(gpu, cuda_graph):
    step = trt.engine_runners(gpu.model, precision="fp32")[STEP_GRAPH]
    step.cuda_graph = cuda_graph
    gpu.trt.fail_execute.add(STEP_GRAPH)
    x_T, c, y, sched = loop_inputs(gpu.model, batch=2, steps=10)
    with pytest.raises(BackendError, match=r"execute_async_v3 .*failed for the unet_step engine"):
        step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
    step.deactivate()
    assert gpu.rt.graphs == {} and gpu.rt.device == {}


def test_the_cli_progress_callback_does_not_ask_for_x():
    import inspect

    from aldm.batch import progress_only as batch_mark
    from aldm.cli import infer

    assert "callback=progress_only(on_step)" in inspect.getsource(infer)
    assert batch_mark is S.progress_only
    seen = []
    cb = S.progress_only(lambda i, n, t, x: seen.append(x))
    assert not S.wants_x(cb) and S.wants_x(lambda *a: None) and not S.wants_x(None)
    cb(0, 1, 1, np.ones(1))
    assert seen == [None]  # the same on every backend: a progress callback never sees x


def test_a_translation_through_the_pipeline_runs_the_loop_on_the_device(gpu):
    """Pipeline level: 2 targets, 10 steps, eta 0, the CLI's kind of callback (progress only)."""
    from aldm.runtime.manifest import sample_feeds
    from aldm.runtime.pipeline import Pipeline

    rt = gpu.rt
    x = sample_feeds(gpu.model.component("encoder"), 1, 0)["x"]
    runners = trt.engine_runners(gpu.model, precision="fp32")
    with Pipeline(gpu.model, runners) as pipe:
        a = pipe.translate(x, ["t2", "flair"], steps=10, eta=0.0, seed=0,
                           callback=S.progress_only(lambda *args: None))
        step_calls = [(m, args) for comp, m, args in gpu.trt.calls if comp == STEP_GRAPH]
        bound = lambda name: {args[1] for m, args in step_calls if m == "set_tensor_address" and args[0] == name}  # noqa: E731
        assert len(copies_to(rt, bound("c_concat"), "htod")) == 1
        assert len(copies_to(rt, bound("y"), "htod")) == 1
        assert len(bound("x_t")) == 2 and bound("x_t") == bound("x_prev")
        assert len([c for c in rt.copies if c["kind"] == "dtoh" and c["src"] in bound("x_t")]) == 1
        assert not any(m == "execute_async_v3" for comp, m, _ in gpu.trt.calls if comp == "unet")
    assert rt.graphs == {} and rt.device == {}  # closing the pipeline released every graph and buffer
    host = {k: v for k, v in trt.engine_runners(gpu.model, precision="fp32").items() if k != STEP_GRAPH}
    with Pipeline(gpu.model, host) as pipe:  # the four engines and the host loop: the same volumes
        b = pipe.translate(x, ["t2", "flair"], steps=10, eta=0.0, seed=0)
    for k in a.volumes:
        np.testing.assert_array_equal(a.volumes[k], b.volumes[k])


@pytest.mark.gpu
def test_the_device_loops_match_the_host_loop_on_a_real_gpu(tiny_export, tmp_path):
    """The real thing: TensorRT (fp32 engines) and ONNX Runtime CUDA, step graph vs host loop."""
    from aldm.runtime.cuda import gpu_info

    md = ModelDir(tiny_export)
    assert md.has_step_graph  # aldm export writes it
    if gpu_info() is None:
        pytest.skip("no CUDA GPU on this machine")
    from aldm.runtime.backends import make_runners, ort_cuda_available

    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    md = ModelDir(d)
    x_T, c, y, sched = loop_inputs(md, batch=2, steps=10, eta=1.0)
    ref_runner = make_runners(md, "ort-cpu")["unet"]
    denoise = lambda x, t: ref_runner.infer({"x_t": x, "t": t, "c_concat": c, "y": y})["eps"]  # noqa: E731
    ref = S.ddim_sample(denoise, x_T, sched, S.gaussian_noise(np.random.default_rng(0)))
    ran = 0
    if trt.tensorrt_version() is not None:
        from aldm.export.trt_build import build_engines

        build_engines(d, trt.BuildOptions("fp32", 2))
        runners = trt.engine_runners(md, precision="fp32")
        out = runners[STEP_GRAPH].ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
        for r in runners.values():
            r.deactivate()
        assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
        ran += 1
    if ort_cuda_available():
        step = make_runners(md, "ort-cuda")[STEP_GRAPH]
        out = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)))
        assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
        ran += 1
    if not ran:
        pytest.skip("neither TensorRT nor onnxruntime-gpu is installed here")


# ----------------------------------------------------------------------------- fake onnxruntime
class FakeOrt(types.ModuleType):
    """OrtValues on a fake 'cuda' device (numpy arrays that count their host transfers), one IO
    binding per session, and a session that runs the fake step on what is bound."""

    def __init__(self):
        super().__init__("onnxruntime")
        self.uploads, self.downloads, self.updates, self.bindings, self.runs = [], [], [], [], 0
        fake = self

        class OrtValue:
            def __init__(self, arr, device):
                self.arr, self.device = arr, device

            @staticmethod
            def ortvalue_from_numpy(arr, device="cpu", device_id=0):
                fake.uploads.append(np.asarray(arr).shape)
                return OrtValue(np.array(arr), device)

            @staticmethod
            def ortvalue_from_shape_and_type(shape, dtype, device="cpu", device_id=0):
                return OrtValue(np.zeros(shape, dtype), device)

            def update_inplace(self, arr):
                fake.updates.append(arr.shape)
                self.arr[...] = arr

            def numpy(self):
                fake.downloads.append(self.arr.shape)
                return self.arr.copy()

        class IOBinding:
            def __init__(self):
                self.inputs, self.outputs = {}, {}
                fake.bindings.append(self)

            def bind_ortvalue_input(self, name, v):
                assert v.device == "cuda"
                self.inputs[name] = v

            def bind_ortvalue_output(self, name, v):
                assert v.device == "cuda"
                self.outputs[name] = v

        class Io:
            def __init__(self, name, type_):
                self.name, self.type = name, type_

        class InferenceSession:
            def __init__(self, path, opts=None, providers=None):
                assert providers[0] == "CUDAExecutionProvider"

            def get_inputs(self):
                return [Io(n, "tensor(int64)" if n in ("t", "y") else "tensor(float)")
                        for n in ("x_t", "t", "c_concat", "y", "coef", "noise")]

            def get_outputs(self):
                return [Io("x_prev", "tensor(float)")]

            def io_binding(self):
                return IOBinding()

            def run_with_iobinding(self, b):
                fake.runs += 1
                ins = {k: v.arr for k, v in b.inputs.items()}
                assert b.outputs["x_prev"] is not b.inputs["x_t"]
                b.outputs["x_prev"].arr[...] = fake_compute(STEP_GRAPH, ins)["x_prev"]

        self.OrtValue, self.InferenceSession = OrtValue, InferenceSession
        self.SessionOptions = lambda: types.SimpleNamespace()
        self.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ort_cuda_loop_binds_constants_once_and_ping_pongs_x_on_the_device(monkeypatch, tiny_export, tmp_path, eta):
    from aldm.runtime.backends import make_runners
    from aldm.runtime.ort_loop import OrtStepRunner

    fake = FakeOrt()
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    md = add_step_graph(d)
    step = make_runners(md, "ort-cuda")[STEP_GRAPH]
    assert isinstance(step, OrtStepRunner)
    x_T, c, y, sched = loop_inputs(md, batch=2, steps=10, eta=eta)
    out = step.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(3)),
                         callback=S.progress_only(lambda *a: None))
    ref = host_reference(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(3)))
    np.testing.assert_array_equal(out, ref)
    assert len(fake.bindings) == 1 and fake.runs == 10  # one IO binding for the loop
    assert fake.uploads.count(c.shape) == 1  # c_concat once (x_T and the zero noise share x's shape)
    assert fake.uploads.count(x_T.shape) == 2  # x_T, and the noise value
    assert fake.updates == ([x_T.shape] * 10 if eta else [])  # noise per step only when σ > 0
    assert fake.downloads == [x_T.shape]  # x to the host once, at the end
