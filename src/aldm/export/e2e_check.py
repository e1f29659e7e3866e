"""End-to-end agreement of a reduced-precision translation with FP32 (`aldm check --e2e`): the
same sources translated at both precisions with the same seed, PSNR inside the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from aldm.runtime.compare import E2E_MIN_PSNR, E2EResult, psnr


def e2e_precision(model_dir, sources: Sequence[str | Path], precision: str, *, backend: str = "ort-cpu",
                  targets: Sequence[str] = ("t2", "flair"), steps: int | None = None, seed: int = 0,
                  say=print) -> list[E2EResult]:
    """Translate each source at FP32 and at `precision` with the same seed; PSNR of the two
    outputs (model grid, intensities mapped to [0, 1]) inside the source's foreground."""
    from aldm.nifti import load_volume
    from aldm.preprocess import preprocess
    from aldm.runtime.pipeline import Pipeline

    ref = Pipeline.load(model_dir, backend="ort-cpu", precision="fp32")
    low = Pipeline.load(model_dir, backend=backend, precision=precision)
    out = []
    for src in sources:
        vol = load_volume(src)
        prep = preprocess(vol.data, vol.affine, ref.manifest.preprocessing)
        mask = prep.x[0, 0] > prep.x.min() + 1e-6  # model-grid foreground (background maps to the minimum)
        say(f"{Path(src).name}: fp32 and {precision} translations")
        a = ref.translate(prep.x, list(targets), steps=steps, seed=seed)
        b = low.translate(prep.x, list(targets), steps=steps, seed=seed)
        for t in targets:
            ua = np.clip((a.volumes[t][0, 0] + 1) / 2, 0, 1)
            ub = np.clip((b.volumes[t][0, 0] + 1) / 2, 0, 1)
            out.append(E2EResult(Path(src).name, t, precision, psnr(ub, ua, mask), E2E_MIN_PSNR[precision]))
    return out
