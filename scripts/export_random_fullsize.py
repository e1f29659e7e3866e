#!/usr/bin/env python3
"""Export the official full-size ALDM architecture with seeded random weights, for benchmarks.

    python scripts/export_random_fullsize.py OUT_DIR [--seed 0] [--crop 144,192,144]
    aldm bench OUT_DIR --torch --json bench.json

Builds ALDM(LDMConfig()) — the official widths (VQ-GAN ch 64, n_embed 8192, MS-SPADE nf 128,
UNet 128 channels with attention) — with torch's default initialisation under `--seed`, and
exports it with aldm.export.export_model. The weights are meaningless, and that is fine for
speed: no kernel here depends on the values (dense convolutions and matmuls; the quantizer's
argmin scans all 8192 codes whatever they are). So anyone can reproduce full-size timings and
FLOPs without the official checkpoint. Do not translate real images with it.

The manifest's `source` records the seed and that the weights are random (no checkpoint: `aldm
check` needs `--reference`, and `aldm bench --torch` uses random weights of the manifest's
config anyway). Prints the time the export took and the file sizes.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path


def parse_crop(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--crop wants three positive integers, got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default 0)")
    ap.add_argument("--crop", type=parse_crop, default=(144, 192, 144), help="H,W,D (default 144,192,144)")
    ap.add_argument("--steps", type=int, default=50,
                    help="DDIM steps recorded in the manifest, i.e. bench's end-to-end default (default 50; "
                         "official sampling: 200; aldm bench --steps overrides it)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta recorded in the manifest (default 1.0, "
                                                           "as official; speed does not depend on it)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    tiles = ap.add_mutually_exclusive_group()
    tiles.add_argument("--tiles", dest="tiles", action="store_true", default=None,
                       help="also export the decoder's slab graphs (export_model's default when it has them)")
    tiles.add_argument("--no-tiles", dest="tiles", action="store_false", help="whole-volume decoder only")
    args = ap.parse_args(argv)

    import torch

    from aldm.export import export_model
    from aldm.models import ALDM, LDMConfig

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = ALDM(LDMConfig()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ALDM(LDMConfig()): {n_params / 1e6:.1f} M parameters, random (seed {args.seed}); "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    source = {"random_weights": True, "seed": args.seed, "ema": False,
              "note": "seeded random weights of the official full-size architecture, for benchmarks only "
                      "(scripts/export_random_fullsize.py); no checkpoint"}
    kwargs = {}
    if args.tiles is not None:
        if "tiles" not in inspect.signature(export_model).parameters:
            print("error: this aldm's export_model has no decoder tiles", file=sys.stderr)
            return 2
        kwargs["tiles"] = args.tiles
    t1 = time.perf_counter()
    export_model(model, args.out_dir, crop_size=args.crop, steps=args.steps, eta=args.eta, strength=1.0,
                 source=source, overwrite=args.overwrite,
                 progress=lambda s: print(f"  {s} ({time.perf_counter() - t1:.0f} s)", flush=True), **kwargs)
    took = time.perf_counter() - t1
    print(f"exported to {args.out_dir} in {took:.0f} s ({took / 60:.1f} min)")
    total = 0
    for f in sorted(args.out_dir.iterdir()):
        size = f.stat().st_size
        total += size
        print(f"  {f.name:<28} {size / 2**20:10.1f} MiB")
    print(f"  {'total':<28} {total / 2**20:10.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
