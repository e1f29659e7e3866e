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
from aldm.runtime.runners import Runner

# 0: whole-volume decoding by default. On the bundled model it is the faster (ov-cpu 4.5 s vs 6.5 s
# in slabs of 16 rows; ort-cpu 9.3 vs 9.6 s) and slabs save memory only on ONNX Runtime
# (docs/performance.md); --tile-rows N is for models whose whole decode does not fit.
DEFAULT_TILE_ROWS = 0
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


ROWS_IN, ROWS = "rows_in", "rows"  # a slab graph's dynamic axes: input rows (with context), output rows


def step_spec(step: Mapping, index: int, full: tuple[int, int, int]) -> ComponentSpec:
    """The I/O of one slab graph (batch 1: the statistics are per volume; rows dynamic); the
    exporter writes the graph to it and the runtime feeds it. full = the full-resolution (H, W, D)."""
    _, w, d = full
    f32 = "float32"
    cin, co = step["in_channels"], step["channels"]
    if step["kind"] == "up":
        ins = (TensorSpec("x", (1, cin, ROWS_IN, w // 2, d // 2), f32),)
    else:
        ins = (TensorSpec("x", (1, cin, ROWS_IN, w, d), f32), TensorSpec("mean", (cin,), f32),
               TensorSpec("rstd", (cin,), f32), TensorSpec("mask", (ROWS_IN,), f32))
        if step["kind"] == "conv_res":
            ins += (TensorSpec("r", (1, step["residual_channels"], ROWS, w, d), f32),)
    outs = (TensorSpec("y", (1, co, ROWS, w, d), f32),)
    if step["kind"] != "out":
        outs += (TensorSpec("y_mean", (1, co), f32), TensorSpec("y_var", (1, co), f32))
    return ComponentSpec(f"decoder slab {index} ({step['kind']})", step["file"], ins, outs)


def head_spec(config: Mapping, latent: tuple[int, ...], full: tuple[int, int, int],
              file: str = "decoder_head.onnx") -> ComponentSpec:
    """I/O of the decoder's head: latent z -> h, the half-resolution input of the last upsample.
    config: the model's LDMConfig as a dict (the manifest's `config`)."""
    dd = config["first_stage_config"]["ddconfig"]
    half = tuple(s // 2 for s in full)
    return ComponentSpec("decoder head", file, (TensorSpec("z", ("batch", *latent), "float32"),),
                         (TensorSpec("h", ("batch", dd["ch"] * dd["ch_mult"][1], *half), "float32"),))


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
    """z (B, C, h, w, d), unscaled -> volumes (B, 1, H, W, D), one volume at a time."""

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

    def runners(self) -> list[Runner]:
        return [self.head] + [r for _, r in self.steps]

    def deactivate(self) -> None:
        for r in self.runners():
            r.deactivate()

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.concatenate([self.decode_one(z[i : i + 1]) for i in range(len(z))])

    def decode_one(self, z: np.ndarray) -> np.ndarray:
        H, W, D = self.full
        s = self.rows
        bufs: dict[str, np.ndarray] = {"h": self.head.infer({"z": z})["h"]}
        self.head.deactivate()
        stats: dict[str, Stats] = {}
        last_use = {}
        for i, (st, _) in enumerate(self.steps):
            for key in ("input", "residual"):
                if key in st:
                    last_use[st[key]] = i
        for i, (st, runner) in enumerate(self.steps):
            co = st["channels"]
            src = bufs[st["input"]]
            out = bufs.get(st["output"])
            if out is None or out.shape[1] != co:
                out = np.empty((1, co, H, W, D), np.float32)
            new_stats = Stats() if st["kind"] != "out" else None
            if st["kind"] != "up":
                mean, rstd = stats[st["input"]].channel_norm(st["groups"], st["eps"])
            for a in range(0, H, s):
                b = a + s
                if st["kind"] == "up":
                    feeds = {"x": _rows(src, a // 2 - 1, b // 2 + 1)}
                else:
                    feeds = {"x": _rows(src, a - 1, b + 1), "mean": mean, "rstd": rstd,
                             "mask": ((np.arange(a - 1, b + 1) >= 0) & (np.arange(a - 1, b + 1) < H)).astype(np.float32)}
                    if st["kind"] == "conv_res":
                        feeds["r"] = np.ascontiguousarray(bufs[st["residual"]][:, :, a:b])
                res = runner.infer(feeds)
                out[:, :, a:b] = res["y"]
                if new_stats is not None:
                    new_stats.add(s * W * D, res["y_mean"], res["y_var"])
            runner.deactivate()  # engines keep a graph's working memory while it is loaded
            bufs[st["output"]] = out
            if new_stats is not None:
                stats[st["output"]] = new_stats
            for name, last in last_use.items():  # free what no later step reads
                if last == i and name in bufs and name != st["output"]:
                    del bufs[name]
        return bufs[self.tiling["steps"][-1]["output"]]


def _rows(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows a..b-1 of axis 2 as a contiguous array, zero rows where they fall outside."""
    n = x.shape[2]
    if a >= 0 and b <= n:
        return np.ascontiguousarray(x[:, :, a:b])
    out = np.zeros(x.shape[:2] + (b - a,) + x.shape[3:], np.float32)
    lo, hi = max(a, 0), min(b, n)
    out[:, :, lo - a : hi - a] = x[:, :, lo:hi]
    return out
