"""The numpy DDIM/DDPM maths against the official coefficients and traces (no model needed)."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from aldm.errors import UsageError
from aldm.runtime import sampler as S
from aldm.runtime.schedule import make_schedule
from conftest import SHARED, need, rel_err

AC = make_schedule()["alphas_cumprod"]


def test_official_timestep_spacing():
    assert list(S.ddim_timesteps(10)) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert S.ddim_timesteps(200)[-1] == 996 and S.ddim_timesteps(50)[-1] == 981
    assert len(S.ddim_timesteps(200)) == 200


@pytest.mark.parametrize("steps", [150, 3, 300, 333, 1000, 0, 1001])
def test_step_counts_the_official_sampler_gets_wrong_are_refused(steps):
    with pytest.raises(UsageError, match="not a valid count"):
        S.ddim_timesteps(steps)


def test_valid_step_counts_are_the_divisors_of_1000_below_1000():
    assert S.valid_ddim_steps() == [1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500]


@pytest.mark.parametrize("eta", [0, 1])
def test_coefficients_match_the_official_sampler(eta):
    g = dict(np.load(need(SHARED / "reference/golden" / f"ddim_eta{eta}.npz")))
    s = S.ddim_schedule(AC, 10, float(g["eta"]))
    np.testing.assert_array_equal(s.timesteps, g["ddim_timesteps"])
    np.testing.assert_array_equal(s.alphas, g["ddim_alphas"])
    np.testing.assert_array_equal(s.alphas_prev, g["ddim_alphas_prev"])
    np.testing.assert_array_equal(s.sigmas, g["ddim_sigmas"])
    np.testing.assert_array_equal(s.sqrt_one_minus_alphas, g["ddim_sqrt_one_minus_alphas"])
    assert s.alphas_prev[0] == np.float32(0.9985)  # the last step targets ᾱ_0, not 1


@pytest.mark.parametrize("steps", [10, 50, 200])
@pytest.mark.parametrize("eta", [0, 1])
def test_coefficients_match_the_full_schedule_tables(steps, eta):
    tables = json.loads(need(SHARED / "reference/tables/ddim_tables_full_schedule.json").read_text())
    rows = tables[f"S{steps}_eta{eta}"]["per_index"]
    rows = ast.literal_eval(rows) if isinstance(rows, str) else rows
    s = S.ddim_schedule(AC, steps, eta)
    for r in rows:
        j = r["index"]
        assert s.timesteps[j] == r["t"]
        assert s.alphas[j] == np.float32(r["a_t"])
        assert abs(s.sigmas[j] - r["sigma"]) < 5e-8  # the tables store float32-rounded sigmas
        assert s.sqrt_one_minus_alphas[j] == np.float32(r["sqrt_one_minus_a_t"])


@pytest.mark.parametrize("eta", [0, 1])
def test_each_recorded_ddim_step_replays(eta):
    g = dict(np.load(need(SHARED / "reference/golden" / f"ddim_eta{eta}.npz")))
    s = S.ddim_schedule(AC, 10, float(eta))
    for i in range(10):
        z = g["noise"][i] if eta else np.full_like(g["x_seq"][0], np.nan)  # σ=0: noise unused...
        if not eta:
            z = np.zeros_like(z)  # ...but NaN * 0 is NaN, so give zeros
        x = S.ddim_step(g["x_seq"][i], g["e_t"][i], 9 - i, s, z)
        # torch's float32 sqrt is not always correctly rounded: a 1-ulp coefficient difference
        assert rel_err(x, g["x_seq"][i + 1]) <= 1e-6


def test_sampler_is_a_pure_function_of_its_noise():
    rng_calls = []

    def denoise(x, t):
        rng_calls.append(int(t[0]))
        return np.tanh(x) * 0.1

    s = S.ddim_schedule(AC, 10, 1.0)
    x_T = np.ones((2, 4, 2, 2, 2), np.float32)
    a = S.ddim_sample(denoise, x_T, s, S.gaussian_noise(np.random.default_rng(5)))
    b = S.ddim_sample(denoise, x_T, s, S.gaussian_noise(np.random.default_rng(5)))
    np.testing.assert_array_equal(a, b)
    assert rng_calls[:10] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_official_rng_draws_a_noise_every_step_even_at_eta_0():
    draws = []

    def noise(shape):
        draws.append(shape)
        return np.zeros(shape, np.float32)

    s = S.ddim_schedule(AC, 10, 0.0)
    x = np.ones((1, 4, 2, 2, 2), np.float32)
    S.ddim_sample(lambda x, t: x * 0, x, s, noise, official_rng=True)
    assert len(draws) == 10
    draws.clear()
    S.ddim_sample(lambda x, t: x * 0, x, s, noise, official_rng=False)
    assert draws == []


def test_progress_callback_reports_every_step():
    seen = []
    s = S.ddim_schedule(AC, 5, 0.0)
    S.ddim_sample(lambda x, t: x * 0, np.ones((1, 4, 2, 2, 2), np.float32), s,
                  S.gaussian_noise(np.random.default_rng(0)),
                  callback=lambda i, n, t, x: seen.append((i, n, t)))
    assert seen == [(0, 5, 801), (1, 5, 601), (2, 5, 401), (3, 5, 201), (4, 5, 1)]


def test_ddpm_step_adds_no_noise_at_t0():
    buf = make_schedule()
    x = np.ones((2, 4, 2, 2, 2), np.float32)
    eps = np.zeros_like(x)
    z = np.full_like(x, 5.0)
    out = S.ddpm_step(x, eps, np.array([0, 500]), buf, z)
    def mean(t):
        return buf["posterior_mean_coef1"][t] * buf["sqrt_recip_alphas_cumprod"][t] + buf["posterior_mean_coef2"][t]

    np.testing.assert_allclose(out[0], mean(0), rtol=1e-6)
    sigma = np.exp(0.5 * buf["posterior_log_variance_clipped"][500])
    np.testing.assert_allclose(out[1], mean(500) + 5.0 * sigma, rtol=1e-6)


def test_strength_runs_the_lowest_steps_from_the_noised_initial_latent():
    s = S.ddim_schedule(AC, 25, 0.0)
    sub = S.ddim_truncate(s, 0.2)  # 5 of 25 steps: t = 161 .. 1
    assert list(sub.timesteps[::-1]) == [161, 121, 81, 41, 1]
    assert list(S.ddim_truncate(s, 1.0).timesteps) == list(s.timesteps)
    assert len(S.ddim_truncate(s, 1e-3).timesteps) == 1  # never zero steps
    for bad in (-0.5, 1.5):
        with pytest.raises(UsageError, match="strength"):
            S.ddim_truncate(s, bad)
    with pytest.raises(ValueError, match="no diffusion step"):
        S.ddim_truncate(s, 0.0)  # strength 0 never reaches the sampler: no schedule to cut
    assert S.strength_steps(25, 0.0) == 0 and S.strength_steps(25, 1e-3) == 1
    init = np.full((1, 4, 2, 2, 2), 2.0, np.float32)
    x = S.noised_start(init, sub, lambda shape: np.ones(shape, np.float32))
    a = AC[161]
    np.testing.assert_allclose(x, np.sqrt(a) * 2 + np.sqrt(1 - a), rtol=1e-6)
    # a perfect denoiser (eps = the noise that was added) predicts the init at every step and
    # ends on it at the final alpha-bar (AC[0]), as the official sampler does
    out = S.ddim_sample(lambda x, t: np.ones_like(x), x, sub, lambda shape: np.zeros(shape, np.float32))
    np.testing.assert_allclose(out, np.sqrt(AC[0]) * 2 + np.sqrt(1 - AC[0]), rtol=1e-5)
