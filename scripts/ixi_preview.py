#!/usr/bin/env python3
"""The model card's preview of the shipped example (IXI: healthy, another scanner, never trained on):
the T1, the bundled model's T2 and FLAIR, and the subject's real T2 resampled onto the T1 grid
through the affines (no registration). IXI may ship (CC BY-SA 3.0); BraTS previews may not.

    python scripts/ixi_preview.py ../shared/data/ixi/IXI002-Guys-0828 docs/ixi-preview.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from aldm.evaluate import resample_to_grid
from aldm.translator import Options, Translator, default_model_dir
from aldm.preview import preview
from aldm.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def main(subject: Path, out: Path) -> None:
    src = ROOT / "examples" / "IXI002-Guys-0828-T1.nii.gz"
    t1 = nib.as_closest_canonical(nib.load(str(src)))
    real = nib.load(str(subject / "IXI002-Guys-0828-T2.nii.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        res = Translator(Pipeline.load(default_model_dir()), Options(("t2", "flair"), out_dir=Path(tmp), seed=0)).run(src)
        pred = {t: np.asarray(nib.as_closest_canonical(nib.load(str(p))).get_fdata(), np.float32)
                for t, p in res.outputs.items()}
    t2_real = resample_to_grid(np.asarray(real.get_fdata(), np.float32), real.affine, t1.affine, t1.shape)
    views = {"T1 (source)": np.asarray(t1.get_fdata(), np.float32), "T2 aldm": pred["t2"],
             "T2 real": t2_real, "FLAIR aldm": pred["flair"]}
    print(preview(out, views, title="IXI002-Guys-0828 (never trained on): bundled model, default settings, seed 0"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
