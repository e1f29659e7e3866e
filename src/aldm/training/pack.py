"""A code pack: what stages 2 and 3 need of a frozen VQ-GAN, small enough to travel with a GPU call.

Stages 2 (MS-SPADE) and 3 (UNet) see the training volumes only as quantized latents, and a
quantized latent is a codebook row per latent voxel. A pack folder holds

- `codes.npz`: `codes` uint16 (N, 4, h, w, d) codebook indices of N training volumes (a case, and
  optionally its left-right mirror) in modality order `modalities`; `codebook` float32 (K, C);
  `cases` and `flipped` (one entry per volume); `scale_factor` (1/std of the packed latents, what
  the UNet's inputs are multiplied by);
- `pack.json`: the packing model's config and provenance: source data folder, the model folder and
  the sha256 of its encoder and decoder graphs, held-out cases (never encoded), preprocessing, counts.

The frozen VQ-GAN (encoder, quantizer, decoder), which trained SPADE + UNet weights are assembled
with into a complete checkpoint, is read back from that model folder's ONNX graphs (`first_stage`),
checked against the recorded sha256: 2.4 MB less to carry in a device call's 64 MiB working tree.
A pack of another model may hold it instead (`first_stage.ckpt`, official names, fp32).

Needs numpy only to read the codes; torch for `latents` and the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from aldm.atomic import atomic_path, write_text
from aldm.errors import InputError

CODES = "codes.npz"
FIRST_STAGE = "first_stage.ckpt"
META = "pack.json"
ONNX_PREFIX = "m.first_stage_model."


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_first_stage(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(LDM config dict of the exported model, VQ-GAN weights without the SPADE) read off a model
    folder's manifest and the initializers of its encoder and decoder graphs."""
    import onnx
    from onnx import numpy_helper

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    weights: dict[str, np.ndarray] = {}
    for part in ("encoder", "decoder"):
        graph = onnx.load(str(model_dir / manifest["components"][part]["file"])).graph
        for init in graph.initializer:
            if init.name.startswith(ONNX_PREFIX):
                weights[init.name[len(ONNX_PREFIX):]] = numpy_helper.to_array(init).copy()
    return manifest["config"], weights


def codes_of(z_q: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Indices of quantized latent vectors (C, h, w, d) in `codebook` (K, C), uint16 (h, w, d);
    raises unless every vector is exactly a codebook row (the round trip must be lossless)."""
    c = z_q.shape[0]
    v = z_q.reshape(c, -1).T.astype(np.float32)  # (N, C)
    d = (v**2).sum(1, keepdims=True) + (codebook**2).sum(1) - 2 * v @ codebook.T
    idx = d.argmin(1)
    if not np.array_equal(codebook[idx], v):
        bad = int((codebook[idx] != v).any(1).sum())
        raise InputError(f"{bad} of {len(v)} latent vectors are not codebook rows: not a quantized latent")
    if len(codebook) > 65536:
        raise InputError(f"a codebook of {len(codebook)} rows does not fit uint16 indices")
    return idx.astype(np.uint16).reshape(z_q.shape[1:])


def write_pack(out: str | Path, *, codes: np.ndarray, codebook: np.ndarray, cases: list[str],
               flipped: list[bool], modalities: list[str], config: dict,
               first_stage: dict[str, np.ndarray] | None = None, meta: dict[str, Any]) -> dict:
    """`first_stage`: VQ-GAN weights to store in the pack; None: `meta` names the model folder
    (`model`, `model_sha256`) they are read back from."""
    """Write a pack folder; returns its pack.json content."""
    import torch

    from aldm.models.checkpoint import save_official

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codes = np.ascontiguousarray(codes, dtype=np.uint16)
    z = codebook.astype(np.float64)[codes.astype(np.int64)]  # (N, 4, h, w, d, C)
    scale = float(1.0 / z.std(ddof=1))  # torch's .std(): unbiased
    with atomic_path(out / CODES) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, codes=codes, codebook=codebook.astype(np.float32),
                            cases=np.array(cases), flipped=np.array(flipped, bool),
                            modalities=np.array(modalities), scale_factor=np.float64(scale))
    files = [out / CODES]
    if first_stage is not None:
        sd = {f"first_stage_model.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in first_stage.items()}
        save_official(out / FIRST_STAGE, sd, extra={"aldm_config": config})
        files.append(out / FIRST_STAGE)
    elif not meta.get("model"):
        raise ValueError("a pack without first_stage weights must name its model folder (meta['model'])")
    info = {**meta, "config": config, "volumes": int(codes.shape[0]), "cases": sorted(set(cases)),
            "latent_shape": list(codes.shape[2:]), "codebook": list(codebook.shape),
            "modalities": list(modalities), "scale_factor": scale,
            "bytes": {p.name: p.stat().st_size for p in files}}
    write_text(out / META, json.dumps(info, indent=1))
    return info


def read_pack(path: str | Path) -> dict[str, Any]:
    """The arrays of `codes.npz` plus `meta` (pack.json)."""
    path = Path(path)
    if not (path / CODES).exists():
        raise InputError(f"{path}: no {CODES}; make one with scripts/pack_codes.py")
    with np.load(path / CODES, allow_pickle=False) as z:
        pack = {k: z[k] for k in z.files}
    pack["meta"] = json.loads((path / META).read_text()) if (path / META).exists() else {}
    return pack


def latents(pack: dict[str, Any]):
    """float32 torch latents (N, 4, C, h, w, d) of a pack: codebook rows by index."""
    import torch

    cb = torch.from_numpy(pack["codebook"].astype(np.float32))  # (K, C)
    idx = torch.from_numpy(pack["codes"].astype(np.int64))  # (N, 4, h, w, d)
    return cb[idx].permute(0, 1, 5, 2, 3, 4).contiguous()


def config_of(path: str | Path):
    """The LDMConfig the pack was made with (its first stage is the frozen VQ-GAN)."""
    from aldm.models.config import LDMConfig

    return LDMConfig.from_dict(json.loads((Path(path) / META).read_text())["config"])


def first_stage(path: str | Path, model_dir: str | Path | None = None):
    """(LDMConfig of the packing model, its frozen VQ-GAN weights as torch tensors, names without
    `first_stage_model.`; no SPADE: load them with strict=False into a VQModel whose SPADE is
    trained next). From `first_stage.ckpt` if the pack holds one, else from the model folder's
    ONNX graphs (`model_dir`, default the one pack.json names, relative to the repository),
    refused unless their sha256 are the recorded ones."""
    import torch

    path = Path(path)
    if (path / FIRST_STAGE).exists():
        from aldm.models.checkpoint import read_checkpoint
        from aldm.models.config import LDMConfig

        ck = read_checkpoint(path / FIRST_STAGE)
        return LDMConfig.from_dict(ck["aldm_config"]), {k.removeprefix("first_stage_model."): v
                                                        for k, v in ck["state_dict"].items()}
    meta = json.loads((path / META).read_text())
    model = Path(model_dir or meta["model"])
    if not model.is_absolute() and not model.exists():
        model = Path(__file__).resolve().parents[3] / model  # relative to the repository root
    for name, want in meta.get("model_sha256", {}).items():
        got = sha256(model / name)
        if got != want:
            raise InputError(f"{model / name} is not the graph this pack was encoded with "
                             f"(sha256 {got[:12]}, pack {want[:12]})")
    _, weights = onnx_first_stage(model)
    return config_of(path), {k: torch.from_numpy(v) for k, v in weights.items()}
