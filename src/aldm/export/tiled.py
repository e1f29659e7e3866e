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

Every activation of the full-resolution level lives in the slab layout (H, W, D, C): one volume,
rows outermost, channels innermost. The rows a..b are then one contiguous block, so the runtime
hands slabs to the engine, and takes its results, as views of its buffers (no copies); and it is
the layout OpenVINO's CPU convolutions read and write (NDHWC), so the transposes to and from the
(1, C, rows, W, D) the modules compute on vanish into the convolution (measured on a 16-channel
step at 144x192x144: 0.33 s, against 0.52 s channels-first with the transposes and reorders it
needs, and 0.39 s plus the copies of slabs cut from (1, C, H, W, D) arrays). The normalisation
runs in the slab layout, its statistics broadcast along the last axis. A 3x3x3
convolution needs one row of context each side: the slab graphs take rows a-1..b+1 and return
rows a..b (no padding along H); `mask` zeroes the context rows that fall outside the volume
after normalisation and activation, which is the zero padding the whole convolution sees.

Graphs (one volume; rows dynamic):
  head:     z (1, C, h, w, d) -> h (H/2, W/2, D/2, C'), the input of the last upsample  [norms inside, staged]
  up_stats: h rows a/2-1..b/2+1 -> u = conv3(nearest x2) as one transposed conv -> mean, var of u rows a..b
  up_conv:  h rows a/2-2..b/2+2, u's mean, rstd, mask -> u rows a-1..b+1 -> y = conv3(silu(norm(u))),
            mean, var, and s = the first block's shortcut of u rows a..b (u is never stored)
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
from aldm.runtime.manifest import TILE_LAYOUT as LAYOUT  # slabs are (rows, W, D, C)
from aldm.runtime.tiled import ROWS, ROWS_IN, ROWS_LOW, head_spec, step_spec

AXIS = 0  # slabs are runs of rows of (H, C, W, D) arrays: a slab is a contiguous block


def supports_tiling(model: ALDM) -> bool:
    """The cut needs an upsample into the full-resolution level (ch_mult of length >= 2)."""
    return len(model.config.first_stage_config.ddconfig.ch_mult) >= 2


class HeadGraph(nn.Module):
    """post_quant_conv, conv_in, mid and every level above 0 except level 1's upsample."""

    def __init__(self, m: ALDM):
        super().__init__()
        self.vq = m.first_stage_model
        dec = self.vq.decoder
        self.ups = nn.ModuleDict({str(lv): FoldedUpsample(dec.up[lv].upsample.conv) for lv in range(2, len(dec.up))})

    def forward(self, z):
        """z (1, C, h, w, d) -> h in the slab layout (H/2, W/2, D/2, C')."""
        dec = self.vq.decoder
        h = dec.mid.block_1(dec.conv_in(self.vq.post_quant_conv(z)))
        for level in reversed(range(1, len(dec.up))):
            for block in dec.up[level].block:
                h = block(h)
            if level > 1:
                h = self.ups[str(level)](h)
        return _channels_last(h)


def _stats(y):
    """Per-channel mean and (population) variance of a slab (R, W, D, C), means staged axis by
    axis -> (1, C) each."""
    m = y.mean(dim=2, keepdim=True).mean(dim=1, keepdim=True).mean(dim=0, keepdim=True)
    d = y - m
    v = (d * d).mean(dim=2).mean(dim=1).mean(dim=0, keepdim=True)
    return m.reshape(1, -1), v


def _channels_first(x):
    """A slab (R, W, D, C) as the one-volume batch (1, C, R, W, D) the modules take (a transpose
    the engine folds into the layout its convolution reads: see the module docstring)."""
    return x.unsqueeze(0).permute(0, 4, 1, 2, 3)


def _channels_last(y):
    """(1, C, R, W, D) -> the slab layout (R, W, D, C)."""
    return y.permute(0, 2, 3, 4, 1).squeeze(0)


def _conv_rows(conv: nn.Conv3d, h):
    """The module's 3x3x3 convolution with no padding along the slab axis."""
    return F.conv3d(h, conv.weight, conv.bias, padding=(0, 1, 1))


def folded_kernel(conv: nn.Conv3d) -> torch.Tensor:
    """The (Ci, Co, 4, 4, 4) ConvTranspose3d kernel (stride 2) equal to nearest x2 then `conv`.

    Along one axis, output 2i+p of conv(nearest_x2(x)) sees upsampled rows 2i+p-1..2i+p+1, which
    are low-resolution rows (i-1, i, i) for p = 0 and (i, i, i+1) for p = 1: taps w0 on row i-1
    and w1+w2 on row i, or w0+w1 on row i and w2 on row i+1. A transposed convolution with stride
    2 and padding 1 computes out[o] = sum_i x[i] k[o + 1 - 2i], so k = [w2, w1+w2, w0+w1, w0].
    8 taps per output instead of 27 (3.4x fewer multiply-adds), the interleaving done by the
    engine, and the full-resolution upsampled copy never made."""
    def fold(k, ax):
        w0, w1, w2 = k.select(ax, 0), k.select(ax, 1), k.select(ax, 2)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=ax)

    return fold(fold(fold(conv.weight, 2), 3), 4).transpose(0, 1).contiguous()


