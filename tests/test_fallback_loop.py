"""`auto`'s fallback chain and the DDIM loop: the step graph's runner falls back like the others,
and a loop that runs out of memory halfway is rerun on the next backend with the same noise."""

from __future__ import annotations

import numpy as np
import pytest

from aldm.errors import BackendError
from aldm.runtime import backends
from aldm.runtime import sampler as S
from aldm.runtime.backends import FallbackRunner
from aldm.runtime.manifest import STEP_GRAPH, ModelDir

SHAPE = (2, 4, 3, 3, 2)


def fake_step(x, t, coef, z):
    """x_prev for a made-up eps (0.1 x + t / 1000): deterministic, t- and x-dependent."""
    eps = (np.float32(0.1) * x + t.reshape(-1, 1, 1, 1, 1).astype(np.float32) / 1000).astype(np.float32)
    return S.ddim_update(x, eps, coef, z)


class HostStep:
    """A step-graph runner without a device loop (as ort-cpu's): one `infer` per step."""

    name = "host"

    def __init__(self):
        self.calls = 0

    def activate(self):
        pass

    def deactivate(self):
        pass

    def infer(self, feeds):
        self.calls += 1
        return {"x_prev": fake_step(feeds["x_t"], feeds["t"], feeds["coef"], feeds["noise"])}


class DeviceStep(HostStep):
    """A runner with its own loop that runs out of memory after `fail_after` steps."""

    name = "gpu"

    def __init__(self, fail_after):
        super().__init__()
        self.fail_after, self.deactivated = fail_after, False

    def ddim_loop(self, x_T, c_concat, y, schedule, noise, *, official_rng=True, callback=None):
        def step(x, t, coef, z):
            if self.calls == self.fail_after:
                raise BackendError("trt out of memory in unet_step (CUDA out of memory)")
            self.calls += 1
            return fake_step(x, t, coef, z)
        return S.ddim_sample_steps(step, x_T, schedule, noise, official_rng=official_rng, callback=callback)

    def deactivate(self):
        self.deactivated = True


def schedule(eta):
    ac = np.cumprod(1 - np.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2).astype(np.float32)
    return S.ddim_schedule(ac, 10, eta)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_loop_that_runs_out_of_memory_reruns_on_the_next_backend_with_the_same_noise(eta):
    sched = schedule(eta)
    x_T = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    c, y = np.zeros((2, 8, 3, 3, 2), np.float32), np.array([2, 3], np.int64)
    want = S.ddim_sample_steps(fake_step, x_T, sched, S.gaussian_noise(np.random.default_rng(7)))

    draws = []
    rng = np.random.default_rng(7)

    def noise(shape):
        draws.append(shape)
        return rng.standard_normal(shape, dtype=np.float32)

    gpu, cpu = DeviceStep(fail_after=4), HostStep()
    runner = FallbackRunner(STEP_GRAPH, [("trt", lambda: gpu), ("ort-cpu", lambda: cpu)])
    heard = []
    with pytest.warns(RuntimeWarning, match="unet_step: trt ran out of GPU memory; falling back to ort-cpu"):
        got = runner.ddim_loop(x_T, c, y, sched, noise, callback=lambda i, n, t, x: heard.append((i, t)))
    np.testing.assert_array_equal(got, want)  # the same noise stream, replayed on the second backend
    assert len(draws) == 10  # each draw made once: the rerun replays the 4 the first backend used
    assert [i for i, _ in heard] == list(range(10))  # each step reported once
    assert gpu.deactivated and cpu.calls == 10


def test_other_errors_are_not_fallen_back_on():
    class Broken(HostStep):
        def infer(self, feeds):
            raise BackendError("trt failed in unet_step: engine execution returned False")

    runner = FallbackRunner(STEP_GRAPH, [("trt", Broken), ("ort-cpu", HostStep)])
    with pytest.raises(BackendError, match="returned False"):
        runner.ddim_loop(np.zeros(SHAPE, np.float32), np.zeros((2, 8, 3, 3, 2), np.float32),
                         np.array([0, 1]), schedule(0.0), S.gaussian_noise(np.random.default_rng(0)))


def test_a_progress_only_callback_stays_progress_only_through_the_fallback():
    seen = []

    class Wants(HostStep):
        def ddim_loop(self, x_T, c_concat, y, schedule, noise, *, official_rng=True, callback=None):
            seen.append(S.wants_x(callback))
            return x_T

    runner = FallbackRunner(STEP_GRAPH, [("trt", Wants)])
    args = (np.zeros(SHAPE, np.float32), None, None, schedule(0.0), S.gaussian_noise(np.random.default_rng(0)))
    runner.ddim_loop(*args, callback=S.progress_only(lambda *a: None))
    runner.ddim_loop(*args, callback=lambda *a: None)
    assert seen == [False, True]


def test_auto_gives_the_step_graph_a_fallback_chain_and_makes_each_backend_once(tiny_export, monkeypatch):
    """GPU chain ort-cuda -> ort-cpu (no GPU needed: ORT sessions open on first use)."""
    model = ModelDir(tiny_export)
    assert model.has_step_graph
    made = []
    real = backends.single_backend

    def counting(model, backend, **kw):
        made.append(backend)
        return real(model, backend, **kw)

    monkeypatch.setattr(backends, "auto_order", lambda *a, **k: ["ort-cuda", "ort-cpu"])
    monkeypatch.setattr(backends, "single_backend", counting)
    runners = backends.make_runners(model, "auto")
    assert set(runners) == {"encoder", "spade", "unet", "decoder", STEP_GRAPH}
    step = runners[STEP_GRAPH]
    assert isinstance(step, FallbackRunner) and [b for b, _ in step.candidates] == ["ort-cuda", "ort-cpu"]
    assert hasattr(step.candidates[0][1](), "ddim_loop")  # ort-cuda's runner keeps the loop on the GPU
    for r in runners.values():
        r.candidates[0][1](), r.candidates[1][1]()
    assert sorted(made) == ["ort-cpu", "ort-cuda"]  # one set of runners per backend, shared


def test_auto_keeps_the_host_loop_when_the_first_backend_has_no_step_runner(tiny_export, monkeypatch):
    model = ModelDir(tiny_export)
    real = backends.single_backend

    def no_step_on_cuda(model, backend, **kw):
        r = real(model, backend, **kw)
        return {k: v for k, v in r.items() if not (backend == "ort-cuda" and k == STEP_GRAPH)}

    monkeypatch.setattr(backends, "auto_order", lambda *a, **k: ["ort-cuda", "ort-cpu"])
    monkeypatch.setattr(backends, "single_backend", no_step_on_cuda)
    assert STEP_GRAPH not in backends.make_runners(model, "auto")
