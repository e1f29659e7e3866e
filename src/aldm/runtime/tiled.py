"""Slab-wise decoding: the decoder's full-resolution level run over slabs of rows, with every
GroupNorm's statistics gathered over the whole volume (aldm.export.tiled holds the graphs and
the reasoning). The result equals the whole-graph decode to float32 rounding; peak memory is
the head's plus two full-resolution activations plus a few slabs.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from aldm.errors import ModelError
from aldm.runtime.manifest import ComponentSpec, ModelDir, TensorSpec
from aldm.runtime.runners import BindingRunner as Runner
from aldm.runtime.runners import return_freed_memory, trim

# Slabs of 8 rows by default. Bundled model, ov-cpu, 3 targets: 13.9 s and 1.34 GB peak (16 rows:
# 14.0 s, 1.40 GB; whole volumes: 14.9 s, 3.8 GB); the official widths' decoder: 23.5 s and 2.67 GB
# (16 rows: 3.0 GB; whole: 26.6 s, 4.1 GB). ONNX Runtime is slower in slabs than whole
# (docs/performance.md).
DEFAULT_TILE_ROWS = 8
RunnerFactory = Callable[[str, ComponentSpec], Runner]  # (file name in the folder, spec) -> runner


class Stats:
    """Per-channel mean/variance of slabs merged into per-group statistics, in float64."""

    def __init__(self):
        self.parts: list[tuple[float, np.ndarray, np.ndarray]] = []

    def add(self, count: int, mean: np.ndarray, var: np.ndarray) -> None:
        self.parts.append((float(count), mean.astype(np.float64).ravel(), var.astype(np.float64).ravel()))

    def channel_norm(self, groups: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(mean, 1/sqrt(var + eps)) of each channel's group, float32 per channel."""
        counts = np.array([p[0] for p in self.parts])[:, None]  # (S, 1)
        means = np.stack([p[1] for p in self.parts])  # (S, C)
        vars_ = np.stack([p[2] for p in self.parts])
        s, c = means.shape
        k = c // groups
        cnt = np.broadcast_to(counts, (s, c)).reshape(s, groups, k)
        m = means.reshape(s, groups, k)
        v = vars_.reshape(s, groups, k)
        n = cnt.sum(axis=(0, 2))
        mu = (cnt * m).sum(axis=(0, 2)) / n
        m2 = (cnt * (v + (m - mu[None, :, None]) ** 2)).sum(axis=(0, 2))
        rstd = 1.0 / np.sqrt(m2 / n + eps)
        return (np.repeat(mu, k).astype(np.float32), np.repeat(rstd, k).astype(np.float32))


# a slab graph's dynamic axes: input rows (with context), output rows, half-resolution input rows
ROWS_IN, ROWS, ROWS_LOW = "rows_in", "rows", "rows_low"
PAD = 2  # zero rows above and below every buffer: the up_conv step reads two half-resolution rows of context


