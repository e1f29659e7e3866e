"""Previews of held-out cases: the source T1, then per target the bundled model's translation
beside the real scan, at the same slices (RUN/<case>.png; not shipped: BraTS images stay out of
the repository).

    python scripts/model_card_previews.py ../shared/data/brats18 Brats18_2013_20_1 Brats18_TCIA03_265_1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from aldm.translator import Options, Translator, default_model_dir
from aldm.preview import label, preview
from aldm.runtime.pipeline import Pipeline

TARGETS = ("t2", "flair", "t1ce")


def ras(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("runs/previews"))
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled one)")
    ap.add_argument("--strength", type=float, default=None, help="sampler strength (default: the model's)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        translator = Translator(Pipeline.load(a.model or default_model_dir()),
                                Options(TARGETS, out_dir=Path(tmp), seed=0, strength=a.strength))
        what = f"{'bundled model' if a.model is None else a.model.name}, " + (
            "default settings" if a.strength is None else f"strength {a.strength:g}")
        for case in a.cases:
            src = a.data / case / f"{case}_t1.nii.gz"
            res = translator.run(src)
            views = {"T1 (source)": ras(src)}
            for t in TARGETS:
                views[f"{label(t)} aldm"] = ras(res.outputs[t])
                views[f"{label(t)} real"] = ras(a.data / case / f"{case}_{t}.nii.gz")
            suffix = "" if a.strength is None else f"_s{a.strength:g}"
            print(preview(a.out / f"{case}{suffix}.png", views, title=f"{case} (held out): {what}, seed 0"))


if __name__ == "__main__":
    main()
