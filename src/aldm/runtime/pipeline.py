"""Translation pipeline over four runners: encode once, SPADE per target, one batched UNet call
per step for all targets (through the sampler-step graph, UNet and DDIM update in one call, where
the folder has it: `step_runner`), decode per target: slab by slab when the model folder has the
decoder cut and the backend runs it (aldm.runtime.tiled: bounded memory, same result), else whole
volumes in chunks of `decode_batch`.

Works on preprocessed arrays (N, 1, H, W, D) in the model's grid; NIfTI handling lives in
`aldm.io`. Needs no torch: the runners are ONNX Runtime or TensorRT (or, for checks, torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from aldm.errors import InputError, UsageError
from aldm.runtime import sampler as S
from aldm.runtime.manifest import STEP_GRAPH, ComponentSpec, ModelDir
from aldm.runtime.runners import Runner, step_graph_loop, trim
from aldm.runtime.tiled import DEFAULT_TILE_ROWS, TiledDecoder, tiled_decoder


@dataclass
class Translation:
    volumes: dict[str, np.ndarray]  # target -> (N, 1, H, W, D) float32, model intensity domain
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    steps: int = 0
    eta: float = 0.0
    strength: float = 1.0


def spade_class_spec(model: ModelDir, k: int) -> ComponentSpec:
    """I/O of the per-class MS-SPADE graph of class k: the all-class graph's, without `y`."""
    spec = model.component("spade")
    return ComponentSpec(f"spade (class {k})", model.manifest.spade_per_class[k], spec.inputs[:1], spec.outputs)