class FoldedUpsample(nn.Module):
    """conv(nearest_x2(x)) as one stride-2 transposed convolution (folded_kernel)."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("kernel", folded_kernel(conv).detach())
            self.register_buffer("bias", conv.bias.detach().clone())

    def forward(self, x: torch.Tensor, context: int = 0) -> torch.Tensor:
        """context c > 0: x is a slab along axis 2, low-resolution rows a/2-c..b/2+c, and the
        result covers full-resolution rows a-c+1..b+c-1 (c = 1: exactly a..b)."""
        pad = 1 if context == 0 else context + 2
        return F.conv_transpose3d(x, self.kernel, self.bias, stride=2, padding=(pad, 1, 1))


def upsample_conv(conv: nn.Conv3d, x: torch.Tensor, context: int = 0) -> torch.Tensor:
    """FoldedUpsample in one call (for checks; graphs keep a FoldedUpsample module)."""
    return FoldedUpsample(conv)(x, context)


class UpStatsGraph(nn.Module):
    """The statistics of the upsampled activation u over a slab: u itself is never kept (at the
    official widths it is 128 channels, 2 GB), UpConvGraph computes it again, slab by slab."""

    def __init__(self, up: nn.Module):
        super().__init__()
        self.up = FoldedUpsample(up.conv)

    def forward(self, x):
        return _stats(_channels_last(self.up(_channels_first(x), context=1)))


class UpConvGraph(nn.Module):
    """u = upsample(h) on the slab's rows with one context row each side, then the first block's
    conv1(silu(norm1(u))) with u's statistics given, and the block's shortcut of u (its residual
    branch, nin_shortcut or u itself) for the slab's rows: the outputs y, mean, var, s."""

    def __init__(self, up: nn.Module, block: nn.Module):
        super().__init__()
        self.up = FoldedUpsample(up.conv)
        self.conv = NormConvGraph(block.norm1, block.conv1)
        self.shortcut = getattr(block, "nin_shortcut", None)

    def forward(self, x, mean, rstd, mask):
        u = _channels_last(self.up(_channels_first(x), context=2))  # rows a-1..b
        y, m, v = self.conv(u, mean, rstd, mask)
        r = u[1:-1]
        s = r if self.shortcut is None else _channels_last(self.shortcut(_channels_first(r)))
        return y, m, v, s


