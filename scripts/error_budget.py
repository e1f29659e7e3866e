"""Where a trained run loses quality, on its held-out cases (model grid, the paper's metrics).

    python scripts/error_budget.py RUN_DIR [DATA_DIR] [--out PREFIX]

Per task (t1->t2, t1->flair, t1->t1ce, t2->flair, flair->t2), besides the identity baseline:
  ceiling        the real target through the VQ-GAN (encode, quantize, decode): the best any
                 latent model of this autoencoder can score;
  spade          the MS-SPADE translation of the source latent, decoded (no diffusion);
  identity+hist  the source with its histogram mapped onto the target modality's mean histogram
                 over the training cases: what a monotone intensity remapping alone scores,
                 i.e. what a model must beat to show it learned contrast that depends on anatomy.
The full model (diffusion sampling) is scored by scripts/validate_default_model.sh. Needs torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from aldm import MODALITIES
from aldm.evaluate import Row, match_histogram, quantile_function, score, summarise, to_markdown, write_reports
from aldm.models.aldm import VQModel
from aldm.models.config import LDMConfig
from aldm.runtime.manifest import Preprocessing
from aldm.training.data import cache_cases, find_cases
from aldm.training.loop import load_stage

TASKS = [("t1", "t2"), ("t1", "flair"), ("t1", "t1ce"), ("t2", "flair"), ("flair", "t2")]


def brain(vols: np.ndarray) -> np.ndarray:
    return (vols > -1 + 1e-3).all(0)  # model grid: background is -1 in every modality


def histogram_template(cache: list[Path]) -> dict[str, np.ndarray]:
    """Mean quantile function of each modality, normalised as the metrics do, over `cache`."""
    qs: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for p in cache:
        vols = np.load(p)["vols"].astype(np.float32)
        mask = brain(vols)
        for i, m in enumerate(MODALITIES):
            qs[m].append(quantile_function(vols[i], mask))
    return {m: np.mean(q, 0) for m, q in qs.items()}


def validation_cache(run: Path, data: Path) -> list[Path]:
    """The run's held-out cases (split.json), cached in the model grid under RUN/validation/cache."""
    names = json.loads((run / "split.json").read_text())["validation"]
    return cache_cases([c for c in find_cases(data) if c.name in names], run / "validation" / "cache", Preprocessing())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/brats18"))
    ap.add_argument("--out", type=Path, help="report prefix (.csv, .md); default RUN/validation/error_budget")
    args = ap.parse_args()
    val = validation_cache(args.run, args.data)
    template = histogram_template(sorted((args.run / "cache").glob("*.npz")))
    ck = load_stage(args.run / "stage2" / "last.ckpt")
    vq = VQModel(LDMConfig.from_dict(ck["aldm_config"]).first_stage_config)
    vq.load_state_dict(ck["state_dict"])
    vq.eval()
    idx = {m: i for i, m in enumerate(MODALITIES)}
    rows = []
    with torch.no_grad():
        for path in val:
            vols = np.load(path)["vols"].astype(np.float32)
            mask = brain(vols)
            z = {m: vq.encode(torch.from_numpy(vols[i][None, None]))[0] for m, i in idx.items()}
            decode = lambda lat: vq.decode(lat)[0, 0].numpy()  # noqa: E731
            ceiling = {}
            for src, tgt in TASKS:
                ref = vols[idx[tgt]] + 1  # metrics want background 0
                if tgt not in ceiling:
                    ceiling[tgt] = score(decode(z[tgt]) + 1, ref, mask)
                preds = {
                    "identity": score(vols[idx[src]] + 1, ref, mask),
                    "identity+hist": score(match_histogram(vols[idx[src]], mask, template[tgt]), ref, mask),
                    "ceiling": ceiling[tgt],
                    "spade": score(decode(vq.spade(z[src], idx[tgt])) + 1, ref, mask),
                }
                for method, s in preds.items():
                    rows.append(Row(path.stem, f"{src}->{tgt}", method, s.psnr, s.ssim, s.nmse))
                print(path.stem, src, "->", tgt, {k: round(s.psnr, 2) for k, s in preds.items()}, flush=True)
    out = args.out or args.run / "validation" / "error_budget"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_reports(rows, out)
    print(to_markdown(summarise(rows)))


if __name__ == "__main__":
    main()
