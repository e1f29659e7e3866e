"""Comparisons as data: a tolerance per (precision, component), one result line per output, and
the end-to-end agreement of a reduced-precision translation with FP32 as a result (PSNR; the run
that measures it is aldm.export.e2e_check). No torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # max |got - ref| / max |ref| (on the encoder: over positions with the same code)
    min_code_agreement: float | None = None  # encoder: share of latent positions with the same code
    # Encoder: a different code counts as agreeing where the reference's two nearest codes are
    # closer than this (distance gap / |h|^2): a tie at the precision's rounding, which two
    # correct implementations may break either way.
    tie_gap: float = 0.0


def _uniform(rtol: float, codes: float | None, tie_gap: float = 0.0) -> dict[str, Tolerance]:
    """The same rtol for every component (the step graph's x_prev is held to the UNet's)."""
    return {c: Tolerance(rtol, codes if c == "encoder" else None, tie_gap) for c in COMPONENTS + (STEP_GRAPH,)}


TOLERANCES = {
    # Trained codebooks have exact float32 ties: on the default model 0.01 % of positions have a
    # top-2 gap under 1.5e-7, and ONNX Runtime breaks 4 of 124,416 of them the other way (gaps
    # 9e-10..2.1e-7); PyTorch FP32 vs FP64 agree on the rest. 1e-6 = ~16 float32 roundoffs.
    "fp32": _uniform(1e-4, 1.0, tie_gap=1e-6),
    # FP16 activations carry ~3 significant digits; the encoder may flip near-tie codes.
    "fp16": _uniform(3e-2, 0.98),
    # INT8 per-tensor activations: a few percent per layer, compounding through a UNet.
    "int8": _uniform(0.5, 0.5),
}
E2E_MIN_PSNR = {"fp16": 45.0, "int8": 35.0}  # dB, reduced precision vs FP32, whole translation


@dataclass(frozen=True)
class Result:
    component: str
    backend: str
    max_abs: float
    max_rel: float
    tolerance: Tolerance
    code_agreement: float | None = None
    note: str = ""
    ties: int = 0  # encoder: positions whose code differs at a reference tie (counted as agreeing)

    def __bool__(self) -> bool:
        ok = self.max_rel <= self.tolerance.rtol
        if self.tolerance.min_code_agreement is not None and self.code_agreement is not None:
            ok = ok and self.code_agreement >= self.tolerance.min_code_agreement
        return ok

    def __str__(self) -> str:
        codes = f" codes={100 * self.code_agreement:.2f}%" if self.code_agreement is not None else ""
        codes += f" ({self.ties} ties)" if self.ties else ""
        note = f"  ({self.note})" if self.note else ""
        return (f"{'PASS' if self else 'FAIL'}  {self.component:<8} {self.backend:<16} "
                f"max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} rtol={self.tolerance.rtol:.0e}"
                f"{codes}{note}")


@dataclass
class Report:
    results: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    inputs: str = "random"  # what the components were fed: seeded random or recorded real inputs

    def __bool__(self) -> bool:
        return bool(self.results) and all(self.results)

    def __str__(self) -> str:
        head = [f"inputs: {self.inputs}"]
        return "\n".join(head + [str(r) for r in self.results] + [f"SKIP  {s}" for s in self.skipped])


def code_gaps(h: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(B, h, w, d): gap between the squared distances to the two nearest codes of each position
    of the pre-quantization latent h (B, C, h, w, d), relative to |h|^2 (float64)."""
    e = codebook.astype(np.float64)
    out = []
    for row in h:  # one batch row at a time: the distance table is positions x codes in float64
        v = np.moveaxis(row.astype(np.float64), 0, -1)
        d = (v * v).sum(-1, keepdims=True) - 2 * v @ e.T + (e * e).sum(-1)
        top2 = np.partition(d, 1, axis=-1)[..., :2]
        out.append((top2[..., 1] - top2[..., 0]) / np.maximum((v * v).sum(-1), 1e-30))
    return np.stack(out)


def compare(component: str, backend: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance,
            gaps: np.ndarray | None = None) -> Result:
    """`gaps` (encoder only, from code_gaps of the reference): where they are below tol.tie_gap,
    a different code is a broken tie and counts as agreeing."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    scale = max(float(np.abs(ref64).max()), 1e-30)
    agreement = None
    if component == "encoder":  # (B, C, h, w, d): a position's code is its C-vector
        same = np.abs(got64 - ref64).max(axis=1) <= 1e-6 * scale
        tie = ~same & (gaps <= tol.tie_gap) if gaps is not None else np.zeros_like(same)
        agreement = float((same | tie).mean())
        diff = np.abs(got64 - ref64).max(axis=1)[same] if same.any() else np.zeros(1)
        max_abs_all = float(np.abs(got64 - ref64).max())
        return Result(component, backend, max_abs_all, float(diff.max()) / scale, tol, agreement,
                      ties=int(tie.sum()))
    diff = np.abs(got64 - ref64)
    return Result(component, backend, float(diff.max()), float(diff.max()) / scale, tol)


@dataclass(frozen=True)
class E2EResult:
    source: str
    target: str
    precision: str
    psnr: float
    min_psnr: float

    def __bool__(self) -> bool:
        return self.psnr >= self.min_psnr

    def __str__(self) -> str:
        return (f"{'PASS' if self else 'FAIL'}  end-to-end {self.precision} vs fp32  {self.source} -> "
                f"{self.target}: PSNR {self.psnr:.2f} dB (min {self.min_psnr:.0f})")


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((a[mask].astype(np.float64) - b[mask]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