def spade_by_class(model: ModelDir, runners: Sequence[Runner], z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row of z through the per-class graph of its class y[row] (rows grouped by class)."""
    out = np.empty_like(z)
    name = model.component("spade").outputs[0].name
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        out[rows] = runners[int(k)].infer({"z": np.ascontiguousarray(z[rows])})[name]
    return out


STEP_GRAPH_MODES = ("auto", "on", "off")
# Backends on which `auto` runs DDIM through the step graph's runner call by call (a runner with
# its own device loop, StepLoopRunner.ddim_loop, is always used). On the CPU the step graph is no
# slower than the numpy loop (the update is 0.6 ms of a 300-1250 ms step; scripts/bench_step_graph.py,
# docs/performance.md) and gives the same bits on ONNX Runtime (7e-7 relative on OpenVINO).
STEP_GRAPH_AUTO = frozenset({"ort-cpu", "ov-cpu"})


def step_runner(runners: Mapping[str, Runner], mode: str = "auto") -> Runner | None:
    """The runner DDIM sampling goes through, or None for the numpy loop around the UNet.
    mode: auto (a device loop, or a backend in STEP_GRAPH_AUTO), on (whenever the folder has the
    graph at this precision; a UsageError otherwise), off (the numpy loop)."""
    if mode not in STEP_GRAPH_MODES:
        raise UsageError(f"step_graph must be one of {', '.join(STEP_GRAPH_MODES)}, got {mode!r}")
    runner = runners.get(STEP_GRAPH)
    if mode == "off":
        return None
    if mode == "on":
        if runner is None:
            raise UsageError("this model folder has no sampler-step graph for this backend and precision "
                             "(add it with `aldm add-step-graph MODEL_DIR`)")
        return runner
    if runner is not None and (hasattr(runner, "ddim_loop") or runner.name.split("/")[0] in STEP_GRAPH_AUTO):
        return runner
    return None


class Pipeline:
    def __init__(self, model: ModelDir, runners: Mapping[str, Runner], *, decode_batch: int = 1,
                 tiles: "TiledDecoder | None" = None, spade_classes: Sequence[Runner] | None = None,
                 step_graph: str = "auto"):
        self.model = model
        self.runners = dict(runners)
        self.decode_batch = max(1, int(decode_batch))
        self.tiles = tiles
        self.spade_classes = list(spade_classes) if spade_classes else None
        self.step = step_runner(self.runners, step_graph)  # None: the numpy DDIM loop
        self._schedule = model.schedule()

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "ort-cpu", threads: int | None = None,
             precision: str | None = None, verify: bool = True, decode_batch: int = 1,
             tile_rows: int = DEFAULT_TILE_ROWS, step_graph: str = "auto") -> "Pipeline":
        """tile_rows: rows per slab of the slab-wise decoder (0: decode whole volumes). Used when
        the folder has the decoder cut and the decoder runs FP32 on a CPU backend.
        step_graph: auto, on or off: whether DDIM runs through the folder's sampler-step graph
        (see `step_runner`); DDPM always runs the numpy loop."""
        from aldm.runtime.backends import extra_graph_runners, make_runners

        model = ModelDir(path, verify=verify)
        runners = make_runners(model, backend, threads=threads, precision=precision)
        tiles = tiled_decoder(model, runners["decoder"].name, threads, tile_rows) if tile_rows else None
        spade_classes = None
        factory = extra_graph_runners(model, runners["spade"].name, threads)
        if model.manifest.spade_per_class and factory is not None:
            spade_classes = [factory(f, spade_class_spec(model, k))
                             for k, f in enumerate(model.manifest.spade_per_class)]
        return cls(model, runners, decode_batch=decode_batch, tiles=tiles, spade_classes=spade_classes,
                   step_graph=step_graph)

    @property
    def manifest(self):
        return self.model.manifest

    @property
    def backend(self) -> str:
        return self.runners["unet"].name

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()
        if self.tiles is not None:
            self.tiles.deactivate()
        for r in self.spade_classes or ():
            r.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ pieces
    def classes(self, targets: Sequence[str | int]) -> np.ndarray:
        """Target names (or class indices) -> int64 classes, validated."""
        mods = self.manifest.modalities
        out = []
        for t in targets:
            if isinstance(t, (int, np.integer)) and 0 <= int(t) < len(mods):
                out.append(int(t))
            elif isinstance(t, str) and t.lower() in mods:
                out.append(mods.index(t.lower()))
            else:
                raise UsageError(f"unknown target {t!r}; choose from {', '.join(mods)}")
        if not out:
            raise UsageError("no target modality given")
        if len(set(out)) != len(out):
            raise UsageError(f"target listed twice: {', '.join(map(str, targets))}")
        return np.asarray(out, np.int64)

    def _run(self, component: str, **feeds: np.ndarray) -> np.ndarray:
        out = self.runners[component].infer(feeds)
        return out[self.model.component(component).outputs[0].name]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, H, W, D) float32 in the model intensity domain -> quantized latent (N, C, h, w, d)."""
        if isinstance(x, np.ndarray) and x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError("input volume contains NaN or Inf")
        return self._run("encoder", x=x)

    def condition(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """c_concat = scale * cat[z, spade(z, y)] (B, 2C, h, w, d); spade(z, y) clamped to the
        manifest's latent_bounds when it has them."""
        z_tgt = self.spade(z, y)
        if self.manifest.latent_bounds is not None:
            lo, hi = (np.asarray(b, np.float32).reshape(1, -1, 1, 1, 1) for b in self.manifest.latent_bounds)
            z_tgt = np.clip(z_tgt, lo, hi)
        return (np.concatenate([z, z_tgt], axis=1) * np.float32(self.manifest.scale_factor)).astype(np.float32)

    def spade(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """MS-SPADE of each row for its class: the per-class graphs where the pipeline has them
        (rows grouped by class), else the all-class graph."""
        if self.spade_classes is None:
            return self._run("spade", z=z, y=y)
        return spade_by_class(self.model, self.spade_classes, z, y)

    def denoiser(self, c_concat: np.ndarray, y: np.ndarray) -> S.Denoiser:
        return lambda x, t: self._run("unet", x_t=x, t=t, c_concat=c_concat, y=y)

    def sample(self, c_concat: np.ndarray, y: np.ndarray, noise: S.Noise, *, steps: int | None = None,
               eta: float | None = None, strength: float | None = None, sampler: str | None = None,
               official_rng: bool = True, callback: S.Callback = None) -> np.ndarray:
        """Draw x_T from `noise` (strength 1, the official sampler), or noise the target-like SPADE
        latent to the step round(strength * steps) (strength < 1), then run the sampler down to
        the clean latent (still scaled). Strength 0 runs no step: the SPADE latent is the result."""
        defaults = self.manifest.sampler
        sampler = sampler or defaults.name
        strength = defaults.strength if strength is None else float(strength)
        channels = self.manifest.latent_shape[0]
        if strength == 0:  # no diffusion: the (scaled) MS-SPADE latent is the clean latent
            if (sampler or defaults.name) != "ddim":
                raise UsageError("strength < 1 needs the ddim sampler")
            return c_concat[:, channels:].copy()
        shape = (c_concat.shape[0], channels) + c_concat.shape[2:]
        eps_fn = self.denoiser(c_concat, y)
        if sampler == "ddim":
            sched = S.ddim_schedule(self._schedule["alphas_cumprod"], steps or defaults.steps,
                                    defaults.eta if eta is None else eta)
            if strength < 1:
                sched = S.ddim_truncate(sched, strength)
                x_T = S.noised_start(c_concat[:, channels:], sched, noise)
            else:
                x_T = noise(shape)
            z0 = self.ddim(c_concat, y, x_T, sched, noise, official_rng=official_rng, callback=callback)
        elif sampler == "ddpm":
            if strength < 1:
                raise UsageError("strength < 1 needs the ddim sampler")
            z0 = S.ddpm_sample(eps_fn, noise(shape), self._schedule, noise, callback=callback)
        else:
            raise UsageError(f"unknown sampler {sampler!r} (ddim or ddpm)")
        return z0

    def ddim(self, c_concat: np.ndarray, y: np.ndarray, x_T: np.ndarray, schedule: S.DDIMSchedule,
             noise: S.Noise, *, official_rng: bool = True, callback: S.Callback = None) -> np.ndarray:
        """The DDIM loop: the step runner's own device loop where it has one, else the step graph
        called once per step, else (no step runner) the numpy update around the UNet."""
        if self.step is None:
            return S.ddim_sample(self.denoiser(c_concat, y), x_T, schedule, noise, official_rng=official_rng,
                                 callback=callback)
        return step_graph_loop(self.step, x_T, c_concat, y, schedule, noise, official_rng=official_rng,
                               callback=callback)

    def decode(self, z0: np.ndarray) -> np.ndarray:
        """(B, C, h, w, d) diffusion output -> volumes (B, 1, H, W, D), `decode_batch` at a time."""
        z = (z0 / np.float32(self.manifest.scale_factor)).astype(np.float32)
        if self.tiles is not None:
            return self.tiles(z)
        parts = [self._run("decoder", z=z[i : i + self.decode_batch])
                 for i in range(0, len(z), self.decode_batch)]
        return np.concatenate(parts)

    # ------------------------------------------------------------------------------ whole job
    def translate(self, x: np.ndarray, targets: Sequence[str | int], *, steps: int | None = None,
                  eta: float | None = None, strength: float | None = None, seed: int | None = None,
                  noise: S.Noise | None = None,
                  sampler: str | None = None, official_rng: bool = True,
                  callback: S.Callback = None,
                  on_stage: Callable[[str], None] | None = None) -> Translation:
        """Translate N preprocessed sources into every target; rows are target-major."""
        classes = self.classes(targets)
        names = [self.manifest.modalities[c] for c in classes]
        if noise is None:
            noise = S.gaussian_noise(np.random.default_rng(seed))
        timings: dict[str, float] = {}

        def stage(name: str, fn, *args):
            if on_stage:
                on_stage(name)
            t0 = time.perf_counter()
            out = fn(*args)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            return out

        z = stage("encode", self.encode, x)  # (N, C, h, w, d)
        if self.tiles is not None:  # memory first: no engine keeps its working memory past its stage
            trim(self.runners["encoder"])
        n = z.shape[0]
        y = np.repeat(classes, n)  # (T*N,) target-major
        c = stage("spade", self.condition, np.concatenate([z] * len(classes)), y)
        if self.tiles is not None:
            for r in [self.runners["spade"]] + list(self.spade_classes or ()):
                trim(r)
        z0 = stage("sample", lambda: self.sample(c, y, noise, steps=steps, eta=eta, strength=strength,
                                                 sampler=sampler,
                                                 official_rng=official_rng, callback=callback))
        vol = stage("decode", self.decode, z0)
        d = self.manifest.sampler
        ran = self.manifest.schedule.timesteps if (sampler or d.name) == "ddpm" else steps or d.steps
        return Translation(
            volumes={name: vol[k * n : (k + 1) * n] for k, name in enumerate(names)},
            timings=timings, steps=ran, eta=d.eta if eta is None else eta,
            strength=d.strength if strength is None else float(strength))
