"""The official noise schedule (SPEC §6) in numpy: float64 arithmetic, float32 buffers."""

from __future__ import annotations

import numpy as np

from aldm.errors import AldmError

BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_betas(timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195,
               schedule: str = "linear") -> np.ndarray:
    """float64 betas. The official "linear" schedule is square-root spaced: linspace(√s, √e)².

    numpy's linspace differs from torch's by an ulp on some float64 entries; every float32
    buffer of `make_schedule` is still bit-identical to the official checkpoint buffers.
    """
    if schedule != "linear":
        raise AldmError(f"beta schedule {schedule!r} is not supported (ALDM uses 'linear')")
    return np.linspace(linear_start**0.5, linear_end**0.5, timesteps) ** 2


def make_schedule(timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195,
                  schedule: str = "linear") -> dict[str, np.ndarray]:
    """The twelve buffers the official LatentDiffusion registers, float32, each (timesteps,)."""
    betas = make_betas(timesteps, linear_start, linear_end, schedule)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}
