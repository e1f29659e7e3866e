"""MS-SPADE: class-selected, self-modulated instance norm blocks (SPEC §3).

Export-friendly: the target class `y` is a tensor input and rows of one batch may target
different classes. Every class branch is evaluated on the whole batch (the number of classes
is a static constant) and each row keeps its own class's result with `torch.where`, so there
is no loop over `y[i].item()` and nothing is baked into a trace. The selection is exact: row i
is bit-identical to row i of the batch run with class y[i] everywhere. The price is that every
branch runs (about 2.5x the FLOPs of one branch); SPADE runs once per volume, not per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SPADE(nn.Module):
    """out = InstanceNorm(x) * (1 + gamma(x)) + beta(x); gamma/beta from the un-normalised x."""

    def __init__(self, norm_nc: int, nhidden: int):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv3d(norm_nc, nhidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv3d(nhidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv3d(nhidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)
        actv = self.mlp_shared(x)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEMultimodal(nn.Module):
    """`spades.{k}` holds the SPADE of target class k; row i uses class y[i]."""

    def __init__(self, num_classes: int, norm_nc: int, nhidden: int):
        super().__init__()
        self.spades = nn.ModuleList(SPADE(norm_nc, nhidden) for _ in range(num_classes))

    def forward(self, x: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        if isinstance(y, int):  # one class for the whole batch (training): run only that branch
            return self.spades[y](x)
        pick = y.reshape(-1, 1, 1, 1, 1)  # (B,) -> broadcastable over (B, C, H, W, D)
        out = self.spades[0](x)
        for k in range(1, len(self.spades)):
            out = torch.where(pick == k, self.spades[k](x), out)
        return out


class SPADEResnetBlock(nn.Module):
    """x_s + conv_1(lrelu(norm_1(conv_0(lrelu(norm_0(x, y))), y))); x_s = conv_s(x) if fin != fout."""

    def __init__(self, num_classes: int, fin: int, fout: int, nhidden: int):
        super().__init__()
        fmid = min(fin, fout)
        self.conv_0 = nn.Conv3d(fin, fmid, 3, padding=1)
        self.conv_1 = nn.Conv3d(fmid, fout, 3, padding=1)
        if fin != fout:
            self.conv_s = nn.Conv3d(fin, fout, 1, bias=False)
        self.norm_0 = SPADEMultimodal(num_classes, fin, nhidden)
        self.norm_1 = SPADEMultimodal(num_classes, fmid, nhidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        x_s = self.conv_s(x) if hasattr(self, "conv_s") else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, y), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, y), 0.2))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """Four SPADE resnet blocks z_dim -> nf -> 2nf -> nf -> z_dim; no final activation."""

    def __init__(self, num_classes: int = 4, z_dim: int = 4, nf: int = 128, nhidden: int = 64):
        super().__init__()
        widths = [z_dim, nf, 2 * nf, nf, z_dim]
        self.block = nn.ModuleList(
            SPADEResnetBlock(num_classes, widths[i], widths[i + 1], nhidden) for i in range(4)
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        for block in self.block:
            z = block(z, y)
        return z
