"""DDIM and DDPM samplers as pure numpy functions over a denoiser callable (SPEC §7).

`denoise(x, t) -> eps` takes x (B, C, h, w, d) float32 and t (B,) int64. Randomness comes in as
`noise(shape) -> float32 array` (see `gaussian_noise`, `replay_noise`); progress goes out
through `callback(i, total, t, x)`. The arithmetic reproduces the official sampler's dtypes
step by step (float32 tensors, coefficients computed in the official float32/float64 mix), so
with the same eps and noises the official traces replay bit-for-bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from aldm.errors import UsageError

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]
Noise = Callable[[tuple[int, ...]], np.ndarray]
Callback = Optional[Callable[[int, int, int, np.ndarray], None]]
f32 = np.float32


def progress_only(callback: Callable[[int, int, int, None], None]) -> Callable:
    """Mark a step callback that does not look at x (a progress bar, a cancel check): it is called
    with x = None, and a loop on a GPU need not copy x to the host for it each step."""
    def progress(i: int, total: int, t: int, x) -> None:
        callback(i, total, t, None)

    progress.wants_x = False
    return progress


def wants_x(callback: Callback) -> bool:
    """Whether a step callback needs x (every callback does unless `progress_only` marked it)."""
    return callback is not None and getattr(callback, "wants_x", True)


def gaussian_noise(rng: np.random.Generator) -> Noise:
    """Standard normal float32 draws from a numpy Generator."""
    return lambda shape: rng.standard_normal(shape, dtype=np.float32)


def replay_noise(arrays: Iterable[np.ndarray]) -> Noise:
    """Hand out recorded draws in order (to replay the official sampler's traces)."""
    it: Iterator[np.ndarray] = iter(arrays)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(next(it), np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"recorded noise has shape {arr.shape}, the sampler asked for {shape}")
        return arr

    return draw


# ----------------------------------------------------------------------------------------- DDIM

def valid_ddim_steps(timesteps: int = 1000) -> list[int]:
    """Step counts the official uniform DDIM schedule runs exactly (S steps, no IndexError)."""
    return [s for s in range(1, timesteps + 1) if _ddim_ok(s, timesteps)]


def _ddim_ok(steps: int, timesteps: int) -> bool:
    c = timesteps // steps
    return len(range(0, timesteps, c)) == steps and (steps - 1) * c + 1 < timesteps


def ddim_timesteps(steps: int, timesteps: int = 1000) -> np.ndarray:
    """Ascending τ = [0, c, 2c, ...] + 1 with c = T // S (the official 'uniform' discretisation).

    Officially, S that does not divide T runs a different number of steps (S=150 runs 167) and
    some S crash (S=1000, 251..333); both are refused here with the nearest valid counts.
    """
    if not 1 <= steps <= timesteps or not _ddim_ok(steps, timesteps):
        valid = valid_ddim_steps(timesteps)
        near = sorted(valid, key=lambda s: abs(s - steps))[:4]
        raise UsageError(f"{steps} DDIM steps is not a valid count for {timesteps} training steps "
                         f"(the official sampler would run a different count or crash); "
                         f"try {', '.join(map(str, sorted(near)))}")
    c = timesteps // steps
    return np.arange(0, timesteps, c, dtype=np.int64) + 1


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-index DDIM coefficients (index j runs at t = timesteps[j]; the loop goes j = S-1..0)."""

    timesteps: np.ndarray  # τ_j, int64 ascending
    alphas: np.ndarray  # a_j = ᾱ[τ_j], float32
    alphas_prev: np.ndarray  # ᾱ[τ_{j-1}] (ᾱ_0 for j = 0), float64 holding float32 values
    sigmas: np.ndarray  # σ_j, float64
    sqrt_one_minus_alphas: np.ndarray  # sqrt(1 - a_j) in float32
    eta: float


def ddim_schedule(alphas_cumprod: np.ndarray, steps: int, eta: float) -> DDIMSchedule:
    """Coefficients exactly as the official `make_ddim_sampling_parameters` evaluates them."""
    if eta < 0:
        raise UsageError(f"eta must be >= 0, got {eta}")
    ac = np.asarray(alphas_cumprod, np.float32)
    tau = ddim_timesteps(steps, len(ac))
    a = ac[tau]
    a_prev = np.concatenate([ac[:1], ac[tau[:-1]]]).astype(np.float64)
    r = (f32(1) / (f32(1) - a)).astype(np.float64)  # float32 reciprocal, as in the official mix
    sigmas = eta * np.sqrt((1 - a_prev) * r * (1 - a / a_prev))
    return DDIMSchedule(tau, a, a_prev, sigmas, np.sqrt(f32(1) - a), float(eta))


def ddim_coefficients(s: DDIMSchedule) -> np.ndarray:
    """(S, 4) float32 rows [a_t, a_prev, sigma, sqrt(1 - a_t)] per index j: everything a DDIM
    update needs, as the float32 values `ddim_step` computes with (the step graph's `coef` input)."""
    return np.stack([s.alphas, s.alphas_prev, s.sigmas, s.sqrt_one_minus_alphas], axis=1).astype(np.float32)


def ddim_update(x: np.ndarray, eps: np.ndarray, coef: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x_t -> x_{t_prev} from one row of `ddim_coefficients` and z ~ N(0, I) (float32 throughout;
    the step graph evaluates the same expression, in the same order)."""
    a_t, a_prev, sigma, s1m = (f32(c) for c in coef)
    x0_hat = (x - s1m * eps) / np.sqrt(a_t)  # 1. predicted x_0
    direction = np.sqrt(f32(1) - a_prev - sigma**2) * eps  # 2. direction pointing to x_t
    return np.sqrt(a_prev) * x0_hat + direction + sigma * z  # 3. x_{t-1}


def ddim_step(x: np.ndarray, eps: np.ndarray, j: int, s: DDIMSchedule, z: np.ndarray) -> np.ndarray:
    """x_t -> x_{t_prev} for index j, with z ~ N(0, I) (float32 throughout)."""
    return ddim_update(x, eps, ddim_coefficients(s)[j], z)


def check_strength(strength: float, name: str = "strength") -> float:
    """`strength` if it is in [0, 1], else a UsageError naming it as `name`. 0 means no diffusion:
    the MS-SPADE's target-like latent is decoded as it is."""
    if not 0 <= strength <= 1:
        raise UsageError(f"{name} must be in [0, 1], got {strength}")
    return strength


def strength_steps(steps: int, strength: float) -> int:
    """How many of a `steps`-step schedule's steps run at `strength`: none at 0, else at least one."""
    if check_strength(strength) == 0:
        return 0
    return max(1, int(round(strength * steps)))


def ddim_truncate(schedule: DDIMSchedule, strength: float) -> DDIMSchedule:
    """The lowest round(strength * S) steps of a schedule (at least one), for sampling that starts
    from a noised initial latent at τ_{k-1} instead of pure noise at τ_{S-1} (SDEdit, Meng et al.
    2022; "strength" as in image-to-image pipelines). strength 1 is the whole schedule."""
    if strength == 0:
        raise ValueError("strength 0 runs no diffusion step: there is no schedule to truncate")
    k = strength_steps(len(schedule.timesteps), strength)
    s = schedule
    return DDIMSchedule(s.timesteps[:k], s.alphas[:k], s.alphas_prev[:k], s.sigmas[:k],
                        s.sqrt_one_minus_alphas[:k], s.eta)


def noised_start(init: np.ndarray, schedule: DDIMSchedule, noise: Noise) -> np.ndarray:
    """x at the schedule's last (noisiest) step: sqrt(a) * init + sqrt(1 - a) * noise."""
    a = f32(schedule.alphas[-1])
    return (np.sqrt(a) * np.asarray(init, np.float32) + np.sqrt(f32(1) - a) * noise(init.shape)).astype(np.float32)


# One whole DDIM step, x_t -> x_{t_prev}: (x, t (B,) int64, coef (4,) float32, z) -> x_prev.
Step = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def ddim_sample(denoise: Denoiser, x_T: np.ndarray, schedule: DDIMSchedule, noise: Noise, *,
                official_rng: bool = True, callback: Callback = None) -> np.ndarray:
    """Run DDIM from x_T down to τ_0 (ending at ᾱ_0 = 0.9985, as the official sampler does).

    official_rng: draw a noise every step even when σ = 0 (the official RNG consumption), so
    that a seeded noise stream lines up with the official one; False skips those draws.
    """
    def step(x: np.ndarray, t: np.ndarray, coef: np.ndarray, z: np.ndarray) -> np.ndarray:
        return ddim_update(x, denoise(x, t), coef, z)

    return ddim_sample_steps(step, x_T, schedule, noise, official_rng=official_rng, callback=callback)


def ddim_sample_steps(step: Step, x_T: np.ndarray, schedule: DDIMSchedule, noise: Noise, *,
                      official_rng: bool = True, callback: Callback = None) -> np.ndarray:
    """The DDIM loop over a whole-step function (the numpy update around a denoiser, or a step
    graph that runs UNet and update in one call); same noise draws and callbacks as ddim_sample."""
    x = np.asarray(x_T, np.float32)
    coefs = ddim_coefficients(schedule)
    total = len(schedule.timesteps)
    for i in range(total):
        j = total - 1 - i
        t = int(schedule.timesteps[j])
        if schedule.sigmas[j] > 0 or official_rng:
            z = noise(x.shape)
        else:
            z = np.zeros_like(x)
        x = step(x, np.full((x.shape[0],), t, np.int64), coefs[j], z)
        if callback is not None:
            callback(i, total, t, x)
    return x


# ----------------------------------------------------------------------------------------- DDPM

def ddpm_step(x: np.ndarray, eps: np.ndarray, t: np.ndarray, buffers: dict[str, np.ndarray],
              z: np.ndarray) -> np.ndarray:
    """Ancestral step x_t -> x_{t-1}; t (B,) int64 may differ per row; no clipping."""
    def at(name: str) -> np.ndarray:  # (B,) -> (B, 1, 1, 1, 1) float32
        return buffers[name][t].astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))

    x0_hat = at("sqrt_recip_alphas_cumprod") * x - at("sqrt_recipm1_alphas_cumprod") * eps
    mean = at("posterior_mean_coef1") * x0_hat + at("posterior_mean_coef2") * x
    nonzero = (t != 0).astype(np.float32).reshape(at("betas").shape)
    return mean + nonzero * np.exp(f32(0.5) * at("posterior_log_variance_clipped")) * z


def ddpm_sample(denoise: Denoiser, x_T: np.ndarray, buffers: dict[str, np.ndarray], noise: Noise, *,
                callback: Callback = None) -> np.ndarray:
    """All T ancestral steps, t = T-1 .. 0."""
    x = np.asarray(x_T, np.float32)
    total = len(buffers["betas"])
    for i, t in enumerate(range(total - 1, -1, -1)):
        tt = np.full((x.shape[0],), t, np.int64)
        x = ddpm_step(x, denoise(x, tt), tt, buffers, noise(x.shape))
        if callback is not None:
            callback(i, total, t, x)
    return x
