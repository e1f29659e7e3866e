"""Two CPU backends (or two aldm checkouts' outputs) on the same real volumes: encoder code
agreement, and per target the end-to-end difference (max relative, PSNR in the brain mask), with
the same seed and settings. The question it answers: does switching the default engine change
what users get, beyond the float32 rounding `aldm check` allows per component?

    python scripts/compare_backends.py ../shared/data/brats18/*/Brats18_2013_20_1_t1.nii.gz \\
        --backends ort-cpu,ov-cpu [--model DIR] [--targets t2,flair,t1ce] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from aldm.translator import default_model_dir
    from aldm.nifti import load_volume
    from aldm.preprocess import preprocess
    from aldm.runtime.compare import psnr
    from aldm.runtime.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--backends", default="ort-cpu,ov-cpu")
    ap.add_argument("--targets", default="t2,flair,t1ce")
    ap.add_argument("--tile-rows", type=int, default=0)
    ap.add_argument("--ties", action="store_true",
                    help="also encode with PyTorch (needs torch and the model's checkpoint) and give, for every "
                         "position where a backend's code differs from PyTorch's, the top-2 distance gap "
                         "relative to |h|^2 (aldm check counts gaps under 1e-6 as float32 ties)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    a_name, b_name = args.backends.split(",")
    targets = args.targets.split(",")
    model = args.model or default_model_dir()
    a = Pipeline.load(model, backend=a_name, tile_rows=0)
    b = Pipeline.load(model, backend=b_name, tile_rows=args.tile_rows)
    rows = []
    for src in args.sources:
        vol = load_volume(src)
        x = preprocess(vol.data, vol.affine, a.manifest.preprocessing).x
        za, zb = a.encode(x), b.encode(x)
        same = np.all(za == zb, axis=1).mean()
        ties = _ties(model, x, {a_name: za, b_name: zb}) if args.ties else {}
        for name, gaps in ties.items():
            print(f"{src.name:<32} {name}: {len(gaps)} codes differ from PyTorch's; top-2 gaps "
                  + (", ".join(f"{g:.1e}" for g in sorted(gaps)) or "-"))
        ta = a.translate(x, targets, seed=0)
        tb = b.translate(x, targets, seed=0)
        mask = x[0, 0] > x.min() + 1e-6  # model-grid foreground, as aldm check's e2e uses
        for t in targets:
            va, vb = ta.volumes[t][0, 0], tb.volumes[t][0, 0]
            rel = float(np.abs(va - vb).max() / np.abs(va).max())
            # intensities mapped to [0, 1] as aldm check's end-to-end PSNR maps them
            p = psnr(np.clip((vb + 1) / 2, 0, 1), np.clip((va + 1) / 2, 0, 1), mask)
            rows.append({"source": src.name, "target": t, "code_agreement": float(same),
                         "gaps_vs_torch": {k: [float(g) for g in v] for k, v in ties.items()},
                         "max_rel": rel, "psnr_db": p})
            print(f"{src.name:<32} {t:<6} codes {100 * same:7.3f}%  max rel {rel:.2e}  PSNR {p:6.1f} dB "
                  f"({a_name} vs {b_name}{', slabs of %d rows' % args.tile_rows if args.tile_rows else ''})")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "a": a_name, "b": b_name, "rows": rows}, indent=1))


def _ties(model, x: np.ndarray, latents: dict) -> dict:
    """backend -> top-2 gaps (relative to |h|^2) where its code differs from PyTorch's."""
    import torch

    from aldm.export.check import reference_model
    from aldm.runtime.compare import code_gaps
    from aldm.runtime.manifest import ModelDir

    ref = reference_model(ModelDir(model)).eval()
    vq = ref.first_stage_model
    with torch.no_grad():
        h = vq.quant_conv(vq.encoder(torch.from_numpy(x))).numpy()
        z_ref = vq.quantize(torch.from_numpy(h))[0].numpy()
    gaps = code_gaps(h, vq.quantize.embedding.weight.detach().numpy())
    out = {}
    for name, z in latents.items():
        differ = ~np.all(z == z_ref, axis=1)  # (B, h, w, d)
        out[name] = gaps[differ].tolist()
    return out


if __name__ == "__main__":
    main()
