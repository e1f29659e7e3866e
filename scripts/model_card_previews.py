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

from aldm.infer import Options, Translator, default_model_dir
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
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        translator = Translator(Pipeline.load(default_model_dir()), Options(TARGETS, out_dir=Path(tmp), seed=0))
        for case in a.cases:
            src = a.data / case / f"{case}_t1.nii.gz"
            res = translator.run(src)
            views = {"T1 (source)": ras(src)}
            for t in TARGETS:
                views[f"{label(t)} aldm"] = ras(res.outputs[t])
                views[f"{label(t)} real"] = ras(a.data / case / f"{case}_{t}.nii.gz")
            print(preview(a.out / f"{case}.png", views,
                          title=f"{case} (held out): bundled model, default settings, seed 0"))


if __name__ == "__main__":
    main()
