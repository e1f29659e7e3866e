"""scripts/gpu_check.sh end to end on the CPU in its dry-run mode (issue 19 item 4): the same code
path the lent GPU runs (tiny model, tiny crop, no CUDA), in a subprocess as the device machine
runs it, so the first lent GPU does not find a typo. Needs no ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("encoder", "spade", "unet", "decoder")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_the_dry_run_finishes_and_writes_what_comes_back(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["console.txt", "gpu_check.json", "gpu_check_summary.txt"]  # the device returns 8 at most
    assert "TensorRT part not run: dry run" in proc.stdout


def test_the_report_holds_sane_numbers(dry_run):
    _, out = dry_run
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["errors"] == {} and r["skipped"] == {}, (r["errors"], r["skipped"])
    assert r["mode"].startswith("dry-run") and r["config"]["steps"] == 4
    assert r["env"]["device"] == "cpu"
    # what it could not run, said plainly
    names = {n["name"]: n["why"] for n in r["not_run"]}
    assert {"tensorrt", "ort-cuda"} <= set(names) and all("not installed" in w for w in names.values())
    # FLOPs: positive per component, and e2e is their sum over the translation
    fl = r["flops"]
    assert all(fl[c] > 0 for c in COMPONENTS)
    assert fl["e2e"] == fl["encoder"] + fl["spade"] + 4 * fl["unet"] + 2 * fl["decoder"]
    # times: positive everywhere, per component and end to end, for both paths
    for who in ("peer", "ours"):
        for c in COMPONENTS:
            t = r[who]["components"][c]
            assert 0 < t["min_s"] <= t["mean_s"] <= t["max_s"] and t["n"] >= 1
        e = r[who]["e2e"]
        assert 0 < e["min_s"] <= e["mean_s"] and e["peak_gpu_gb"] is None  # no GPU memory on a CPU
    st = r["ours"]["e2e"]["stages_s"]
    assert set(st) == {"encode", "spade", "sample", "decode"} and all(v > 0 for v in st.values())
    assert r["ours"]["e2e"]["sample_per_step_s"] == pytest.approx(st["sample"] / 4)
    assert r["peer"]["sample_per_step_s"] > 0
    for key in ("ours_numpy_loop", "ours_device_noise"):
        assert r[key]["e2e"]["mean_s"] > 0
    # ratio = peer / ours
    ratio = r["ratio"]
    assert ratio["e2e"] == pytest.approx(r["peer"]["e2e"]["mean_s"] / r["ours"]["e2e"]["mean_s"])
    assert ratio["sample_per_step"] == pytest.approx(r["peer"]["sample_per_step_s"]
                                                     / r["ours"]["e2e"]["sample_per_step_s"])
    for c in COMPONENTS:
        assert ratio[f"component_{c}"] == pytest.approx(r["peer"]["components"][c]["mean_s"]
                                                        / r["ours"]["components"][c]["mean_s"])
    # fraction of peak: achieved = FLOPs / time, against the measured ceilings (no datasheet for a CPU)
    m = r["peak"]["measured_matmul_tflops"]
    assert all(v > 0 for v in m.values())
    assert r["peak"]["datasheet"]["fp16_tensor_tflops"] == 989.5
    fr = r["fraction_of_peak"]
    u = fr["ours"]["unet"]
    assert u["tflops"] == pytest.approx(fl["unet"] / r["ours"]["components"]["unet"]["mean_s"] / 1e12)
    assert u["of_measured_fp16_matmul"] == pytest.approx(u["tflops"] / m["fp16"])
    assert not any(k.startswith("of_datasheet") for k in u)
    summary = (out / "gpu_check_summary.txt").read_text()
    assert "NOT RUN: tensorrt" in summary and "NOT RUN: ort-cuda" in summary and "end to end" in summary


def test_a_bad_step_count_is_one_line_before_any_work(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--steps", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: 3 DDIM steps is not a valid count" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
