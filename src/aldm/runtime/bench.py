"""`aldm bench`: per-component latency, end-to-end seconds per volume, peak RSS.

A benchmark prints figures (and writes JSON); it is not a test. When torch is installed the
same components run in PyTorch eager (random weights of the same architecture: speed does not
depend on the values) and the ORT / PyTorch ratio is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from aldm.runtime.backends import make_runners
from aldm.runtime import sampler as S
from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
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


def bench_model(model_dir: ModelDir, *, backend: str = "ort-cpu", threads: int | None = None,
                components: Sequence[str] = COMPONENTS, warmup: int = 1, repeats: int = 3,
                e2e_targets: Sequence[int] = (1, 3), steps: int | None = None,
                torch_reference: bool = True, torch_device: str = "cpu", torch_fp16: bool = False,
                precision: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    m = model_dir.manifest
    feeds = {c: sample_feeds(model_dir.component(c), 1, i) for i, c in enumerate(COMPONENTS)}
    runners = make_runners(model_dir, backend, threads=threads, precision=precision)
    out: dict = {"backend": backend, "precision": precision or "default", "threads": threads, "crop_size": list(m.preprocessing.crop_size),
                 "latent_shape": list(m.latent_shape), "components": {}, "end_to_end": {}}
    for c in components:
        say(f"{backend}: {c}")
        out["components"][c] = time_calls(lambda: runners[c].infer(feeds[c]), warmup, repeats)
    if e2e_targets:
        from aldm.runtime.pipeline import Pipeline

        pipe = Pipeline(model_dir, runners)
        x = sample_feeds(model_dir.component("encoder"), 1, 99)["x"]
        n_steps = steps or m.sampler.steps
        calls = S.strength_steps(n_steps, m.sampler.strength) if m.sampler.name == "ddim" else n_steps
        for n in e2e_targets:
            targets = [mod for mod in m.modalities if mod != "t1"][:n]
            say(f"{backend}: end to end, {n} target(s), {calls} UNet calls")
            t0 = time.perf_counter()
            tr = pipe.translate(x, targets, steps=n_steps, seed=0)
            out["end_to_end"][f"{n}_targets"] = {"seconds_per_volume": time.perf_counter() - t0,
                                                 "steps": n_steps, "unet_calls": calls,
                                                 "strength": m.sampler.strength, "stages_s": tr.timings}
    for r in runners.values():
        r.deactivate()
    out["peak_rss_mb"] = peak_rss_mb()
    if torch_reference:
        out["torch_eager"] = _torch_reference(model_dir, feeds, components, threads, warmup, repeats, say,
                                              torch_device, torch_fp16)
        if out["torch_eager"]:
            out["ratio_ort_over_torch"] = {
                c: out["components"][c]["median_s"] / out["torch_eager"]["components"][c]["median_s"]
                for c in components}
    return out


def _torch_reference(model_dir, feeds, components, threads, warmup, repeats, say,
                     device: str = "cpu", fp16: bool = False) -> dict | None:
    try:
        import torch

        from aldm.export.check import TorchRunner
        from aldm.models import ALDM, LDMConfig
    except ImportError:
        return None
    if threads:
        torch.set_num_threads(threads)
    cfg = model_dir.manifest.config
    model = ALDM(LDMConfig.from_dict(cfg) if cfg else LDMConfig()).eval()
    res = {"device": device, "fp16_autocast": fp16, "components": {}}
    for c in components:
        say(f"torch eager ({device}{', fp16' if fp16 else ''}): {c}")
        runner = TorchRunner(model, c, device, autocast=fp16)
        runner.activate()
        res["components"][c] = time_calls(lambda: runner.infer(feeds[c]), warmup, repeats)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def format_report(r: dict) -> str:
    lines = [f"backend {r['backend']}  threads {r['threads'] or 'default'}  crop {r['crop_size']}  "
             f"latent {r['latent_shape']}"]
    te = (r.get("torch_eager") or {}).get("components", {})
    for c, v in r["components"].items():
        line = f"  {c:<8} median {v['median_s']:.3f}s  p90 {v['p90_s']:.3f}s"
        if c in te:
            line += (f"   torch eager median {te[c]['median_s']:.3f}s  "
                     f"ratio ORT/torch {r['ratio_ort_over_torch'][c]:.2f}")
        lines.append(line)
    for k, v in r["end_to_end"].items():
        stages = ", ".join(f"{s} {t:.2f}s" for s, t in v["stages_s"].items())
        lines.append(f"  end to end, {k.replace('_', ' ').replace('1 targets', '1 target')}: {v['seconds_per_volume']:.2f} s/volume "
                     f"({v['steps']} steps, {v.get('unet_calls', v['steps'])} UNet calls; {stages})")
    lines.append(f"  peak RSS {r['peak_rss_mb']:.0f} MB" + (
        f" (after torch eager: {r['torch_eager']['peak_rss_mb']:.0f} MB)" if r.get("torch_eager") else ""))
    return "\n".join(lines)
