"""3-D denoising UNet (SPEC §4): eps = UNet(cat[x_t, c_concat], t, y).

Names follow the official `openaimodel.UNetModel` (legacy attention, no scale-shift norm,
conv resampling). The attention body is called directly (no checkpoint autograd function) and
written with matmuls, not einsum: identical numerics, exportable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aldm.models.config import UNetConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in fp32 whatever the input dtype (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) integer timesteps -> (B, dim) sinusoidal embedding, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """in_layers (GN, SiLU, conv) + emb_layers (SiLU, Linear) + out_layers (GN, SiLU, Dropout, conv)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv3d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over all voxels, legacy head layout ([q|k|v] per head)."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        xf = x.flatten(2)  # (B, C, T)
        qkv = self.qkv(self.norm(xf))  # (B, 3C, T)
        ch = c // self.num_heads
        t = xf.shape[2]
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, t).split(ch, dim=1)  # (B*n, ch, T) each
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.matmul((q * scale).transpose(1, 2), k * scale)  # (B*n, T_query, T_key)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.matmul(v, w.transpose(1, 2))  # (B*n, ch, T_query)
        h = self.proj_out(a.reshape(b, c, t))
        return (xf + h).reshape(x.shape)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose layers also receive the embedding (a plain conv does not)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv3d) else layer(x, emb)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.model_channels = mc

        def heads(ch: int) -> int:
            if cfg.num_head_channels == -1:
                return cfg.num_heads
            if ch % cfg.num_head_channels:
                raise ValueError(f"{ch} channels do not split into heads of {cfg.num_head_channels}")
            return ch // cfg.num_head_channels

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv3d(cfg.in_channels, mc, 3, padding=1))]
        )
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), g))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, g), AttentionBlock(ch, heads(ch), g), ResBlock(ch, emb_dim, ch, g)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, mc * mult, g)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), g))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(g, ch), nn.SiLU(), nn.Conv3d(mc, cfg.out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w, d), t (B,) int, y (B,) int -> eps (B, out_channels, h, w, d)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if hasattr(self, "label_emb"):
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
