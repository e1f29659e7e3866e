#!/usr/bin/env python3
"""Pack the frozen VQ-GAN's code indices of the training cases into gpu_pack/ (issue 16 item 3).

Stages 2 and 3 need only the quantized latents of the training volumes, and those are codebook
indices: 36x48x36 uint16 = 124 KB per volume. This script preprocesses every TRAINING case as
`aldm train` does (aldm.training.data.prepare_case: the inference preprocessing, all modalities
on the T1's grid), encodes each modality (and, with --flips, its left-right mirror, as the CPU
training did) through the bundled encoder graph with onnxruntime, checks that every latent vector
is exactly a codebook row (the round trip codes -> vectors reproduces the encoder output bit for
bit), and writes the pack (aldm.training.pack: codes.npz, first_stage.ckpt, pack.json).

Held out, never read: the bundled model's three validation cases (docs/model-card.md:
Brats18_2013_20_1, Brats18_TCIA01_201_1, Brats18_TCIA03_265_1) and, of the cases added since,
Brats18_TCIA01_499_1 (the 4th validation case). --val-cases replaces the list.

    python scripts/pack_codes.py [--data ../shared/data/brats18] [--out gpu_pack] [--no-flips]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from aldm import MODALITIES  # noqa: E402
from aldm.runtime.manifest import Preprocessing  # noqa: E402
from aldm.training import pack  # noqa: E402
from aldm.training.data import find_cases, prepare_case, split  # noqa: E402

HELD_OUT = ("Brats18_2013_20_1", "Brats18_TCIA01_201_1", "Brats18_TCIA03_265_1", "Brats18_TCIA01_499_1")
MODEL = ROOT / "src" / "aldm" / "assets" / "default_model"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brats18")
    ap.add_argument("--model", type=Path, default=MODEL, help="model folder whose encoder.onnx encodes")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_pack")
    ap.add_argument("--val-cases", default=",".join(HELD_OUT), help="comma-separated held-out cases")
    ap.add_argument("--no-flips", action="store_true", help="no left-right mirrored copies")
    ap.add_argument("--limit", type=int, default=None, help="pack only the first N training cases (tests)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    config, weights = pack.onnx_first_stage(args.model)
    codebook = weights["quantize.embedding.weight"].astype(np.float32)
    import json

    manifest = json.loads((args.model / "manifest.json").read_text())
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in manifest["preprocessing"].items()})
    held = [c for c in args.val_cases.split(",") if c]
    train, val = split(find_cases(args.data), held)
    missing = sorted(set(held) - {c.name for c in val})
    if missing:
        print(f"note: held-out cases not in {args.data}: {', '.join(missing)}", file=sys.stderr)
    if args.limit:
        train = train[: args.limit]
    print(f"{len(train)} training cases; held out (never read): {', '.join(c.name for c in val)}")

    so = ort.SessionOptions()
    if args.threads:
        so.intra_op_num_threads = args.threads
    enc_file = args.model / manifest["components"]["encoder"]["file"]
    sess = ort.InferenceSession(str(enc_file), so, providers=["CPUExecutionProvider"])
    x_name, zq_name = sess.get_inputs()[0].name, "z_q"

    codes, cases, flipped = [], [], []
    t0 = time.monotonic()
    for case in train:
        vols, _ = prepare_case(case, pre)  # (4, H, W, D) float32
        vols = vols.astype(np.float16).astype(np.float32)  # exactly what `aldm train` caches and encodes
        for flip in (False,) if args.no_flips else (False, True):
            v = vols[:, ::-1] if flip else vols  # axis 0 of the volume is left-right (RAS)
            per_mod = []
            for m in range(len(MODALITIES)):
                z_q = sess.run([zq_name], {x_name: np.ascontiguousarray(v[m][None, None])})[0][0]
                per_mod.append(pack.codes_of(z_q, codebook))  # raises unless the round trip is exact
            codes.append(np.stack(per_mod))
            cases.append(case.name)
            flipped.append(flip)
        print(f"  {case.name}: {time.monotonic() - t0:.0f} s", flush=True)

    try:  # the frozen VQ-GAN is read back from the model folder's graphs (pack.first_stage)
        model = str(args.model.resolve().relative_to(ROOT))
    except ValueError:
        model = str(args.model.resolve())
    dec_file = args.model / manifest["components"]["decoder"]["file"]
    info = pack.write_pack(args.out, codes=np.stack(codes), codebook=codebook, cases=cases, flipped=flipped,
                           modalities=list(MODALITIES), config=config,
                           meta={"data": str(args.data), "model": model, "encoder": enc_file.name,
                                 "encoder_sha256": pack.sha256(enc_file),
                                 "model_sha256": {f.name: pack.sha256(f) for f in (enc_file, dec_file)},
                                 "held_out": [c.name for c in val],
                                 "held_out_asked": held, "flips": not args.no_flips,
                                 "preprocessing": manifest["preprocessing"],
                                 "round_trip": "every latent vector is exactly its codebook row"})
    print(f"wrote {args.out}: {info['volumes']} volumes of {len(info['cases'])} cases, "
          f"scale_factor {info['scale_factor']:.6f}, bytes {info['bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