class NormConvGraph(nn.Module):
    """conv(silu(groupnorm(x))) with the norm's statistics given; optional residual shortcut.
    Slabs in and out are (rows, W, D, C); the normalisation runs in that layout, so the only
    transposes sit right at the convolutions."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv3d, shortcut: nn.Module | None = None,
                 residual: bool = False, stats: bool = True):
        super().__init__()
        self.norm, self.conv, self.shortcut = norm, conv, shortcut
        self.residual, self.stats = residual, stats

    def _act(self, x, mean, rstd, mask):
        h = (x - mean) * (rstd * self.norm.weight) + self.norm.bias  # channels last: broadcasts
        return F.silu(h) * mask.view(-1, 1, 1, 1)

    def forward(self, x, mean, rstd, mask, r=None):
        y = _channels_last(_conv_rows(self.conv, _channels_first(self._act(x, mean, rstd, mask))))
        if self.residual:
            y = y + (_channels_last(self.shortcut(_channels_first(r))) if self.shortcut is not None else r)
        if not self.stats:
            return y
        m, v = _stats(y)
        return y, m, v


def tail_program(model: ALDM, crop: tuple[int, int, int]) -> tuple[list[dict], list[nn.Module]]:
    """The full-resolution steps (manifest entries without files) and their graph modules.

    The upsampled activation u is the widest of the level (2x the level's channels at the official
    widths) and its only readers are the first block's conv1 (after a norm) and its shortcut, so
    it is never stored: one pass gathers its statistics (up_stats), the next computes it again per
    slab and feeds both readers (up_conv), writing the block's h0 and its shortcut branch x1."""
    dd = model.config.first_stage_config.ddconfig
    dec = model.first_stage_model.decoder
    g, eps = dd.num_groups, float(dec.norm_out.eps)
    ch_half = dd.ch * dd.ch_mult[1]
    first = dec.up[0].block[0]
    co = first.conv1.out_channels
    steps: list[dict] = [
        dict(kind="up_stats", input="h", output="u", in_channels=ch_half, channels=ch_half),
        dict(kind="up_conv", input="h", norm_input="u", output="h0", residual_output="x1",
             in_channels=ch_half, channels=co, residual_channels=first.conv2.out_channels,
             groups=g, eps=float(first.norm1.eps)),
        dict(kind="conv_res", input="h0", residual="x1", output="x1", in_channels=co, channels=co,
             residual_channels=first.conv2.out_channels, groups=g, eps=float(first.norm2.eps)),
    ]
    modules: list[nn.Module] = [UpStatsGraph(dec.up[1].upsample), UpConvGraph(dec.up[1].upsample, first),
                                NormConvGraph(first.norm2, first.conv2, None, residual=True)]
    cur, cur_ch, fresh = "x1", co, 1
    for block in list(dec.up[0].block)[1:]:
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
                          channels=co, residual_channels=cur_ch, groups=g, eps=float(block.norm2.eps)))
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
    z = torch.randn(1, *latent)
    export_fn(HeadGraph(model).eval(), head, out_dir / head.file, (z,), {"z": None})
    steps, modules = tail_program(model, crop)
    for i, (step, module) in enumerate(zip(steps, modules)):
        step["file"] = f"decoder_tile{i:02d}_{step['kind']}.onnx"
        spec = step_spec(step, i, crop)  # the I/O the runtime will feed: one definition
        export_fn(module.eval(), spec, out_dir / spec.file, *_example(spec, step))
    return {"axis": AXIS, "layout": LAYOUT, "head": head.file, "head_output": "h", "steps": steps}


def _example(spec: ComponentSpec, step: dict):
    """Example inputs (a slab of 8 output rows) and the dynamic rows axes, for the exporter."""
    n = 8
    if step["kind"].startswith("up"):
        low = torch.export.Dim("rows_low", min=6, max=4096)
        context = 1 if step["kind"] == "up_stats" else 2
        sizes = {ROWS_LOW: n // 2 + 2 * context, ROWS_IN: n + 2}
        dims = {"x": low, "mask": 2 * low - 6}  # up_conv: n/2 + 4 low rows give n + 2 rows of u
    else:
        rows_in = torch.export.Dim("rows_in", min=4, max=4096)
        sizes = {ROWS_IN: n + 2, ROWS: n}
        dims = {"x": rows_in, "mask": rows_in, "r": rows_in - 2}
    feeds, dynamic = [], {}
    for t in spec.inputs:
        shape = tuple(sizes.get(s, s) for s in t.shape)
        feeds.append(torch.ones(shape) if t.name in ("rstd", "mask") else torch.randn(shape))
        dynamic[t.name] = {AXIS: dims[t.name]} if t.name in dims else None
    return tuple(feeds), dynamic
