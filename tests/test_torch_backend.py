"""The torch backend's sampler-step runner (issue 19 item 4): its device-resident DDIM loop equals
the numpy loop around the same UNet (CPU, FP32), uploads the constants once and copies x to the
host once, and draws the host noise stream exactly as the numpy loop does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aldm.errors import BackendError
from aldm.export.torch_backend import TorchStepRunner, runners_from_model
from aldm.runtime import sampler as S
from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH
from aldm.runtime.schedule import make_schedule
from conftest import rel_err

AC = make_schedule()["alphas_cumprod"]
B, LAT = 2, (8, 8, 8)  # two targets, a tiny latent


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((B, 4) + LAT, dtype=np.float32)
    c = rng.standard_normal((B, 8) + LAT, dtype=np.float32)
    y = np.array([1, 2], np.int64)
    return x_T, c, y


def numpy_loop(model, x_T, c, y, sched, seed, official_rng=True):
    """The reference: aldm.runtime.sampler.ddim_sample around the torch UNet (FP32, CPU)."""
    def denoise(x, t):
        with torch.inference_mode():
            return model.unet(*(torch.from_numpy(a) for a in (x, t, c, y))).numpy()

    return S.ddim_sample(denoise, x_T, sched, S.gaussian_noise(np.random.default_rng(seed)),
                         official_rng=official_rng)


@pytest.mark.parametrize("eta,official_rng", [(0.0, True), (1.0, True), (0.0, False)])
def test_device_loop_equals_the_numpy_loop(tiny_model, inputs, eta, official_rng):
    x_T, c, y = inputs
    sched = S.ddim_schedule(AC, 10, eta)
    want = numpy_loop(tiny_model, x_T, c, y, sched, 7, official_rng)
    runner = TorchStepRunner(tiny_model, "cpu")
    got = runner.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(7)),
                           official_rng=official_rng)
    assert got.dtype == np.float32 and got.shape == x_T.shape
    assert rel_err(got, want) <= 1e-5
    assert not np.allclose(got, x_T)  # it did denoise
    # x_T, c_concat, y, the coefficient table and the timesteps once; a draw per step only where
    # sigma > 0 (eta 1: every step); x back to the host once
    assert runner.uploads == 5 + (10 if eta > 0 else 0)
    assert runner.downloads == 1


def test_noise_stream_is_drawn_as_the_numpy_loop_draws_it(tiny_model, inputs):
    """eta 0 with official_rng: a draw per step (the stream stays in step), none uploaded."""
    x_T, c, y = inputs
    shapes = []

    def noise(shape):
        shapes.append(shape)
        return np.zeros(shape, np.float32)

    runner = TorchStepRunner(tiny_model, "cpu")
    runner.ddim_loop(x_T, c, y, S.ddim_schedule(AC, 5, 0.0), noise)
    assert shapes == [x_T.shape] * 5 and runner.uploads == 5
    shapes.clear()
    runner.ddim_loop(x_T, c, y, S.ddim_schedule(AC, 5, 0.0), noise, official_rng=False)
    assert shapes == []


def test_one_step_call_is_the_numpy_update(tiny_model, inputs):
    """infer: the step graph's contract (x_t, t, c_concat, y, coef, noise -> x_prev)."""
    x_T, c, y = inputs
    sched = S.ddim_schedule(AC, 10, 1.0)
    coef = S.ddim_coefficients(sched)[4]
    t = np.full((B,), sched.timesteps[4], np.int64)
    z = np.random.default_rng(1).standard_normal(x_T.shape, dtype=np.float32)
    with torch.inference_mode():
        eps = tiny_model.unet(*(torch.from_numpy(a) for a in (x_T, t, c, y))).numpy()
    want = S.ddim_update(x_T, eps, coef, z)
    got = TorchStepRunner(tiny_model, "cpu").infer(
        {"x_t": x_T, "t": t, "c_concat": c, "y": y, "coef": coef, "noise": z})["x_prev"]
    assert rel_err(got, want) <= 1e-6


def test_callback_gets_x_unless_it_says_it_needs_none(tiny_model, inputs):
    x_T, c, y = inputs
    sched = S.ddim_schedule(AC, 4, 0.0)
    seen = []
    runner = TorchStepRunner(tiny_model, "cpu")
    final = runner.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)),
                             callback=lambda i, n, t, x: seen.append((i, n, t, x)))
    assert [(i, n, t) for i, n, t, _ in seen] == [(i, 4, int(sched.timesteps[3 - i])) for i in range(4)]
    np.testing.assert_array_equal(seen[-1][3], final)
    assert runner.downloads == 4 + 1

    seen.clear()
    runner = TorchStepRunner(tiny_model, "cpu")
    runner.ddim_loop(x_T, c, y, sched, S.gaussian_noise(np.random.default_rng(0)),
                     callback=S.progress_only(lambda i, n, t, x: seen.append(x)))
    assert seen == [None] * 4 and runner.downloads == 1


def test_device_noise_is_gaussian_and_skips_the_host_stream(tiny_model, inputs):
    x_T, c, y = inputs

    def noise(shape):
        raise AssertionError("device noise must not draw host noise")

    runner = TorchStepRunner(tiny_model, "cpu", device_noise=True)
    out = runner.ddim_loop(x_T, c, y, S.ddim_schedule(AC, 5, 1.0), noise)
    assert np.isfinite(out).all() and runner.uploads == 5


def test_runners_hold_the_components_and_the_step(tiny_model):
    runners = runners_from_model(tiny_model, "cpu", "fp32")
    assert set(runners) == set(COMPONENTS) | {STEP_GRAPH}
    assert runners[STEP_GRAPH].name == "torch-cpu" and hasattr(runners[STEP_GRAPH], "ddim_loop")


def test_fp16_on_the_cpu_is_a_one_line_error(tiny_model):
    with pytest.raises(BackendError, match="needs a CUDA device") as exc:
        runners_from_model(tiny_model, "cpu", "fp16")
    assert "\n" not in str(exc.value)
