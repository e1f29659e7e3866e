"""`aldm check`: every component on every available backend against PyTorch, on seeded inputs.

Comparisons are data: a tolerance per component, one result line per (component, backend),
reports that are truthy only when everything passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from aldm.errors import BackendError
from aldm.models import ALDM, LDMConfig, load_official
from aldm.runtime.backends import make_runners
from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds

DEFAULT_RTOL = 1e-4  # max |backend - torch| / max |torch|, fp32


@dataclass(frozen=True)
class Result:
    component: str
    backend: str
    max_abs: float
    max_rel: float
    rtol: float
    note: str = ""

    def __bool__(self) -> bool:
        return self.max_rel <= self.rtol

    def __str__(self) -> str:
        verdict = "PASS" if self else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return (f"{verdict}  {self.component:<8} {self.backend:<10} max_abs={self.max_abs:.3e} "
                f"max_rel={self.max_rel:.3e} rtol={self.rtol:.0e}{note}")


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results) and all(self.results)

    def __str__(self) -> str:
        lines = [str(r) for r in self.results] + [f"SKIP  {s}" for s in self.skipped]
        return "\n".join(lines)


class TorchRunner:
    """The PyTorch model behind the runner protocol (the reference every backend is held to)."""

    def __init__(self, model: ALDM, component: str, device: str = "cpu"):
        self.model, self.component, self.name = model, component, f"torch-{device}"
        self.device = torch.device(device)

    def activate(self) -> None:
        self.model.to(self.device)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        f = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        m = self.model
        with torch.inference_mode():
            out = {"encoder": lambda: {"z_q": m.encode(f["x"])},
                   "spade": lambda: {"z_tgt": m.spade(f["z"], f["y"])},
                   "unet": lambda: {"eps": m.unet(f["x_t"], f["t"], f["c_concat"], f["y"])},
                   "decoder": lambda: {"x_rec": m.decode(f["z"])}}[self.component]()
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def deactivate(self) -> None:
        pass


def reference_model(model_dir: ModelDir, checkpoint: str | None = None) -> ALDM:
    """The PyTorch model an export came from: `checkpoint`, else the manifest's recorded source."""
    from aldm.errors import UsageError

    m = model_dir.manifest
    path = checkpoint or m.source.get("ldm_ckpt")
    if not path:
        raise UsageError("no reference checkpoint: pass --reference CKPT")
    cfg = LDMConfig.from_dict(m.config) if m.config else None
    return load_official(path, m.source.get("vqgan_ckpt"), config=cfg, ema=m.source.get("ema", True))


def available_backends() -> list[str]:
    from aldm.runtime.backends import ort_cuda_available

    return ["ort-cpu"] + (["ort-cuda"] if ort_cuda_available() else [])


def check_model(model_dir: ModelDir, reference: ALDM, *, backends: Sequence[str] | None = None,
                batch: int = 2, seed: int = 0, rtol: Mapping[str, float] | None = None) -> Report:
    report = Report()
    num_classes = reference.config.first_stage_config.num_classes
    feeds = {c: sample_feeds(model_dir.component(c), batch, seed + i, num_classes,
                             model_dir.manifest.schedule.timesteps) for i, c in enumerate(COMPONENTS)}
    expected = {c: TorchRunner(reference, c).infer(feeds[c]) for c in COMPONENTS}
    for backend in backends or available_backends():
        try:
            runners = make_runners(model_dir, backend)
        except BackendError as exc:
            report.skipped.append(f"{backend}: {exc}")
            continue
        for c in COMPONENTS:
            out_name = model_dir.component(c).outputs[0].name
            try:
                got = runners[c].infer(feeds[c])[out_name]
            except BackendError as exc:
                report.skipped.append(f"{c} on {backend}: {exc}")
                continue
            ref = expected[c][out_name]
            report.results.append(compare(c, backend, got, ref, (rtol or {}).get(c, DEFAULT_RTOL)))
        for r in runners.values():
            r.deactivate()
    return report


def compare(component: str, backend: str, got: np.ndarray, ref: np.ndarray, rtol: float) -> Result:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max())
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-30)
    note = ""
    if component == "encoder" and max_rel > rtol:
        flipped = int((diff.max(axis=1) > rtol * np.abs(ref).max()).sum())
        note = f"{flipped} latent positions chose another codebook entry (near-ties)"
    return Result(component, backend, max_abs, max_rel, rtol, note)
