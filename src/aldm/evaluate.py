"""The paper's metrics: PSNR, 3-D SSIM and NMSE inside the brain mask, after per-volume
0.5/99.5 percentile normalisation to [0, 1]. numpy only.

Normalisation: percentiles over the brain mask (reference > 0), values clipped to [0, 1].
SSIM: Gaussian window (sigma 1.5, 11 voxels), C1 = 0.01², C2 = 0.03², averaged over the mask.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from aldm.atomic import write_text


def normalise(v: np.ndarray, mask: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    lo, hi = np.percentile(v[mask], percentiles)
    return np.clip((v.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)


def _gauss1d(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'same' convolution with zero padding."""
    r = len(k) // 2
    out = v
    for axis in range(v.ndim):
        pad = [(0, 0)] * v.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad)
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            sl = [slice(None)] * v.ndim
            sl[axis] = slice(i, i + out.shape[axis])
            acc += w * p[tuple(sl)]
        out = acc
    return out


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    k = _gauss1d()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _blur(a, k), _blur(b, k)
    s_aa = _blur(a * a, k) - mu_a**2
    s_bb = _blur(b * b, k) - mu_b**2
    s_ab = _blur(a * b, k) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))


@dataclass(frozen=True)
class Scores:
    psnr: float
    ssim: float
    nmse: float


