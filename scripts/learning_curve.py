"""Learning curve of a run's MS-SPADE: held-out quality against the number of training subjects.

    python scripts/learning_curve.py RUN_DIR [DATA_DIR] [--subjects 3,6,11] [--steps 1200] [--out DIR]

For each n, stage 2 is trained from scratch (the run's stage-1 VQ-GAN, its cached training
latents, seed 0, the same budget for every n) on the first n training subjects taken round-robin
over acquisition sites (2013 / CBICA / TCIA), so each subset holds the smaller ones. Each is
scored on the run's held-out cases as in scripts/error_budget.py (the MS-SPADE latent decoded, no
diffusion; model grid) and by latent L1 on held-out and on its own training subjects, next to the
identity's. Writes OUT/results.json (one entry per n, kept across calls) and prints a table.
Needs torch; about 20 CPU-minutes per n at 1200 steps on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
import torch

from aldm import MODALITIES
from aldm.evaluate import score
from aldm.models.aldm import VQModel
from aldm.models.config import LDMConfig
from aldm.training.loop import load_stage
from aldm.training.stages import Budget, train_stage2
from error_budget import TASKS, brain, validation_cache


def site_round_robin(names: list[str]) -> list[str]:
    """Names interleaved over sites (Brats18_<site>...), so every prefix mixes the sites."""
    sites: dict[str, list[str]] = {}
    for n in sorted(names):
        sites.setdefault(n.split("_")[1][:4], []).append(n)
    return [n for n in chain.from_iterable(zip_longest(*sites.values())) if n]


def latent_l1(preds: list[torch.Tensor], lat: torch.Tensor, src: int, tgt: int) -> tuple[float, float]:
    """Mean latent L1 of the MS-SPADE outputs `preds` (one per case of lat) and of the identity,
    over lat (cases, 4, C, h, w, d)."""
    spade = np.mean([(p - z[tgt]).abs().mean().item() for p, z in zip(preds, lat)])
    ident = np.mean([(z[src] - z[tgt]).abs().mean().item() for z in lat])
    return float(spade), float(ident)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/brats18"))
    ap.add_argument("--subjects", default="3,6,11", help="comma-separated subset sizes")
    ap.add_argument("--steps", type=int, default=1200, help="stage-2 steps per n (cosine decay from half)")
    ap.add_argument("--out", type=Path, help="default RUN/learning_curve")
    args = ap.parse_args()
    out = args.out or args.run / "learning_curve"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    train_names = sorted(p.stem for p in (args.run / "cache").glob("*.npz"))  # latents.pt order
    order = site_round_robin(train_names)
    latents = torch.load(args.run / "latents.pt")  # (cases x 2 flips, 4, C, h, w, d)
    val_cache = validation_cache(args.run, args.data)
    ck = load_stage(args.run / "stage1" / "last.ckpt")
    cfg = LDMConfig.from_dict(ck["aldm_config"])
    vq = VQModel(cfg.first_stage_config)
    vq.load_state_dict(ck["state_dict"])
    vq.eval()
    val_vols = [np.load(p)["vols"].astype(np.float32) for p in val_cache]
    with torch.no_grad():  # the encoder is frozen after stage 1: encode the held-out cases once
        val_lat = torch.stack([torch.cat([vq.encode(torch.from_numpy(v[m][None, None]))[0] for m in range(4)])
                               for v in val_vols])
    budget = Budget(args.steps, 4, 3e-4, 24, decay_from=args.steps // 2)
    idx = {m: i for i, m in enumerate(MODALITIES)}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for n in (int(s) for s in args.subjects.split(",")):
        keep = sorted(train_names.index(c) for c in order[:n])
        sub = latents[[j for i in keep for j in (2 * i, 2 * i + 1)]]
        torch.manual_seed(0)
        vq = VQModel(cfg.first_stage_config)
        vq.load_state_dict(ck["state_dict"])  # stage-1 weights, a fresh MS-SPADE
        t0 = time.time()
        train_stage2(out / f"n{n}", sub, cfg, vq, budget=budget, max_minutes=120, checkpoint_minutes=10,
                     seed=0, quiet=True)
        row = {"subjects": order[:n], "steps": args.steps, "train_minutes": round((time.time() - t0) / 60, 1)}
        vq.eval()
        with torch.no_grad():
            for src, tgt in TASKS:
                s, t = idx[src], idx[tgt]
                val_pred = [vq.spade(z[s][None], t) for z in val_lat]  # once: scored and L1'd
                scores = [score(vq.decode(p)[0, 0].numpy() + 1, v[t] + 1, brain(v)) for p, v in zip(val_pred, val_vols)]
                val_l1, val_id = latent_l1([p[0] for p in val_pred], val_lat, s, t)
                train = sub[::2]  # unflipped training subjects
                tr_l1, tr_id = latent_l1([vq.spade(z[s][None], t)[0] for z in train], train, s, t)
                row[f"{src}->{tgt}"] = {
                    "psnr": float(np.mean([x.psnr for x in scores])), "ssim": float(np.mean([x.ssim for x in scores])),
                    "val_l1_ratio": val_l1 / val_id, "train_l1_ratio": tr_l1 / tr_id}
                print(n, src, "->", tgt, {k: round(x, 3) for k, x in row[f"{src}->{tgt}"].items()}, flush=True)
        results[str(n)] = row
        results_file.write_text(json.dumps(results, indent=1))
    tasks = [f"{s}->{t}" for s, t in TASKS]
    print("| subjects | " + " | ".join(tasks) + " | mean |\n|---:|" + "---|" * (len(tasks) + 1))
    for n, row in sorted(results.items(), key=lambda kv: int(kv[0])):
        cells = [f"{row[t]['psnr']:.2f} / {row[t]['ssim']:.3f}" for t in tasks]
        print(f"| {n} | " + " | ".join(cells) + f" | {np.mean([row[t]['psnr'] for t in tasks]):.2f} |")


if __name__ == "__main__":
    main()
