"""Record every component's inputs while the FP32 pipeline translates real volumes.

UNet inputs are recorded at every sampling step, as TensorRT's diffusion demo calibrates per
step: the activations at t = 981 and t = 1 differ by orders of magnitude.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from aldm.atomic import atomic_path, clean_partials
from aldm.nifti import load_volume
from aldm.preprocess import preprocess
from aldm.runtime.manifest import COMPONENTS, ModelDir
from aldm.runtime.pipeline import Pipeline
from aldm.runtime.runners import Runner


class RecordingRunner:
    """Wraps a runner; every call's feeds are appended to a list (the runner protocol holds)."""

    def __init__(self, inner: Runner, sink: list[dict[str, np.ndarray]]):
        self.inner, self.sink, self.name = inner, sink, inner.name

    def activate(self) -> None:
        self.inner.activate()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sink.append({k: np.array(v) for k, v in feeds.items()})
        return self.inner.infer(feeds)

    def deactivate(self) -> None:
        self.inner.deactivate()


def collect(model_dir: str | Path, sources: Sequence[str | Path], out: str | Path, *,
            targets: Sequence[str] | None = None, steps: int | None = None, seed: int = 0,
            say: Callable[[str], None] = print) -> dict[str, int]:
    """Translate each source with the FP32 ORT pipeline, saving every component call's inputs as
    `out/<component>_<n>.npz` (each written atomically). Returns the number of samples (batch rows) per component."""
    from aldm.runtime.backends import make_runners

    md = ModelDir(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    sinks: dict[str, list] = {c: [] for c in COMPONENTS}
    runners = {c: RecordingRunner(r, sinks[c]) for c, r in make_runners(md, "ort-cpu").items() if c in sinks}
    pipe = Pipeline(md, runners, step_graph="off")  # the UNet's own calls are what calibration records
    targets = list(targets or md.manifest.modalities)
    counts = {c: 0 for c in COMPONENTS}
    for i, src in enumerate(sources):
        say(f"calibration pass {i + 1}/{len(sources)}: {Path(src).name}")
        vol = load_volume(src)
        x = preprocess(vol.data, vol.affine, md.manifest.preprocessing).x
        pipe.translate(x, targets, steps=steps, seed=seed + i)
        for c, calls in sinks.items():
            for feeds in calls:
                with atomic_path(out / f"{c}_{counts[c]:05d}.npz") as tmp:
                    np.savez(tmp, **feeds)
                counts[c] += 1
            calls.clear()
    return counts


def load_samples(folder: str | Path, component: str) -> list[dict[str, np.ndarray]]:
    """The recorded calls of one component, split into single-row feeds (batch 1)."""
    rows = []
    for f in sorted(Path(folder).glob(f"{component}_*.npz")):
        with np.load(f) as z:
            feeds = {k: z[k] for k in z.files}
        n = len(next(iter(feeds.values())))
        rows += [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]
    return rows
