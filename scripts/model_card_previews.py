"""Previews of held-out cases for the model card: the source T1, then per target the bundled
model's translation beside the real scan, at the same slices (docs/previews/<case>.png).

    python scripts/model_card_previews.py ../shared/data/brats18 Brats18_2013_20_1 Brats18_TCIA03_265_1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from aldm.infer import Options, Translator, default_model_dir
from aldm.preview import preview
from aldm.runtime.pipeline import Pipeline

TARGETS = ("t2", "flair", "t1ce")


def ras(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("docs/previews"))
    a = ap.parse_args()
    translator = Translator(Pipeline.load(default_model_dir()), Options(TARGETS, seed=0))
    a.out.mkdir(parents=True, exist_ok=True)
    for case in a.cases:
        src = a.data / case / f"{case}_t1.nii.gz"
        with tempfile.TemporaryDirectory() as tmp:
            paths = translator.output_paths(src, Path(tmp))
            vol, prep = translator.load(src)
            tr = translator.compute(prep, translator.seed_for(src.name))
            translator.write(vol, prep, tr, paths, translator.seed_for(src.name), {})
            views = {"T1 (source)": ras(src)}
            for t in TARGETS:
                name = {"t2": "T2", "flair": "FLAIR", "t1ce": "T1ce"}[t]
                views[f"{name} aldm"] = ras(paths[t])
                views[f"{name} real"] = ras(a.data / case / f"{case}_{t}.nii.gz")
        png = preview(a.out / f"{case}.png", views, title=f"{case} (held out): bundled model, default settings, seed 0")
        print(png)


if __name__ == "__main__":
    main()
