"""The whole ALDM model, laid out like the official LatentDiffusion so state_dict names match.

`ALDM.state_dict()` has the official LDM keys `first_stage_model.*` and `model.diffusion_model.*`.
The noise schedule is kept as numpy (float32 values); `official_state_dict` adds it back as the
twelve buffers an official checkpoint carries (the EMA copy is a loading concern, see `loader`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aldm.models.config import LDMConfig, VQConfig
from aldm.models.spade import SPADEGenerator
from aldm.models.unet import UNetModel
from aldm.models.vqgan import Decoder, Encoder, VectorQuantizer
from aldm.runtime.schedule import BUFFER_NAMES, make_schedule


class VQModel(nn.Module):
    """First stage: encoder, quantizer, decoder and the MS-SPADE generator (`first_stage_model`)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        dd = cfg.ddconfig
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv3d(dd.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv3d(cfg.embed_dim, dd.z_channels, 1)
        self.spade = SPADEGenerator(cfg.num_classes, dd.z_channels, cfg.spade_nf, cfg.spade_nhidden)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, H, W, D) -> (z_q (B, embed_dim, h, w, d), code indices (B, h*w*d))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latent -> volume; never re-quantizes."""
        return self.decoder(self.post_quant_conv(z))


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class ALDM(nn.Module):
    """encode / spade / unet / decode, plus the noise schedule (`alphas_cumprod`, float64 numpy)."""

    def __init__(self, config: LDMConfig, schedule: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.config = config
        self.first_stage_model = VQModel(config.first_stage_config)
        self.model = DiffusionWrapper(UNetModel(config.unet_config))
        if schedule is None:
            schedule = make_schedule(config.timesteps, config.linear_start, config.linear_end,
                                     config.beta_schedule)
        self._schedule = {n: np.asarray(schedule[n], np.float32) for n in BUFFER_NAMES}

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t as float64 holding the float32 buffer values (what the official samplers read)."""
        return self._schedule["alphas_cumprod"].astype(np.float64)

    def schedule(self) -> dict[str, np.ndarray]:
        """All twelve schedule buffers as float32 numpy arrays (copies)."""
        return {n: v.copy() for n, v in self._schedule.items()}

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict plus the schedule buffers, as the official LatentDiffusion saves it."""
        sd = {n: torch.from_numpy(v.copy()) for n, v in self._schedule.items()}
        sd.update(self.state_dict())
        return sd

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W, D) in ~[-1, 1] -> quantized latent z_q (B, 4, H/4, W/4, D/4), unscaled."""
        return self.first_stage_model.encode(x)[0]

    def spade(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Source latent and target classes (B,) -> target-like latent, same shape."""
        return self.first_stage_model.spade(z, y)

    def unet(self, x_t: torch.Tensor, t: torch.Tensor, c_concat: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        """eps prediction from x_t (B, 4, ...), t (B,), c_concat (B, 8, ...) and classes y (B,)."""
        return self.model.diffusion_model(torch.cat([x_t, c_concat], dim=1), t, y)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, 4, h, w, d), unscaled -> volume (B, 1, 4h, 4w, 4d)."""
        return self.first_stage_model.decode(z)