def score(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> Scores:
    """Metrics of `pred` against `ref` (same grid) inside `mask` (default: ref > 0)."""
    mask = ref > 0 if mask is None else mask
    if not mask.any():
        raise ValueError("empty brain mask")
    p, r = normalise(pred, mask), normalise(ref, mask)
    mse = float(np.mean((p[mask] - r[mask]) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    nmse = float(np.sum((p[mask] - r[mask]) ** 2) / max(np.sum(r[mask] ** 2), 1e-12))
    ssim = float(ssim_map(p * mask, r * mask)[mask].mean())
    return Scores(float(psnr), ssim, nmse)


def linear_fit(source: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Least-squares a*source + b fitted to ref inside the mask (a baseline that peeks at the truth)."""
    mask = ref > 0 if mask is None else mask
    a, b = np.polyfit(source[mask].astype(np.float64), ref[mask].astype(np.float64), 1)
    return np.where(mask, a * source + b, 0)


@dataclass
class Row:
    case: str
    task: str
    method: str
    psnr: float
    ssim: float
    nmse: float


def summarise(rows: Sequence[Row]) -> list[Row]:
    """Mean per (task, method)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.task, r.method), []).append(r)
    return [Row("mean", t, m, *(float(np.mean([getattr(r, f) for r in g])) for f in ("psnr", "ssim", "nmse")))
            for (t, m), g in sorted(groups.items())]


def to_csv(rows: Iterable[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case", "task", "method", "psnr", "ssim", "nmse"])
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    return buf.getvalue()


def to_markdown(rows: Iterable[Row]) -> str:
    lines = ["| case | task | method | PSNR (dB) | SSIM | NMSE |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.case} | {r.task} | {r.method} | {r.psnr:.2f} | {r.ssim:.4f} | {r.nmse:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_reports(rows: Sequence[Row], out_prefix: str | Path) -> tuple[Path, Path]:
    out_prefix = Path(out_prefix)
    all_rows = list(rows) + summarise(rows)
    csv_path = out_prefix.with_suffix(".csv")
    md_path = out_prefix.with_suffix(".md")
    write_text(csv_path, to_csv(all_rows))  # atomic: temporary name, fsync, rename
    write_text(md_path, to_markdown(all_rows))
    return csv_path, md_path


def _load(path: Path) -> np.ndarray:
    from aldm.nifti import load_volume

    return load_volume(path).data


def resample_to_grid(data: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray,
                     ref_shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of `data` (world placement `affine`) onto another voxel grid, through
    the affines (no registration); 0 outside the source field of view."""
    m = np.linalg.inv(affine) @ ref_affine  # ref voxel -> data voxel
    jj, kk = np.meshgrid(np.arange(ref_shape[1]), np.arange(ref_shape[2]), indexing="ij")
    out = np.zeros(tuple(ref_shape), np.float32)
    for i in range(ref_shape[0]):
        pts = m[:3, :3] @ np.stack([np.full(jj.size, i), jj.ravel(), kk.ravel()]) + m[:3, 3:4]
        lo = np.floor(pts).astype(int)
        w = pts - lo
        acc = np.zeros(jj.size)
        for corner in range(8):
            off = [(corner >> a) & 1 for a in range(3)]
            idx = lo + np.array(off)[:, None]
            ok = np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]), axis=0)
            weight = np.prod([w[a] if off[a] else 1 - w[a] for a in range(3)], axis=0)
            acc[ok] += weight[ok] * data[idx[0, ok], idx[1, ok], idx[2, ok]]
        out[i] = acc.reshape(jj.shape)
    return out


QUANTILES = np.linspace(0, 1, 201)


def quantile_function(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The volume's intensity quantiles inside the mask, normalised as the metrics do."""
    return np.quantile(normalise(v, mask)[mask], QUANTILES)


def match_histogram(v: np.ndarray, mask: np.ndarray, template: np.ndarray) -> np.ndarray:
    """`v` with its histogram inside the mask mapped onto the quantile function `template`."""
    own = np.quantile(v[mask], QUANTILES) + np.arange(len(QUANTILES)) * 1e-9  # strictly increasing
    return np.where(mask, np.interp(v, own, template), 0)


class HistogramTemplates:
    """Mean quantile function of a modality over the reference folder's cases, leaving out the
    case being scored (the identity + histogram baseline never sees its own target)."""

    def __init__(self, ref_root: Path):
        self.ref_root, self._per_case = ref_root, {}

    def _cases(self, target: str) -> dict[str, np.ndarray]:
        if target not in self._per_case:
            qs = {}
            for d in sorted(p for p in self.ref_root.iterdir() if p.is_dir()):
                f = _reference_for(d.name, target, self.ref_root)
                if f is not None:
                    v = _load(f)
                    qs[d.name] = quantile_function(v, v > 0)
            self._per_case[target] = qs
        return self._per_case[target]

    def without(self, case: str, target: str) -> np.ndarray | None:
        others = [q for c, q in self._cases(target).items() if c != case]
        return np.mean(others, axis=0) if others else None


def _reference_for(case: str, target: str, ref_root: Path) -> Path | None:
    from aldm import MODALITY_ALIASES as ALIASES

    folder = ref_root / case
    if not folder.is_dir():
        return None
    for f in sorted(folder.iterdir()):
        name = f.name.lower()
        if any(name.endswith(f"{sep}{alias}{ext}") for alias in ALIASES[target]
               for sep in "_-" for ext in (".nii.gz", ".nii")):
            return f
    return None


def evaluate(pred: str | Path, ref: str | Path, *, baselines: bool = False) -> list[Row]:
    """Score one prediction file against one reference file (resampled through the affines onto
    the prediction's grid when the grids differ; mask: both > 0), or every aldm-infer output (found
    by its JSON sidecar) in `pred` against the matching volume of a BraTS-layout folder `ref`.
    With `baselines`, also the identity (source as prediction), the identity + histogram (the
    source's histogram mapped onto the mean target histogram of the other reference cases) and the
    per-case linear fit (which peeks at the truth)."""
    import json

    from aldm.errors import InputError

    pred, ref = Path(pred), Path(ref)
    if pred.is_file():
        from aldm.nifti import load_volume

        p, r = load_volume(pred), load_volume(ref)
        ref_data = r.data
        if r.data.shape != p.data.shape or not np.allclose(r.affine, p.affine, atol=1e-4):
            ref_data = resample_to_grid(r.data, r.affine, p.affine, p.data.shape)
        mask = (ref_data > 0) & (p.data > 0)
        s = score(p.data, ref_data, mask)
        return [Row(pred.name, "?", "model", s.psnr, s.ssim, s.nmse)]
    rows = []
    templates = HistogramTemplates(ref)
    sidecars = sorted(pred.glob("*.json"))
    for side in sidecars:
        meta = json.loads(side.read_text())
        if "target" not in meta or "output" not in meta:
            continue
        source = Path(meta["source"])
        case = source.parent.name
        ref_path = _reference_for(case, meta["target"], ref)
        if ref_path is None:
            raise InputError(f"no {meta['target']} reference for case {case} under {ref}")
        r = _load(ref_path)
        mask = r > 0
        task = f"{meta.get('source_modality', '?')}->{meta['target']}"
        candidates = [("model", _load(side.parent / meta["output"]))]
        if baselines:
            src = _load(source)
            candidates += [("identity", src)]
            template = templates.without(case, meta["target"])
            if template is not None:
                candidates += [("identity+hist", match_histogram(src, mask & (src > 0), template))]
            candidates += [("linear fit", linear_fit(src, r, mask))]
        for method, volume in candidates:
            s = score(volume, r, mask)
            rows.append(Row(case, task, method, s.psnr, s.ssim, s.nmse))
    if not rows:
        raise InputError(f"{pred}: no aldm-infer outputs (JSON sidecars) to evaluate")
    return rows
