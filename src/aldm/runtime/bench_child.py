"""The parts of `aldm bench` that run in a process of their own, so that their memory is theirs:

* ``torch`` (aldm.export.bench_torch, which holds the models: the runtime does not import them):
  PyTorch eager timings of the components (random weights of the manifest's architecture).
  torch's weights, allocator and thread pools would otherwise raise the peak RSS reported for the
  ONNX / engine path.
* ``e2e``: one end-to-end translation in a fresh process that only loads the pipeline and
  translates: its peak RSS is what a user's `aldm-infer` process needs.

Run as ``python -m aldm.runtime.bench_child KIND CONFIG_JSON OUT_JSON``; the result (or
{"error": ...}) is written to OUT_JSON, progress goes to stderr. `run_child` is the parent's side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM of /proc/self/status on Linux (the
    high-water mark of this program's own memory since its exec). getrusage's ru_maxrss is the
    fallback only: Linux carries it across fork + exec, so a child started by a big parent would
    report at least the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def run_child(kind: str, config: dict, *, timeout: float | None = None,
              module: str = "aldm.runtime.bench_child") -> dict:
    """Run `kind` of `module` (a program with this module's `main`) in a fresh interpreter; its
    result dict, or {"error": ...} when it failed."""
    import aldm

    env = dict(os.environ)  # the child imports the same aldm as this process
    src = str(Path(aldm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="aldm-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, kind, json.dumps(config), str(out)]
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"{kind} child process ran past {timeout:.0f} s"}
        if out.exists():
            try:
                res = json.loads(out.read_text())
            except ValueError:
                res = {"error": f"{kind} child process wrote unreadable JSON"}
            if proc.returncode and "error" not in res:
                res["error"] = f"{kind} child process exited with code {proc.returncode}"
            return res
        why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        return {"error": f"{kind} child process {why} without a result"}


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    import statistics

    import numpy as np

    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    runs.sort()
    p90 = runs[min(len(runs) - 1, int(np.ceil(0.9 * len(runs))) - 1)]
    return {"median_s": statistics.median(runs), "p90_s": p90, "runs": len(runs)}


def component_feeds(model_dir: ModelDir, component: str) -> dict:
    """The batch-1 feeds `aldm bench` times a component with (the same in every process)."""
    return sample_feeds(model_dir.component(component), 1, COMPONENTS.index(component))


def fresh_translation(cfg: dict) -> dict:
    """cfg: model_dir, backend, threads, precision, targets (count), steps. Loads the pipeline and
    translates one volume into that many targets, nothing else."""
    from aldm.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(cfg["model_dir"], backend=cfg.get("backend", "ort-cpu"), threads=cfg.get("threads"),
                         precision=cfg.get("precision"), tile_rows=cfg.get("tile_rows", 0),
                         step_graph=cfg.get("step_graph", "auto"))
    m = pipe.manifest
    x = sample_feeds(m.components["encoder"], 1, 99)["x"]
    targets = [mod for mod in m.modalities if mod != "t1"][: int(cfg["targets"])]
    t1 = time.perf_counter()
    print(f"fresh process: end to end, {len(targets)} target(s)", file=sys.stderr, flush=True)
    tr = pipe.translate(x, targets, steps=cfg.get("steps"), seed=0)
    t2 = time.perf_counter()
    pipe.close()
    return {"pid": os.getpid(), "targets": targets, "load_s": t1 - t0, "seconds_per_volume": t2 - t1,
            "stages_s": tr.timings, "peak_rss_mb": peak_rss_mb()}


KINDS = {"e2e": fresh_translation}


def main(argv: list[str], kinds: dict[str, Callable[[dict], dict]] = KINDS) -> int:
    kind, config, out = argv
    try:
        res = kinds[kind](json.loads(config))
        code = 0
    except Exception as exc:  # reported to the parent, which carries on with its other figures
        res, code = {"error": f"{type(exc).__name__}: {exc}", "peak_rss_mb": peak_rss_mb()}, 1
    Path(out).write_text(json.dumps(res))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
