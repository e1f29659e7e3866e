"""The decoder cut for slab-wise execution: a low-resolution head and one small graph per
full-resolution convolution, so the runtime (aldm.runtime.tiled) never holds more than two
full-resolution activations and runs each convolution over slabs of rows.

The full-resolution level is where the decoder's memory goes (official widths: 64 channels x
144x192x144 = 1 GB per activation; a whole-graph decode keeps several alive at once, plus the
centred copies of the staged normalisations). Its GroupNorms need statistics over the whole
volume, and each norm's statistics depend on every layer before it, so the cut is made at the
norms: each slab graph takes its input's per-channel mean and 1/std as inputs (gathered by the
previous graph over all slabs) and returns, beside its output slab, the per-channel mean and
variance of that slab (means taken one axis at a time, as aldm.export.stable_norm does, so no
float32 sum grows long). The runtime merges them in float64. One pass, no recomputation; the
result equals the whole-graph decode to float32 rounding.

Slabs run along axis 2 (H, the outermost spatial axis, contiguous per channel). A 3x3x3
convolution needs one row of context each side: the slab graphs take rows a-1..b+1 and return
rows a..b (no padding along H); `mask` zeroes the context rows that fall outside the volume
after normalisation and activation, which is the zero padding the whole convolution sees.

Graphs (B = 1 at run time; rows dynamic):
  head:     z -> h (the input of the last Upsample)                         [norms inside, staged]
  up:       h rows a/2-1..b/2+1 -> nearest x2 -> conv3 -> rows a..b, mean, var
  conv:     x rows a-1..b+1, mean, rstd, mask -> conv3(silu(norm(x))) -> y, mean, var
  conv_res: as conv, plus r rows a..b -> y + shortcut(r)
  out:      as conv, no statistics (the decoder's output)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aldm.models.aldm import ALDM
from aldm.runtime.manifest import ComponentSpec
from aldm.runtime.tiled import ROWS, ROWS_IN, head_spec, step_spec

AXIS = 2


def supports_tiling(model: ALDM) -> bool:
    """The cut needs an upsample into the full-resolution level (ch_mult of length >= 2)."""
    return len(model.config.first_stage_config.ddconfig.ch_mult) >= 2


class HeadGraph(nn.Module):
    """post_quant_conv, conv_in, mid and every level above 0 except level 1's upsample."""

    def __init__(self, m: ALDM):
        super().__init__()
        self.vq = m.first_stage_model
        dec = self.vq.decoder
        self.ups = nn.ModuleDict({str(lv): PhaseUpsample(dec.up[lv].upsample.conv) for lv in range(2, len(dec.up))})

    def forward(self, z):
        dec = self.vq.decoder
        h = dec.mid.block_1(dec.conv_in(self.vq.post_quant_conv(z)))
        for level in reversed(range(1, len(dec.up))):
            for block in dec.up[level].block:
                h = block(h)
            if level > 1:
                h = self.ups[str(level)](h)
        return h


def _stats(y):
    """Per-channel mean and (population) variance of a slab, means staged axis by axis."""
    m = y.mean(dim=4, keepdim=True).mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)
    d = y - m
    v = (d * d).mean(dim=4).mean(dim=3).mean(dim=2)
    return m.flatten(1), v


def _conv_rows(conv: nn.Conv3d, h):
    """The module's 3x3x3 convolution with no padding along the slab axis."""
    return F.conv3d(h, conv.weight, conv.bias, padding=(0, 1, 1))