def step_spec(step: Mapping, index: int, full: tuple[int, int, int]) -> ComponentSpec:
    """The I/O of one slab graph (one volume: the statistics are per volume; rows dynamic); the
    exporter writes the graph to it and the runtime feeds it. full = the full-resolution (H, W, D)."""
    _, w, d = full
    f32 = "float32"
    cin, co, kind = step["in_channels"], step["channels"], step["kind"]
    stats = (TensorSpec("y_mean", (1, co), f32), TensorSpec("y_var", (1, co), f32))
    norm = (TensorSpec("mean", (cin,), f32), TensorSpec("rstd", (cin,), f32), TensorSpec("mask", (ROWS_IN,), f32))
    y = TensorSpec("y", (ROWS, w, d, co), f32)
    if kind == "up_stats":
        ins, outs = (TensorSpec("x", (ROWS_LOW, w // 2, d // 2, cin), f32),), stats
    elif kind == "up_conv":
        ins = (TensorSpec("x", (ROWS_LOW, w // 2, d // 2, cin), f32),) + norm
        outs = (y,) + stats + (TensorSpec("s", (ROWS, w, d, step["residual_channels"]), f32),)
    else:
        ins = (TensorSpec("x", (ROWS_IN, w, d, cin), f32),) + norm
        if kind == "conv_res":
            ins += (TensorSpec("r", (ROWS, w, d, step["residual_channels"]), f32),)
        outs = (y,) if kind == "out" else (y,) + stats
    return ComponentSpec(f"decoder slab {index} ({kind})", step["file"], ins, outs)


def head_spec(config: Mapping, latent: tuple[int, ...], full: tuple[int, int, int],
              file: str = "decoder_head.onnx") -> ComponentSpec:
    """I/O of the decoder's head: one latent z -> h, the half-resolution input of the last
    upsample, in the slab layout (H/2, W/2, D/2, C). config: the manifest's `config`."""
    dd = config["first_stage_config"]["ddconfig"]
    h, w, d = (s // 2 for s in full)
    return ComponentSpec("decoder head", file, (TensorSpec("z", (1, *latent), "float32"),),
                         (TensorSpec("h", (h, w, d, dd["ch"] * dd["ch_mult"][1]), "float32"),))


def slab_rows(height: int, rows: int) -> int:
    """The largest even divisor of `height` not above `rows` (every slab the same shape, so an
    engine compiles one shape; even so the half-resolution input splits evenly)."""
    best = 4  # the smallest slab the graphs take (the upsample's input: 2 rows + 2 context)
    for r in range(4, max(4, min(rows, height)) + 1, 2):
        if height % r == 0:
            best = r
    return best


def tiled_decoder(model: ModelDir, backend: str, threads: int | None, rows: int) -> "TiledDecoder | None":
    """The slab-wise decoder for a resolved backend name (e.g. "ort-cpu"), or None where it does
    not apply: a folder without the decoder cut, a GPU backend or a reduced precision."""
    from aldm.runtime.backends import extra_graph_runners

    factory = extra_graph_runners(model, backend, threads)
    if not model.manifest.decoder_tiling or factory is None:
        return None
    return TiledDecoder(model, factory, rows)


class TiledDecoder:
    """z (B, C, h, w, d), unscaled -> volumes (B, 1, H, W, D), one volume at a time.

    Every activation is a host buffer in the slab layout with PAD zero rows above and below,
    (H + 2 PAD, W, D, C): a slab's input with its context rows, its residual and its output are then
    contiguous views that the engine reads and writes in place. The zero rows stand for the
    padding outside the volume (the graphs' `mask` zeroes them after the activation, as the whole
    convolution's zero padding does; they are zero so that 0 * x stays 0)."""

    def __init__(self, model: ModelDir, make_runner: RunnerFactory, rows: int = 16):
        t = model.manifest.decoder_tiling
        if not t:
            raise ModelError(f"{model.path} has no decoder cut for slab-wise decoding "
                             f"(exported before aldm wrote one: re-export it with `aldm export`)")
        self.model, self.tiling = model, t
        self.full = tuple(model.manifest.preprocessing.crop_size)
        self.rows = slab_rows(self.full[0], rows)
        head = head_spec(model.manifest.config, model.manifest.latent_shape, self.full, t["head"])
        self.head = make_runner(t["head"], head)
        self.steps = [(st, make_runner(st["file"], step_spec(st, i, self.full))) for i, st in enumerate(t["steps"])]
        self.last_use = {}  # buffer -> index of the last step that reads it
        for i, st in enumerate(t["steps"]):
            for key in ("input", "residual"):
                if key in st:
                    self.last_use[st[key]] = i

    def runners(self) -> list[Runner]:
        return [self.head] + [r for _, r in self.steps]

    def deactivate(self) -> None:
        for r in self.runners():
            r.deactivate()

    def __call__(self, z: np.ndarray) -> np.ndarray:
        out = np.concatenate([self.decode_one(z[i : i + 1]) for i in range(len(z))])
        return_freed_memory()
        return out

    def decode_one(self, z: np.ndarray) -> np.ndarray:
        """z (1, C, h, w, d) -> (1, 1, H, W, D). Buffers hold row r at index r + PAD."""
        H, W, D = self.full
        s, P = self.rows, PAD
        bufs = {"h": _padded(self.head.spec.outputs[0].shape)}
        self.head.infer({"z": z}, out={"h": bufs["h"][P:-P]})
        trim(self.head, give_back=False)
        stats: dict[str, Stats] = {}
        for i, (st, runner) in enumerate(self.steps):
            kind, src = st["kind"], bufs[st["input"]]
            outs = {}  # output name -> buffer, for the steps that write volumes
            if kind != "up_stats":
                outs["y"] = _reuse(bufs.get(st["output"]), (H, W, D, st["channels"]))
            if kind == "up_conv":
                outs["s"] = _reuse(bufs.get(st["residual_output"]), (H, W, D, st["residual_channels"]))
            # a block that keeps its width writes its output over its residual input, slab by
            # slab; an engine must not write where it reads, so those slabs come back and are copied
            aliased, scratch = st.get("residual") == st["output"], None
            new_stats = Stats() if kind != "out" else None
            if kind != "up_stats":
                mean, rstd = stats[st.get("norm_input", st["input"])].channel_norm(st["groups"], st["eps"])
            for a in range(0, H, s):
                b = a + s  # this slab's output rows a..b-1
                if kind == "up_stats":  # half-resolution rows a/2-1 .. b/2 (one of context each side)
                    feeds = {"x": src[a // 2 - 1 + P : b // 2 + 1 + P]}
                else:
                    if kind == "up_conv":  # two rows of context: u is computed for rows a-1..b
                        x = src[a // 2 - 2 + P : b // 2 + 2 + P]
                    else:
                        x = src[a - 1 + P : b + 1 + P]
                    rows = np.arange(a - 1, b + 1)
                    feeds = {"x": x, "mean": mean, "rstd": rstd,
                             "mask": ((rows >= 0) & (rows < H)).astype(np.float32)}
                    if kind == "conv_res":
                        feeds["r"] = bufs[st["residual"]][a + P : b + P]
                into = {k: v[a + P : b + P] for k, v in outs.items()}
                if aliased:
                    scratch = np.empty_like(into["y"]) if scratch is None else scratch
                    res = runner.infer(feeds, out={"y": scratch})
                    into["y"][...] = scratch
                else:
                    res = runner.infer(feeds, out=into)
                if new_stats is not None:
                    new_stats.add(s * W * D, res["y_mean"], res["y_var"])
            trim(runner, give_back=False)  # engines keep a graph's working memory while it is loaded
            if "y" in outs:
                bufs[st["output"]] = outs["y"]
            if "s" in outs:
                bufs[st["residual_output"]] = outs["s"]
            if new_stats is not None:
                stats[st["output"]] = new_stats
            del src, outs, feeds, into, res, scratch  # no view may keep a freed buffer alive
            for name, last in self.last_use.items():  # free what no later step reads
                if last == i and name in bufs and name not in (st["output"], st.get("residual_output")):
                    del bufs[name]
        y = bufs[self.tiling["steps"][-1]["output"]][P:-P]  # (H, W, D, 1)
        return y.reshape(1, 1, H, W, D)


def _reuse(buf: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """`buf` if it has the padded shape, else a new padded buffer."""
    if buf is not None and buf.shape[1:] == shape[1:]:
        return buf
    return _padded(shape)


def _padded(shape: tuple[int, ...]) -> np.ndarray:
    """A slab-layout buffer (rows, W, D, C) with PAD zero rows above and below."""
    buf = np.empty((shape[0] + 2 * PAD, *shape[1:]), np.float32)
    buf[:PAD] = 0.0
    buf[-PAD:] = 0.0
    return buf
