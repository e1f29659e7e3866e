"""The input contract (issue 16 item 7): sources that are not skull-stripped are refused with one
line unless --no-skull-check, and slices far coarser than the model's spacing get a warning.

The rule is measured in src/aldm/skullcheck.py; here every real volume of ../shared/data is held
to it (the raw clinical T1/T2 refused, their HD-BET copies, every BraTS volume and the IXI subject
passing), and the tests' synthetic volumes pass as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aldm.errors import InputError
from aldm.nifti import load_volume
from aldm.skullcheck import MAX_NONZERO_FRACTION, coarse_slice_warning, nonzero_fraction, skull_reason
from conftest import DATA, REPO, need, synthetic_volume, write_nifti

INFER = [sys.executable, "-m", "aldm.cli.infer"]
CLINICAL = DATA / "clinical" / "TCGA-FG-6692"
EXAMPLE = REPO / "examples" / "IXI002-Guys-0828-T1.nii.gz"
COARSE = "slices are 5.5 mm apart (model: 1 mm): the output between slices is interpolated, not seen"


def _run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*INFER, *map(str, args)], capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)


def _refused(res: subprocess.CompletedProcess, name: str) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 1, out
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "skull" in lines[0] and name in lines[0] and "--no-skull-check" in lines[0], lines[0]
    return lines[0]


def _with_skull(shape=(48, 44, 24), seed=0) -> np.ndarray:
    """A synthetic 'raw scan': the brain ball inside a bright shell, scanner noise everywhere else."""
    rng = np.random.default_rng(seed)
    v = synthetic_volume(shape, seed).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r2 = (grid**2).sum(0)
    v = np.where((r2 >= 0.6) & (r2 < 0.9), 1500.0, v)
    v = np.where(v == 0, 1 + np.abs(rng.normal(0, 20, shape)), v)
    return v.astype(np.int16)


def _real_volumes() -> list[Path]:
    brats = sorted(need(DATA / "brats18").glob("*/*.nii.gz"))
    return [p for p in brats if not p.name.endswith("_seg.nii.gz")]


# ------------------------------------------------------------------------------ the rule itself

@pytest.mark.parametrize("shape", [(40, 36, 20), (48, 44, 24), (64, 64, 48), (32, 32, 16)])
def test_synthetic_test_volumes_pass(shape):
    assert skull_reason(synthetic_volume(shape)) is None


def test_a_brain_cropped_tight_to_its_box_passes():
    v = synthetic_volume((64, 64, 48))
    idx = np.nonzero(v)
    tight = v[tuple(slice(i.min(), i.max() + 1) for i in idx)]
    assert nonzero_fraction(tight) > 0.45
    assert skull_reason(tight) is None


def test_skull_and_noise_are_refused_with_the_reason():
    why = skull_reason(_with_skull())
    assert why is not None and "\n" not in why
    assert "skull" in why and "HD-BET" in why and "--no-skull-check" in why
    assert f"< {100 * MAX_NONZERO_FRACTION:.0f} %" in why


def test_all_brats_volumes_pass():
    vols = _real_volumes()
    assert len(vols) >= 19 * 4, len(vols)
    fracs = {}
    for p in vols:
        data = load_volume(p).data
        fracs[p.name] = nonzero_fraction(data)
        assert skull_reason(data) is None, (p.name, fracs[p.name])
    assert max(fracs.values()) < MAX_NONZERO_FRACTION / 2, fracs  # the margin the module documents


@pytest.mark.parametrize("name", ["ixi/IXI002-Guys-0828/IXI002-Guys-0828-T1.nii.gz",
                                  "ixi/IXI002-Guys-0828/IXI002-Guys-0828-T2.nii.gz",
                                  "clinical/TCGA-FG-6692/TCGA-FG-6692_t1_hdbet.nii.gz",
                                  "clinical/TCGA-FG-6692/TCGA-FG-6692_t2_hdbet.nii.gz"])
def test_stripped_real_volumes_pass(name):
    data = load_volume(need(DATA / name)).data
    assert skull_reason(data) is None, nonzero_fraction(data)


def test_the_bundled_example_passes():
    assert skull_reason(load_volume(EXAMPLE).data) is None


@pytest.mark.parametrize("mod", ["t1", "t2"])
def test_raw_clinical_volumes_are_flagged(mod):
    data = load_volume(need(CLINICAL / f"TCGA-FG-6692_{mod}_raw.nii.gz")).data
    assert nonzero_fraction(data) > 0.95
    assert "skull" in skull_reason(data)


# ------------------------------------------------------------------------------ coarse slices

def test_coarse_slice_warning_names_the_slice_spacing():
    aff = np.diag([0.9, 0.9, 5.5, 1.0])
    assert coarse_slice_warning(aff, (1.0, 1.0, 1.0)) == COARSE
    for fine in (np.eye(4), np.diag([1.2, 0.94, 0.94, 1]), np.diag([0.94, 0.94, 1.25, 1]), np.diag([2, 2, 2, 1])):
        assert coarse_slice_warning(fine, (1.0, 1.0, 1.0)) is None


def test_coarse_slice_warning_follows_the_axes_to_ras():
    # voxel axis 0 is 5.5 mm and points along S: compared with the model's S spacing
    aff = np.array([[0, 0, -0.9, 100], [0, 0.9, 0, -100], [5.5, 0, 0, -50], [0, 0, 0, 1]])
    assert coarse_slice_warning(aff, (1.0, 1.0, 3.0)) is None
    assert coarse_slice_warning(aff, (3.0, 3.0, 1.0)) == COARSE


# ------------------------------------------------------------------------------ through aldm-infer

@pytest.mark.parametrize("mod", ["t1", "t2"])
def test_raw_clinical_scan_is_refused_by_the_cli(tmp_path, mod):
    """The issue's case, with the bundled default model: one error line, exit 1, nothing written."""
    src = need(CLINICAL / f"TCGA-FG-6692_{mod}_raw.nii.gz")
    target = "t1ce" if mod == "t1" else "flair"
    res = _run(src, "--source-modality", mod, "--targets", target, "--quiet", "--out", tmp_path / "out")
    _refused(res, src.name)
    assert not list((tmp_path / "out").rglob("*"))


