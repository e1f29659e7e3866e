"""3-D VQ-GAN first stage: Encoder, VectorQuantizer, Decoder (SPEC §2).

Module and parameter names follow the official `ldm.modules.diffusionmodules.model` so that
official state_dicts load unchanged. No attention; GroupNorm eps 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aldm.models.config import DDConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1, norm2-swish-conv2, plus an (optionally 1x1-projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    """Zero-pad one voxel at the END of each axis, then a stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 on every axis, then a 3x3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ModuleList) and an optional `downsample`/`upsample`."""


class Encoder(nn.Module):
    """(B, in_channels, H, W, D) -> (B, z_channels, H/2^(L-1), ...)."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        if cfg.attn_resolutions:
            raise ValueError("the ALDM VQ-GAN has no attention; attn_resolutions must be empty")
        g = cfg.num_groups
        self.conv_in = nn.Conv3d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            lvl = _Level()
            lvl.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, cfg.ch * mult, g))
                block_in = cfg.ch * mult
            if level != len(cfg.ch_mult) - 1:
                lvl.downsample = Downsample(block_in)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.norm_out = _norm(block_in, g)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv3d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            for block in lvl.block:
                h = block(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_1(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w, d) -> (B, out_ch, h*2^(L-1), ...); no output activation."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        g = cfg.num_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv3d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        levels = []
        for level in reversed(range(len(cfg.ch_mult))):
            lvl = _Level()
            lvl.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                lvl.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], g))
                block_in = cfg.ch * cfg.ch_mult[level]
            if level != 0:
                lvl.upsample = Upsample(block_in)
            levels.insert(0, lvl)
        self.up = nn.ModuleList(levels)  # stored in ascending level order, run descending
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv3d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_1(self.conv_in(z))
        for lvl in reversed(self.up):
            for block in lvl.block:
                h = block(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer; distances in fp32 exactly as the official code forms them.

    `chunk` bounds the (B, n, K) distance block so full-size volumes do not need
    several 2 GB matrices at once; it does not change which code is chosen.
    """

    def __init__(self, n_embed: int, embed_dim: int, chunk: int = 8192):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.chunk = chunk

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W, D) -> code indices (B, H*W*D), row-major over (h, w, d)."""
        b, c = h.shape[0], h.shape[1]
        n = h.shape[2] * h.shape[3] * h.shape[4]
        z = h.permute(0, 2, 3, 4, 1).reshape(b, n, c)  # (B, N, C)
        e = self.embedding.weight  # (K, C)
        e_sq = torch.sum(e**2, dim=1)  # (K,)
        idx = []
        for start in range(0, n, self.chunk):
            zc = z[:, start : start + self.chunk]
            # d = |z|^2 + |e|^2 - 2 z.e  (the official evaluation order)
            d = torch.sum(zc**2, dim=2, keepdim=True) + e_sq - 2 * torch.matmul(zc, e.t())
            idx.append(torch.argmin(d, dim=2))
        return idx[0] if len(idx) == 1 else torch.cat(idx, dim=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z_q, indices): z_q (B, C, H, W, D) codebook vectors, indices (B, N)."""
        idx = self.codes(h)
        b, c, hh, ww, dd = h.shape
        z_q = self.embedding(idx).reshape(b, hh, ww, dd, c).permute(0, 4, 1, 2, 3)
        return z_q.contiguous(), idx
