#!/usr/bin/env python3
"""Score an exported model on held-out BraTS cases at several sampler strengths, with every
baseline issue 16's bar is set against (no torch: ONNX Runtime on the CPU).

    python scripts/validate_model.py MODEL_DIR [DATA_DIR] --cases A,B,C,D \\
        --strengths 0,0.1,0.2,0.4 [--steps 25 --eta 0 --seed 0] --out runs/val/NAME

Tasks: t1->t2, t1->flair, t1->t1ce, t2->flair, flair->t2. Each source is translated as
`aldm-infer --seed SEED` translates it (same preprocessing, targets batched, output in the source's
grid) and scored as `aldm eval` scores it (both volumes normalised to [0, 1] by their 0.5/99.5
percentiles inside the reference's brain, reference > 0; PSNR, 3-D SSIM, NMSE). Rows per case:

  model s=S      the model at strength S (0: the MS-SPADE latent decoded, no diffusion);
  identity       the source itself;
  identity+hist  the source's histogram mapped onto the target modality's mean histogram over the
                 other cases of DATA_DIR (`aldm eval --baselines`: a remapping without anatomy);
  inversion      t1->t2 only: 1 - the normalised T1 inside the brain;
  ceiling        the real target through the model's VQ-GAN (encode, quantize, decode): the best
                 any latent model of this autoencoder can do.

Writes OUT.csv (per case), OUT.md (means per task and method) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from aldm.evaluate import (HistogramTemplates, Row, _reference_for, match_histogram, normalise,  # noqa: E402
                           score, summarise, to_markdown, write_reports)
from aldm.nifti import load_volume  # noqa: E402
from aldm.preprocess import invert, preprocess  # noqa: E402
from aldm.runtime.pipeline import Pipeline  # noqa: E402

TASKS = [("t1", "t2"), ("t1", "flair"), ("t1", "t1ce"), ("t2", "flair"), ("flair", "t2")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path, nargs="?", default=ROOT.parent / "shared/data/brats18")
    ap.add_argument("--cases", required=True, help="comma-separated held-out case folders")
    ap.add_argument("--strengths", default="0,0.4", help="comma-separated sampler strengths")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    ap.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-baselines", action="store_true", help="model rows only")
    ap.add_argument("--out", type=Path, required=True, help="report prefix")
    a = ap.parse_args(argv)

    pipe = Pipeline.load(a.model, backend="ort-cpu", threads=a.threads)
    pre = pipe.manifest.preprocessing
    strengths = [float(s) for s in a.strengths.split(",")]
    templates = HistogramTemplates(a.data)
    rows: list[Row] = []
    t_start = time.monotonic()
    for case in a.cases.split(","):
        refs = {m: load_volume(_reference_for(case, m, a.data)) for m in ("t1", "t1ce", "t2", "flair")}
        by_source = defaultdict(list)
        for s, t in TASKS:
            by_source[s].append(t)
        for src_mod, targets in by_source.items():
            src = refs[src_mod]
            prep = preprocess(src.data, src.affine, pre)
            for strength in strengths:
                tr = pipe.translate(prep.x, targets, steps=a.steps, eta=a.eta, strength=strength, seed=a.seed)
                for t in targets:
                    pred = invert(tr.volumes[t][0, 0], prep.record, intensity="unit")
                    r = refs[t].data
                    s_ = score(pred, r, r > 0)
                    rows.append(Row(case, f"{src_mod}->{t}", f"model s={strength:g}", s_.psnr, s_.ssim, s_.nmse))
            if a.no_baselines:
                continue
            for t in targets:
                r = refs[t].data
                mask = r > 0
                cands = [("identity", src.data)]
                tpl = templates.without(case, t)
                if tpl is not None:
                    cands.append(("identity+hist", match_histogram(src.data, mask & (src.data > 0), tpl)))
                if (src_mod, t) == ("t1", "t2"):
                    brain = mask & (src.data > 0)
                    cands.append(("inversion", np.where(brain, 1 - normalise(src.data, brain), 0)))
                for method, vol in cands:
                    s_ = score(vol, r, mask)
                    rows.append(Row(case, f"{src_mod}->{t}", method, s_.psnr, s_.ssim, s_.nmse))
        if not a.no_baselines:  # the VQ-GAN ceiling of each target modality
            for t in sorted({t for _, t in TASKS}):
                ref = refs[t]
                prep = preprocess(ref.data, ref.affine, pre)
                z = pipe.encode(prep.x) * np.float32(pipe.manifest.scale_factor)
                rec = invert(pipe.decode(z)[0, 0], prep.record, intensity="unit")
                s_ = score(rec, ref.data, ref.data > 0)
                for src_mod, tt in TASKS:
                    if tt == t:
                        rows.append(Row(case, f"{src_mod}->{t}", "ceiling", s_.psnr, s_.ssim, s_.nmse))
        print(f"{case} done ({time.monotonic() - t_start:.0f} s)", flush=True)

    order = {f"{s}->{t}": i for i, (s, t) in enumerate(TASKS)}
    rows.sort(key=lambda r: (order[r.task], r.case, r.method))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_reports(rows, a.out)
    means = summarise(rows)
    a.out.with_suffix(".json").write_text(json.dumps({
        "model": str(a.model), "cases": a.cases.split(","), "strengths": strengths, "steps": a.steps,
        "eta": a.eta, "seed": a.seed, "wall_s": round(time.monotonic() - t_start, 1),
        "means": [r.__dict__ for r in means]}, indent=1))
    print(to_markdown(sorted(means, key=lambda r: (order.get(r.task, 99), r.method))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
