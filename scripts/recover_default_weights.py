"""Rebuild the bundled default model's PyTorch checkpoint from its FP32 ONNX graphs (issue 16 item 1).

The training run folder that the manifest once pointed at (/work/runs/default/stage3/last.ckpt) is
gone. The graphs still hold every weight: the exporter wraps the model as `m` (EncoderGraph(m),
...), so each parameter is an initializer named `m.<state_dict key>`; the UNet graph was exported
from the EMA weights. The noise-schedule buffers come from the model folder's schedule.npz (the
checkpoint's own buffers, written at export) and the scale factor from the manifest.

Writes the official Lightning layout without optimizer state (what `save_official` writes):
`first_stage_model.*`, `model.diffusion_model.*`, the twelve schedule buffers, `scale_factor`, and
the EMA copy under `model_ema.*`. The graphs hold only the EMA UNet, so the raw
`model.diffusion_model.*` weights ARE the EMA weights: both names are stored, as one storage each
(torch.save writes a storage once however many keys share it), so `load_official(..., ema=True)`
and `ema=False` build the same UNet and the file stays under the 20 MB budget. The model's config
is stored as `aldm_config` (so `load_official(path)` needs no config) and the provenance as
`aldm_recovered`. If the whole model does not fit in one file of at most 20 MB, the first stage
goes to a separate VQ-GAN file (`vqgan.ckpt`, the official stage-2 layout), which
`load_official(ldm, vqgan)` accepts.

    python scripts/recover_default_weights.py [--model src/aldm/assets/default_model]
                                              [--out models/default] [--update-manifest]

Fails (exit 1) if any state_dict key of the model built from the manifest's config is not
recovered, if a key holds a different value in two graphs, or if a file exceeds the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 20 * 10**6  # "<= 20 MB per file" (decimal: stricter than 20 MiB)
FP32_GRAPHS = ("encoder", "spade", "unet", "decoder")
PREFIX = "m."


def graph_weights(model_dir: Path, manifest: dict) -> dict[str, tuple[str, np.ndarray]]:
    """Every `m.*` initializer of the four FP32 graphs: state_dict key -> (graph, array)."""
    import onnx
    from onnx import numpy_helper

    found: dict[str, tuple[str, np.ndarray]] = {}
    conflicts = []
    for c in FP32_GRAPHS:
        g = onnx.load(str(model_dir / manifest["components"][c]["file"]))
        for init in g.graph.initializer:
            if not init.name.startswith(PREFIX):
                continue
            key, arr = init.name[len(PREFIX):], numpy_helper.to_array(init)
            if key in found and not np.array_equal(found[key][1], arr):
                conflicts.append(f"{key} ({found[key][0]} vs {c})")
            found.setdefault(key, (c, arr))
    if conflicts:
        raise SystemExit(f"weights that differ between graphs: {', '.join(conflicts[:6])}")
    return found


def recover(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(official state_dict without EMA, manifest, stats)."""
    from aldm.models import ALDM, LDMConfig
    from aldm.runtime.manifest import ModelDir
    from aldm.runtime.schedule import BUFFER_NAMES

    ModelDir(model_dir)  # verifies the sha256 of every graph and of schedule.npz
    manifest = json.loads((model_dir / "manifest.json").read_text())
    cfg = LDMConfig.from_dict(manifest["config"])
    with np.load(model_dir / manifest["schedule"]["file"]) as z:
        schedule = {k: np.asarray(z[k], np.float32) for k in z.files}
    missing_buffers = [n for n in BUFFER_NAMES if n not in schedule]
    if missing_buffers:
        raise SystemExit(f"schedule.npz lacks {', '.join(missing_buffers)}")

    with torch.device("meta"):
        model = ALDM(cfg, schedule)
    expected = model.state_dict()
    found = graph_weights(model_dir, manifest)
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k][1].shape} != {tuple(v.shape)}" for k, v in expected.items()
             if k in found and found[k][1].shape != tuple(v.shape)]
    if missing or extra or wrong:
        raise SystemExit(f"not recovered: missing {missing[:8]} (+{max(0, len(missing) - 8)}); "
                         f"unexpected {extra[:8]}; wrong shapes {wrong[:4]}")
    bad_dtype = [k for k in expected if found[k][1].dtype != np.float32]
    if bad_dtype:
        raise SystemExit(f"not float32 in the graphs: {bad_dtype[:6]}")

    sd: dict[str, torch.Tensor] = {n: torch.from_numpy(schedule[n].copy()) for n in BUFFER_NAMES}
    sd.update({k: torch.from_numpy(np.ascontiguousarray(found[k][1]).copy()) for k in expected})
    sd["scale_factor"] = torch.tensor(float(manifest["scale_factor"]))
    if abs(float(manifest["scale_factor"]) - float(manifest["config"]["scale_factor"])) > 1e-12:
        raise SystemExit("manifest scale_factor and config.scale_factor disagree")
    by_graph: dict[str, list[int]] = {}
    for k in expected:
        g = found[k][0]
        by_graph.setdefault(g, [0, 0])
        by_graph[g][0] += 1
        by_graph[g][1] += found[k][1].nbytes
    stats = {"keys": len(expected), "bytes": sum(v[1] for v in by_graph.values()),
             "by_graph": by_graph}
    return sd, manifest, stats