def phase_kernels(conv: nn.Conv3d) -> torch.Tensor:
    """The eight 2x2x2 kernels (8, Co, Ci, 2, 2, 2) equivalent to nearest x2 then `conv` (3x3x3).

    Along one axis, output 2i+p sees upsampled rows 2i+p-1..2i+p+1, which are low-resolution rows
    (i-1, i, i) for p = 0 and (i, i, i+1) for p = 1: taps [w0, w1+w2] on rows i-1..i, or
    [w0+w1, w2] on rows i..i+1. 8 taps per output instead of 27: 3.4x fewer multiply-adds, and
    the full-resolution upsampled copy is never made."""
    w = conv.weight
    fold = [lambda k, ax: torch.stack([k.select(ax, 0), k.select(ax, 1) + k.select(ax, 2)], dim=ax),
            lambda k, ax: torch.stack([k.select(ax, 0) + k.select(ax, 1), k.select(ax, 2)], dim=ax)]
    out = []
    for ph in range(2):
        for pw in range(2):
            for pd in range(2):
                k = fold[ph](w, 2)
                k = fold[pw](k, 3)
                out.append(fold[pd](k, 4))
    return torch.stack(out)


class PhaseUpsample(nn.Module):
    """conv(nearest_x2(x)) computed as eight 2x2x2 convolutions on x, interleaved (the kernels
    are folded once, here, so the graph holds them as constants)."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        with torch.no_grad():
            k = phase_kernels(conv).detach()
        for i in range(8):  # one constant each: a Conv's weights must be an initializer (TensorRT)
            self.register_buffer(f"k{i}", k[i].clone())
        self.register_buffer("bias", conv.bias.detach().clone())

    def forward(self, x: torch.Tensor, pad_rows: bool = True) -> torch.Tensor:
        """pad_rows=False: x carries one context row each side along axis 2 (a slab) and the
        result covers only the rows between them."""
        xp = F.pad(x, (1, 1, 1, 1, 1, 1) if pad_rows else (1, 1, 1, 1, 0, 0))
        b, _, h, w, d = x.shape
        h = h if pad_rows else h - 2
        parts = []
        for i in range(8):
            ph, pw, pd = i >> 2, (i >> 1) & 1, i & 1
            parts.append(F.conv3d(xp[:, :, ph : ph + h + 1, pw : pw + w + 1, pd : pd + d + 1],
                                  getattr(self, f"k{i}"), self.bias))
        co = parts[0].shape[1]
        y = torch.stack(parts, dim=2).reshape(b, co, 2, 2, 2, h, w, d)  # (B, C, ph, pw, pd, H, W, D)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, co, 2 * h, 2 * w, 2 * d)


def upsample_conv(conv: nn.Conv3d, x: torch.Tensor, pad_rows: bool = True) -> torch.Tensor:
    """PhaseUpsample in one call (for checks; graphs keep a PhaseUpsample module)."""
    return PhaseUpsample(conv)(x, pad_rows)


class UpGraph(nn.Module):
    def __init__(self, up: nn.Module):
        super().__init__()
        self.up = PhaseUpsample(up.conv)

    def forward(self, x):
        y = self.up(x, pad_rows=False)
        m, v = _stats(y)
        return y, m, v


class NormConvGraph(nn.Module):
    """conv(silu(groupnorm(x))) with the norm's statistics given; optional residual shortcut."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv3d, shortcut: nn.Module | None = None,
                 residual: bool = False, stats: bool = True):
        super().__init__()
        self.norm, self.conv, self.shortcut = norm, conv, shortcut
        self.residual, self.stats = residual, stats

    def _act(self, x, mean, rstd, mask):
        shape = (1, -1, 1, 1, 1)
        h = (x - mean.view(shape)) * rstd.view(shape) * self.norm.weight.view(shape) + self.norm.bias.view(shape)
        return F.silu(h) * mask.view(1, 1, -1, 1, 1)

    def forward(self, x, mean, rstd, mask, r=None):
        y = _conv_rows(self.conv, self._act(x, mean, rstd, mask))
        if self.residual:
            y = y + (self.shortcut(r) if self.shortcut is not None else r)
        if not self.stats:
            return y
        m, v = _stats(y)
        return y, m, v