def test_raw_t1_goes_through_with_no_skull_check_and_warns_of_coarse_slices(tiny_export, tmp_path):
    src = need(CLINICAL / "TCGA-FG-6692_t1_raw.nii.gz")
    res = _run(src, "--targets", "t2", "--quiet", "--out", tmp_path, "--model", tiny_export,
               "--steps", 5, "--seed", 0, "--no-skull-check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"warning: {src.name}: {COARSE}" in res.stderr.splitlines(), res.stderr
    side = json.loads((tmp_path / "TCGA-FG-6692_t1_raw_t2.json").read_text())
    assert COARSE in side["warnings"]  # the sidecar keeps it too


def test_synthetic_scan_with_skull_refused_then_allowed(tiny_export, tmp_path):
    """The same contract without ../shared: a noisy 'raw' volume is refused, passes with the flag."""
    src = write_nifti(tmp_path / "raw.nii.gz", _with_skull())
    _refused(_run(src, "--targets", "t2", "--quiet", "--out", tmp_path / "a", "--model", tiny_export), src.name)
    assert not (tmp_path / "a" / "raw_t2.nii.gz").exists()
    res = _run(src, "--targets", "t2", "--quiet", "--out", tmp_path / "b", "--model", tiny_export,
               "--steps", 5, "--seed", 0, "--no-skull-check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "b" / "raw_t2.nii.gz").is_file()


def test_translator_refuses_with_an_input_error_unless_the_option_is_off(tiny_export, tmp_path):
    import dataclasses

    from aldm.translator import Options, Translator
    from aldm.runtime.pipeline import Pipeline

    src = write_nifti(tmp_path / "raw.nii.gz", _with_skull())
    pipeline = Pipeline.load(tiny_export)
    with pytest.raises(InputError, match="skull"):
        Translator(pipeline, Options(("t2",))).load(src)
    opts = Options(("t2",), skull_check=False)
    assert Options(**dataclasses.asdict(opts)) == opts  # the Ray batch worker rebuilds it from a dict
    vol, prep = Translator(pipeline, opts).load(src)
    assert prep.x.shape[0] == 1 and not any("slices are" in w for w in prep.warnings)
