"""`aldm bench` on the tiny export: GFLOP/s from the graphs' FLOPs, peak RSS per process (engine
path here, torch eager and one fresh translation in processes of their own), the meta block."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("onnx")

BALLAST_MB = 512


@pytest.fixture(scope="module")
def bench_result(tiny_export):
    """One bench run with everything on: 2 DDIM steps, one timed call per component. This
    process holds BALLAST_MB of extra memory meanwhile, which a child must not report."""
    from aldm.runtime.bench import bench_model
    from aldm.runtime.manifest import ModelDir

    ballast = np.ones(BALLAST_MB * 2**20 // 8)  # touched: resident
    res = bench_model(ModelDir(tiny_export), warmup=0, repeats=1, e2e_targets=(1, 3), steps=2,
                      torch_reference=True, fresh_process=True)
    del ballast
    return res


def test_gflops_per_second_is_graph_flops_over_median(bench_result, tiny_export):
    from aldm.runtime.flops import graph_flops

    r = bench_result
    assert r["flops_convention"].startswith("FLOPs = 2 x multiply-accumulates")
    for c, v in r["components"].items():
        flops = graph_flops(tiny_export / f"{c}.onnx")["flops"]
        assert r["flops"][c]["flops"] == flops > 0
        assert r["flops"][c]["macs"] * 2 == flops
        assert v["gflop"] == pytest.approx(flops / 1e9, rel=1e-12)
        assert v["gflop_per_s"] == pytest.approx(flops / v["median_s"] / 1e9, rel=1e-12)
        te = r["torch_eager"]["components"][c]
        assert te["gflop_per_s"] == pytest.approx(flops / te["median_s"] / 1e9, rel=1e-12)
        assert r["ratio_ort_over_torch"][c] == pytest.approx(v["median_s"] / te["median_s"])
    f = {c: r["flops"][c]["flops"] for c in r["flops"]}
    for key, v in r["end_to_end"].items():
        n, calls = v["targets"], v["unet_calls"]
        assert n == int(key.split("_")[0]) and calls == 2
        total = f["encoder"] + n * (f["spade"] + f["decoder"] + calls * f["unet"])
        assert v["gflop_per_s"] == pytest.approx(total / v["seconds_per_volume"] / 1e9, rel=1e-12)


def test_torch_eager_and_fresh_translation_report_their_own_processes(bench_result):
    r = bench_result
    te = r["torch_eager"]
    assert "error" not in te, te
    fresh = r["end_to_end"]["3_targets"]["fresh_process"]
    assert "error" not in fresh, fresh
    assert len({os.getpid(), te["pid"], fresh["pid"]}) == 3  # three processes
    assert fresh["targets"] == ["t1ce", "t2", "flair"]
    assert r["end_to_end"]["3_targets"]["peak_rss_mb"] == fresh["peak_rss_mb"] > 0
    assert "peak_rss_mb" not in r["end_to_end"]["1_targets"]
    # This process held BALLAST_MB more than it needed; each child reports its own peak, not
    # one inherited from its parent (Linux carries ru_maxrss across fork + exec).
    assert r["peak_rss_mb"] > BALLAST_MB
    assert fresh["peak_rss_mb"] < r["peak_rss_mb"] - BALLAST_MB / 2
    assert 0 < te["peak_rss_mb"] < r["peak_rss_mb"] - BALLAST_MB / 2


def test_meta_block(bench_result):
    import onnxruntime

    import aldm

    meta = bench_result["meta"]
    assert meta["aldm"] == aldm.__version__
    assert meta["backend"] == "ort-cpu"
    assert meta["backend_versions"]["onnxruntime"] == onnxruntime.__version__
    assert meta["cpu"] and meta["cpu_count"] == os.cpu_count()
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if git.returncode == 0:
        assert meta["git_commit"] == git.stdout.strip()


def test_report_table(bench_result):
    from aldm.runtime.bench import format_report

    text = format_report(bench_result)
    assert "GFLOP/s" in text
    header = next(line for line in text.splitlines() if "GFLOP/s" in line and "median s" in line)
    enc = next(line for line in text.splitlines() if line.strip().startswith("encoder"))
    assert f"{bench_result['components']['encoder']['gflop_per_s']:.4g}" in enc
    assert "torch s" in header
    assert "peak RSS, engine path (this process)" in text
    assert "peak RSS, one translation (3 targets) in a fresh process" in text
    assert "peak RSS, torch eager (its own process)" in text
    assert "1 MAC = 2 FLOPs" in text


def test_without_onnx_no_gflops_and_a_note(tiny_export, monkeypatch):
    from aldm.runtime.bench import bench_model, format_report
    from aldm.runtime.manifest import ModelDir

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    r = bench_model(ModelDir(tiny_export), warmup=0, repeats=1, e2e_targets=(1,), steps=2,
                    torch_reference=False, fresh_process=False)
    assert r["flops"] is None and "onnx" in r["flops_note"]
    assert all("gflop_per_s" not in v for v in r["components"].values())
    assert "gflop_per_s" not in r["end_to_end"]["1_targets"]
    assert "torch_eager" not in r
    text = format_report(r)
    assert "no GFLOP/s" in text and "onnx" in text


def test_child_failure_is_reported_not_raised(tmp_path):
    from aldm.runtime.bench_child import run_child

    res = run_child("e2e", {"model_dir": str(tmp_path / "missing"), "targets": 3})
    assert "error" in res and "missing" in res["error"]


def test_cli_writes_table_and_json(tiny_export, tmp_path):
    from typer.testing import CliRunner

    from aldm.cli.main import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_export), "--repeats", "1", "--warmup", "0", "--no-e2e",
                                   "--no-torch", "--components", "unet", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "GFLOP/s" in res.output
    r = json.loads(out.read_text())
    assert set(r["components"]) == {"unet"} and r["components"]["unet"]["gflop_per_s"] > 0
    assert set(r["flops"]) == {"encoder", "spade", "unet", "decoder"}
    assert "meta" in r and "torch_eager" not in r and r["peak_rss_mb"] > 0
