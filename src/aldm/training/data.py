"""Training data: BraTS-layout folders -> preprocessed, co-registered 4-modality arrays.

Every modality goes through the inference preprocessing (`aldm.preprocess`) with the T1's
spatial record, as the official pipeline crops all modalities with the T1 foreground box.
Arrays are cached as float16 (4, H, W, D) per case, in modality order t1, t1ce, t2, flair.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aldm import MODALITIES
from aldm import MODALITY_ALIASES as ALIASES
from aldm.atomic import atomic_path
from aldm.errors import InputError
from aldm.nifti import load_volume
from aldm.preprocess import preprocess, replay
from aldm.runtime.manifest import Preprocessing



@dataclass(frozen=True)
class Case:
    name: str
    paths: dict[str, Path]  # modality -> file


def find_cases(root: str | Path) -> list[Case]:
    """Subfolders holding `<case>_{t1,t1ce,t2,flair}.nii.gz` (or BraTS-2023 `-t1n/-t1c/-t2w/-t2f`)."""
    root = Path(root)
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        paths = {}
        for f in d.iterdir():
            m = re.search(r"[-_]([a-z0-9]+)\.nii(\.gz)?$", f.name.lower())
            for mod, names in ALIASES.items():
                if m and m.group(1) in names:
                    paths[mod] = f
        if all(m in paths for m in MODALITIES):
            cases.append(Case(d.name, paths))
    if not cases:
        raise InputError(f"{root}: no case folders with t1, t1ce, t2 and flair volumes")
    return cases


def split(cases: list[Case], val_names: list[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Validation = the named cases, else every fifth case of the sorted list starting at index 1
    (a rule fixed before training, never tuned on results)."""
    ordered = sorted(cases, key=lambda c: c.name)
    val = [c for c in ordered if c.name in val_names] if val_names else ordered[1::5]
    train = [c for c in ordered if c not in val]
    return train, val


def prepare_case(case: Case, pre: Preprocessing) -> tuple[np.ndarray, list[dict]]:
    """(4, H, W, D) float32 model-grid volumes and the T1's preprocessing record."""
    ref = load_volume(case.paths["t1"])
    prep = preprocess(ref.data, ref.affine, pre)
    vols = [prep.x[0, 0]]
    for mod in MODALITIES[1:]:
        vols.append(replay(load_volume(case.paths[mod]).data, prep.record, pre).x[0, 0])
    return np.stack(vols), prep.record


def cache_cases(cases: list[Case], cache: Path, pre: Preprocessing, say=print) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for case in cases:
        path = cache / f"{case.name}.npz"
        if not path.exists():
            say(f"preprocessing {case.name}")
            vols, record = prepare_case(case, pre)
            with atomic_path(path) as tmp:
                np.savez(tmp, vols=vols.astype(np.float16), record=json.dumps(record))
        out.append(path)
    return out


def load_cached(path: Path) -> torch.Tensor:
    with np.load(path) as z:
        return torch.from_numpy(z["vols"].astype(np.float32))


# ------------------------------------------------------------------------------ augmentation

def random_rotation(rng: np.random.Generator, max_deg: float, max_scale: float) -> torch.Tensor:
    """3x3 matrix: small rotation about each axis times an isotropic scale."""
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    s = 1 + rng.uniform(-max_scale, max_scale)
    return torch.tensor(rx @ ry @ rz * s, dtype=torch.float32)


def sample_patch(vols: torch.Tensor, size: int, rng: np.random.Generator, *, channels=None,
                 max_deg: float = 8.0, max_scale: float = 0.06, flip: bool = True) -> torch.Tensor:
    """A size^3 patch (C, s, s, s) of `vols` (C, H, W, D) at a random foreground-biased centre,
    under a small random rotation/scale (trilinear), optionally flipped left-right; background -1."""
    c = vols if channels is None else vols[list(channels)]
    shape = torch.tensor(c.shape[1:], dtype=torch.float32)
    fg = torch.nonzero(c[0] > -0.9)
    centre = fg[rng.integers(len(fg))].float() if len(fg) else shape / 2
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (s^3, 3) voxel offsets
    pts = grid @ random_rotation(rng, max_deg, max_scale).T + centre  # voxel coords (i, j, k)
    norm = pts / (shape - 1) * 2 - 1  # grid_sample wants (x=k, y=j, z=i) in [-1, 1]
    g = norm[:, [2, 1, 0]].reshape(1, size, size, size, 3)
    out = F.grid_sample(c[None] + 1, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0] - 1
    if flip and rng.random() < 0.5:
        out = out.flip(1)  # axis 0 of the volume is left-right (RAS)
    return out


def gamma_jitter(x: torch.Tensor, rng: np.random.Generator, max_log_gamma: float = 0.2) -> torch.Tensor:
    """Intensity jitter that keeps the background at -1: ((x+1)/2)^gamma mapped back to [-1, 1]."""
    g = math.exp(rng.uniform(-max_log_gamma, max_log_gamma))
    return ((x + 1) / 2).clamp(min=0).pow(g) * 2 - 1