def _sha256(path: Path) -> str:
    from aldm.runtime.manifest import sha256_file

    return sha256_file(path)


def write(sd: dict[str, torch.Tensor], manifest: dict, model_dir: Path, out: Path) -> dict:
    """Write the checkpoint(s) into `out`; returns the `source` entries for the manifest."""
    from aldm.models.checkpoint import save_official
    from aldm.models.loader import FIRST_STAGE, UNET

    out.mkdir(parents=True, exist_ok=True)
    unet = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}  # the same tensors
    graphs = {c: _sha256(model_dir / manifest["components"][c]["file"]) for c in FP32_GRAPHS}
    provenance = {
        "from": "initializers of the FP32 ONNX graphs of the bundled default model",
        "graphs_sha256": graphs,
        "schedule_sha256": _sha256(model_dir / manifest["schedule"]["file"]),
        "original": str(manifest.get("source", {}).get("original_ldm_ckpt")
                        or manifest.get("source", {}).get("ldm_ckpt")),
        "ema": "the graphs hold the EMA UNet; model.diffusion_model.* and model_ema.* are the "
               "same values (one storage)",
        "not_recovered": "optimizer state, raw (non-EMA) UNet weights, epoch/global_step",
        "script": "scripts/recover_default_weights.py",
    }
    extra = {"aldm_config": manifest["config"], "aldm_recovered": provenance}
    ldm = out / "last.ckpt"
    save_official(ldm, sd, unet, extra=extra)
    source = {"ldm_ckpt": ldm, "vqgan_ckpt": None}
    if ldm.stat().st_size > MAX_FILE_BYTES:  # split: first stage into an official VQ-GAN file
        vq = {k[len(FIRST_STAGE):]: v for k, v in sd.items() if k.startswith(FIRST_STAGE)}
        rest = {k: v for k, v in sd.items() if not k.startswith(FIRST_STAGE)}
        save_official(ldm, rest, unet, extra=extra)
        save_official(out / "vqgan.ckpt", vq, extra=extra)
        source["vqgan_ckpt"] = out / "vqgan.ckpt"
    for p in filter(None, source.values()):
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SystemExit(f"{p} is {size} bytes, over the {MAX_FILE_BYTES}-byte budget")
    return source


def source_entry(source: dict, old: dict) -> dict:
    """The manifest's new `source`: paths relative to the repository root, their sha256."""
    new = {"ldm_ckpt": source["ldm_ckpt"].resolve().relative_to(REPO).as_posix(),
           "ldm_sha256": _sha256(source["ldm_ckpt"])}
    if source["vqgan_ckpt"] is not None:
        new["vqgan_ckpt"] = source["vqgan_ckpt"].resolve().relative_to(REPO).as_posix()
        new["vqgan_sha256"] = _sha256(source["vqgan_ckpt"])
    new["ema"] = old.get("ema", True)
    new["recovered"] = ("rebuilt from the FP32 ONNX graphs by scripts/recover_default_weights.py: "
                        "the training run folder is gone; the UNet holds the EMA weights under "
                        "both names; no optimizer state")
    new["original_ldm_ckpt"] = old.get("original_ldm_ckpt", old.get("ldm_ckpt"))
    new["original_ldm_sha256"] = old.get("original_ldm_sha256", old.get("ldm_sha256"))
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "src/aldm/assets/default_model")
    ap.add_argument("--out", type=Path, default=REPO / "models/default")
    ap.add_argument("--update-manifest", action="store_true",
                    help="rewrite the manifest's `source` (only that field) to point at the output")
    args = ap.parse_args(argv)

    sd, manifest, stats = recover(args.model)
    print(f"recovered {stats['keys']} state_dict keys, {stats['bytes']} bytes of float32 weights")
    for g, (n, b) in stats["by_graph"].items():
        print(f"  {g:8s} {n:4d} keys {b:9d} bytes")
    source = write(sd, manifest, args.model, args.out)
    for p in filter(None, source.values()):
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {_sha256(p)})")
    if args.update_manifest:
        path = args.model / "manifest.json"
        text = path.read_text()
        d = json.loads(text)
        d["source"] = source_entry(source, d.get("source", {}))
        # the manifest's own layout: json.dumps(indent=1), as Manifest.to_json writes it
        path.write_text(json.dumps(d, indent=1) + ("\n" if text.endswith("\n") else ""))
        print(f"updated {path} source: {json.dumps(d['source'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
