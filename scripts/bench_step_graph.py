"""The DDIM loop through the sampler-step graph (one UNet + update call per step) against the numpy
loop (UNet call, then the numpy update), on the same model, backend, inputs and noise, in one
process: the measurement behind `Pipeline`'s CPU default (aldm.runtime.pipeline.STEP_GRAPH_AUTO).

The model is the bundled one (format 3, no step graph) copied to a temporary folder with the step
graph added (aldm.export.step_graph.add_step_graph), unless --model names a folder that has one.
Each repeat runs both loops back to back, alternating which goes first; the median per loop is
reported, and the median of each repeat's ratio (its two runs saw the same load), with the two
results' largest difference relative to the numpy loop's.

    nice -n 15 python scripts/bench_step_graph.py --backends ort-cpu,ov-cpu --targets 1 --steps 5 \
        --repeats 7 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from aldm.runtime import sampler as S
    from aldm.runtime.manifest import ModelDir, sample_feeds
    from aldm.runtime.pipeline import Pipeline
    from aldm.translator import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a folder with the step graph (default: the "
                    "bundled model + the step graph, in a temporary copy)")
    ap.add_argument("--backends", default="ort-cpu,ov-cpu")
    ap.add_argument("--targets", type=int, default=1, help="rows per UNet call (targets x 1 source)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--eta", type=float, default=1.0, help="1: a noise draw per step (the update's every term)")
    ap.add_argument("--repeats", type=int, default=7, help="short loops, alternating, so that a busy "
                    "machine's swings fall on both")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tmp = None
    model = args.model
    if model is None:
        from aldm.export.step_graph import add_step_graph

        tmp = Path(tempfile.mkdtemp(prefix="aldm-step-bench-"))
        model = tmp / "model"
        shutil.copytree(default_model_dir(), model)
        add_step_graph(model)
    try:
        md = ModelDir(model)
        feeds = sample_feeds(md.component("unet"), batch=args.targets, seed=0)
        c, y = feeds["c_concat"], feeds["y"]
        sched = S.ddim_schedule(md.schedule()["alphas_cumprod"], args.steps, args.eta)
        x_T = np.random.default_rng(1).standard_normal(feeds["x_t"].shape, dtype=np.float32)
        coefs = S.ddim_coefficients(sched)
        report = {"model": str(args.model or "bundled + step graph"), "targets": args.targets,
                  "steps": args.steps, "eta": args.eta, "repeats": args.repeats, "backends": {}}
        for backend in args.backends.split(","):
            pipes = {mode: Pipeline.load(model, backend=backend, threads=args.threads, verify=False,
                                         tile_rows=0, step_graph=mode) for mode in ("off", "on")}

            def run(mode: str, steps_sched=sched) -> tuple[float, np.ndarray]:
                noise = S.gaussian_noise(np.random.default_rng(2))
                t0 = time.perf_counter()
                z = pipes[mode].ddim(c, y, x_T, steps_sched, noise)
                return time.perf_counter() - t0, z

            warm = S.ddim_schedule(md.schedule()["alphas_cumprod"], 2, args.eta)
            for mode in pipes:  # sessions built, OpenVINO compiled for these shapes
                run(mode, warm)
            times: dict[str, list[float]] = {"off": [], "on": []}
            results = {}
            for r in range(args.repeats):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    s, results[mode] = run(mode)
                    times[mode].append(s)
            diff = float(np.abs(results["on"] - results["off"]).max() / np.abs(results["off"]).max())
            eps = np.zeros_like(x_T)
            update_s = statistics.median(_time(lambda: S.ddim_update(x_T, eps, coefs[0], x_T)) for _ in range(20))
            med = {m: statistics.median(v) for m, v in times.items()}
            pairs = statistics.median(a / b for a, b in zip(times["on"], times["off"]))  # same repeat: same load
            report["backends"][backend] = {
                "numpy_loop_s": times["off"], "step_graph_s": times["on"],
                "numpy_loop_median_s": med["off"], "step_graph_median_s": med["on"],
                "step_graph_over_numpy": med["on"] / med["off"], "median_pair_ratio": pairs, "max_rel_diff": diff,
                "numpy_update_s": update_s}
            print(f"{backend}: {args.steps} steps x {args.targets} rows: numpy loop {med['off']:.2f} s "
                  f"({med['off'] / args.steps * 1e3:.0f} ms/step), step graph {med['on']:.2f} s "
                  f"({med['on'] / args.steps * 1e3:.0f} ms/step), ratio {med['on'] / med['off']:.3f} "
                  f"(median of the repeats' ratios {pairs:.3f}); "
                  f"runs {', '.join(f'{t:.2f}' for t in times['off'])} / {', '.join(f'{t:.2f}' for t in times['on'])}; "
                  f"results differ by {diff:.1e} (max relative); the numpy update alone {update_s * 1e3:.1f} ms",
                  flush=True)
            for p in pipes.values():
                p.close()
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
