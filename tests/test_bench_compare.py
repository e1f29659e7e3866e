"""scripts/compare_bench.py on two hand-made `aldm bench --json` files, run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "compare_bench.py"

OLD = {  # an older JSON: no meta, no GFLOP/s, no fresh-process figure
    "backend": "ort-cpu", "precision": "default", "threads": None, "crop_size": [144, 192, 144],
    "components": {"encoder": {"median_s": 4.0, "p90_s": 4.2, "runs": 3},
                   "unet": {"median_s": 1.5, "p90_s": 1.6, "runs": 3}},
    "end_to_end": {"3_targets": {"seconds_per_volume": 90.0, "steps": 25, "unet_calls": 25,
                                 "stages_s": {}}},
    "peak_rss_mb": 6100.0,
    "torch_eager": {"components": {"encoder": {"median_s": 8.0}, "unet": {"median_s": 3.0}},
                    "peak_rss_mb": 7000.0},
    "ratio_ort_over_torch": {"encoder": 0.5, "unet": 0.5},
}

NEW = {
    "meta": {"aldm": "0.2.0", "git_commit": "0123456789abcdef", "backend_versions": {"onnxruntime": "1.32.0"},
             "cpu": "Test CPU", "cpu_count": 2, "date": "2026-12-01T00:00:00+00:00"},
    "backend": "ort-cpu", "precision": "default", "threads": None, "crop_size": [144, 192, 144],
    "components": {"encoder": {"median_s": 2.0, "p90_s": 2.1, "runs": 3, "gflop_per_s": 1159.2},
                   "unet": {"median_s": 1.2, "p90_s": 1.3, "runs": 3, "gflop_per_s": 624.2},
                   "decoder": {"median_s": 10.0, "p90_s": 10.5, "runs": 3, "gflop_per_s": 574.8}},
    "end_to_end": {"3_targets": {"seconds_per_volume": 60.0, "steps": 25, "unet_calls": 25, "stages_s": {},
                                 "gflop_per_s": 700.0, "peak_rss_mb": 2500.0,
                                 "fresh_process": {"peak_rss_mb": 2500.0}}},
    "peak_rss_mb": 3000.0,
    "torch_eager": {"components": {"encoder": {"median_s": 8.0}, "unet": {"median_s": 3.0}},
                    "peak_rss_mb": 7100.0},
    "ratio_ort_over_torch": {"encoder": 0.25, "unet": 0.4},
}


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return line[len(start):].split()


def test_compare_prints_old_new_speedup_gflops_and_rss(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(OLD))
    b.write_text(json.dumps(NEW))
    res = run(a, b)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert row(out, "encoder") == ["4.000", "2.000", "2.00x", "-", "1159"]
    assert row(out, "unet") == ["1.500", "1.200", "1.25x", "-", "624.2"]
    assert row(out, "decoder") == ["-", "10.000", "-", "-", "574.8"]  # only in B
    assert row(out, "end to end, 3 targets") == ["90.00", "60.00", "1.50x", "-", "700"]
    assert row(out, "engine path (bench process)") == ["6100", "3000"]
    assert row(out, "fresh process, 3 targets") == ["-", "2500"]
    assert row(out, "torch eager process") == ["7000", "7100"]
    assert "0123456789" in out and "Test CPU" in out  # B's meta; A has none and still prints


def test_compare_same_file_is_speedup_one(tmp_path):
    b = tmp_path / "b.json"
    b.write_text(json.dumps(NEW))
    res = run(b, b)
    assert res.returncode == 0
    assert row(res.stdout, "encoder")[2] == "1.00x"


def test_compare_unreadable_file(tmp_path):
    res = run(tmp_path / "nope.json", tmp_path / "nope.json")
    assert res.returncode == 2 and "error" in res.stderr