def tail_program(model: ALDM, crop: tuple[int, int, int]) -> tuple[list[dict], list[nn.Module]]:
    """The full-resolution steps (manifest entries without files) and their graph modules."""
    dd = model.config.first_stage_config.ddconfig
    dec = model.first_stage_model.decoder
    g, eps = dd.num_groups, float(dec.norm_out.eps)
    ch_half = dd.ch * dd.ch_mult[1]
    steps: list[dict] = [dict(kind="up", input="h", output="u", in_channels=ch_half, channels=ch_half)]
    modules: list[nn.Module] = [UpGraph(dec.up[1].upsample)]
    cur, cur_ch, fresh = "u", ch_half, 0
    for i, block in enumerate(dec.up[0].block):
        co = block.conv1.out_channels
        steps.append(dict(kind="conv", input=cur, output="h0", in_channels=cur_ch, channels=co,
                          groups=g, eps=float(block.norm1.eps)))
        modules.append(NormConvGraph(block.norm1, block.conv1))
        shortcut = getattr(block, "nin_shortcut", None)
        if shortcut is None:
            out = cur  # same width: the block's output overwrites its input, slab by slab
        else:
            fresh += 1
            out = f"x{fresh}"
        steps.append(dict(kind="conv_res", input="h0", residual=cur, output=out, in_channels=co,
                          channels=co, groups=g, eps=float(block.norm2.eps)))
        modules.append(NormConvGraph(block.norm2, block.conv2, shortcut, residual=True))
        cur, cur_ch = out, co
    steps.append(dict(kind="out", input=cur, output="y", in_channels=cur_ch, channels=dd.out_ch,
                      groups=g, eps=eps))
    modules.append(NormConvGraph(dec.norm_out, dec.conv_out, stats=False))
    return steps, modules


def export_tiles(model: ALDM, out_dir: Path, crop: tuple[int, int, int], latent: tuple[int, ...],
                 export_fn) -> dict:
    """Write the head and slab graphs into `out_dir` with `export_fn(module, spec, path, feeds,
    dynamic)` (dynamic: input name -> {axis: torch.export.Dim or derived dim}); returns the
    manifest's `decoder_tiling` entry."""
    head = head_spec(model.config.to_dict(), latent, crop)
    z = torch.randn(2, *latent)
    export_fn(HeadGraph(model).eval(), head, out_dir / head.file, (z,), {"z": {0: torch.export.Dim("batch", min=1, max=1024)}})
    steps, modules = tail_program(model, crop)
    for i, (step, module) in enumerate(zip(steps, modules)):
        if step["kind"] == "conv_res":
            step["residual_channels"] = next(s["channels"] for s in steps[:i] if s["output"] == step["residual"])
        step["file"] = f"decoder_tile{i:02d}_{step['kind']}.onnx"
        spec = step_spec(step, i, crop)  # the I/O the runtime will feed: one definition
        export_fn(module.eval(), spec, out_dir / spec.file, *_example(spec, step))
    return {"axis": AXIS, "head": head.file, "head_output": "h", "steps": steps}


def _example(spec: ComponentSpec, step: dict):
    """Example inputs (slab of 8 output rows) and the dynamic rows axis, for the exporter."""
    rows_in = torch.export.Dim("rows_in", min=4, max=4096)
    n_in = 6 if step["kind"] == "up" else 10
    feeds, dynamic = [], {}
    for t in spec.inputs:
        shape = tuple(n_in if s == ROWS_IN else n_in - 2 if s == ROWS else s for s in t.shape)
        if t.name == "rstd" or t.name == "mask":
            feeds.append(torch.ones(shape))
        else:
            feeds.append(torch.randn(shape))
        if t.name in ("x", "mask"):
            dynamic[t.name] = {0 if t.name == "mask" else AXIS: rows_in}
        elif t.name == "r":
            dynamic[t.name] = {AXIS: rows_in - 2}
        else:
            dynamic[t.name] = None
    return tuple(feeds), dynamic
