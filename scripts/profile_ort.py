"""Where the time goes: ONNX Runtime's own profiler over each component of a model folder, one
call after a warm-up, aggregated by operator type; FLOPs from the graph; the fraction of this
CPU's peak each component reaches (peak = a large float32 matrix product, measured here, and the
nominal AVX-512 figure). Prints a table and writes JSON (the figures of docs/performance.md).

    python scripts/profile_ort.py src/aldm/assets/default_model --json runs/perf/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def sgemm_gflops(n: int = 3072, repeats: int = 5) -> float:
    """Measured float32 matrix-product rate: the practical compute peak of this machine."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_component(path: Path, feeds: dict, threads: int | None) -> tuple[float, dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up, unprofiled
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # the first call of a session also pays its one-time setup
        t0 = time.perf_counter()
        sess.run(None, feeds)
        wall = time.perf_counter() - t0
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    by_op: dict = defaultdict(lambda: {"us": 0, "nodes": 0})
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op]["us"] += e["dur"]
            by_op[op]["nodes"] += 1
    return wall, dict(by_op)


def main() -> None:
    from aldm.runtime.flops import graph_flops
    from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--components", default=",".join(COMPONENTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = ModelDir(args.model)
    cores = os.cpu_count() or 1
    peak_meas = sgemm_gflops()
    mhz = 0.0
    try:
        mhz = float(next(l for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        pass
    peak_nominal = cores * mhz / 1e3 * 64  # AVX-512: 2 FMA units x 16 lanes x 2 FLOPs per cycle
    result = {"model": str(args.model), "cpu": platform.processor() or platform.machine(), "cores": cores,
              "mhz": mhz, "peak_sgemm_gflops": peak_meas, "peak_nominal_gflops": peak_nominal, "components": {}}
    print(f"peak: sgemm {peak_meas:.0f} GFLOP/s measured, nominal {peak_nominal:.0f} GFLOP/s "
          f"({cores} cores x {mhz:.0f} MHz x 64 FLOP/cycle)")
    for i, c in enumerate(args.components.split(",")):
        feeds = sample_feeds(model.component(c), 1, i)
        wall, by_op = profile_component(model.component_file(c), feeds, args.threads)
        flops = graph_flops(model.component_file(c))["flops"]
        total = sum(v["us"] for v in by_op.values()) or 1
        rate = flops / wall / 1e9
        result["components"][c] = {"seconds": wall, "flops": flops, "gflops_per_s": rate,
                                   "fraction_of_sgemm_peak": rate / peak_meas,
                                   "by_op": {k: v | {"share": v["us"] / total} for k, v in
                                             sorted(by_op.items(), key=lambda kv: -kv[1]["us"])}}
        print(f"{c:<8} {wall:6.2f} s  {flops / 1e9:7.1f} GFLOP  {rate:6.1f} GFLOP/s "
              f"({100 * rate / peak_meas:.0f}% of sgemm peak)")
        for op, v in list(result["components"][c]["by_op"].items())[:8]:
            print(f"    {op:<22} {v['us'] / 1e6:6.2f} s  {100 * v['us'] / total:5.1f}%  ({v['nodes']} nodes)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
