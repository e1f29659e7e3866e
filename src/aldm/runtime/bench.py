"""`aldm bench`: per-component latency and GFLOP/s, end-to-end seconds per volume, peak RSS.

A benchmark prints figures (and writes JSON); it is not a test. Memory is measured where it
belongs: `peak_rss_mb` is this process's (the engine path: every component timed, then the
end-to-end runs); the PyTorch eager reference (random weights of the same architecture: speed
does not depend on the values) runs in a process of its own and reports its own peak; and one
end-to-end translation runs in a fresh process that only loads the pipeline and translates,
which is the peak a user's translation needs. GFLOP/s = the FLOPs counted from the component's
ONNX graph (aldm.runtime.flops; 1 MAC = 2 FLOPs, batch 1) / the median seconds.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from aldm.runtime import sampler as S
from aldm.runtime.tiled import DEFAULT_TILE_ROWS
from aldm.runtime.bench_child import component_feeds, peak_rss_mb, run_child, time_calls
from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds

__all__ = ["bench_model", "format_report", "bench_meta", "peak_rss_mb", "time_calls"]


def bench_model(model_dir: ModelDir, *, backend: str = "ort-cpu", threads: int | None = None,
                components: Sequence[str] = COMPONENTS, warmup: int = 1, repeats: int = 3,
                e2e_targets: Sequence[int] = (1, 3), steps: int | None = None,
                torch_reference: bool = True, torch_device: str = "cpu", torch_fp16: bool = False,
                precision: str | None = None, fresh_process: bool = True, tile_rows: int | None = None,
                step_graph: str = "auto", progress: Callable[[str], None] | None = None) -> dict:
    """Time `components` and whole translations on `backend`; see the module docstring.

    tile_rows: the slab decoder's rows (0: whole volumes; None: aldm-infer's default).
    step_graph: auto, on or off: DDIM through the folder's sampler-step graph (Pipeline.load).
    fresh_process: also translate once into max(e2e_targets) targets in a fresh process and
    record its peak RSS (end_to_end["<n>_targets"]["fresh_process"] and ["peak_rss_mb"]).
    """
    say = progress or (lambda s: None)
    m = model_dir.manifest
    from aldm.runtime.pipeline import Pipeline

    feeds = {c: component_feeds(model_dir, c) for c in components}
    # the pipeline aldm-infer builds (per-class MS-SPADE and slab decoding where they apply)
    tile_rows = DEFAULT_TILE_ROWS if tile_rows is None else tile_rows
    pipe = Pipeline.load(model_dir.path, backend=backend, threads=threads, precision=precision, verify=False,
                         tile_rows=tile_rows, step_graph=step_graph)
    runners = pipe.runners
    resolved = pipe.backend
    out: dict = {"meta": bench_meta(backend), "backend": backend, "backend_resolved": resolved, "tile_rows": tile_rows,
                 "precision": precision or "default", "step_graph": pipe.step is not None,
                 "threads": threads, "crop_size": list(m.preprocessing.crop_size),
                 "latent_shape": list(m.latent_shape), "components": {}, "end_to_end": {}}
    for c in components:
        say(f"{backend}: {c}")
        out["components"][c] = time_calls(lambda: runners[c].infer(feeds[c]), warmup, repeats)
    n_steps = steps or m.sampler.steps
    calls = S.strength_steps(n_steps, m.sampler.strength) if m.sampler.name == "ddim" else n_steps
    if e2e_targets:
        x = sample_feeds(model_dir.component("encoder"), 1, 99)["x"]
        if warmup:  # the per-class and slab graphs compile on first use (OpenVINO), as components did
            say(f"{backend}: end to end, warm-up")
            pipe.translate(x, [mod for mod in m.modalities if mod != "t1"][: max(e2e_targets)], steps=n_steps, seed=0)
        for n in e2e_targets:
            targets = [mod for mod in m.modalities if mod != "t1"][:n]
            say(f"{backend}: end to end, {n} target(s), {calls} UNet calls")
            t0 = time.perf_counter()
            tr = pipe.translate(x, targets, steps=n_steps, seed=0)
            out["end_to_end"][f"{n}_targets"] = {"seconds_per_volume": time.perf_counter() - t0,
                                                 "targets": len(targets), "steps": n_steps, "unet_calls": calls,
                                                 "strength": m.sampler.strength, "stages_s": tr.timings}
    pipe.close()
    out["peak_rss_mb"] = peak_rss_mb()  # before anything else runs here: the engine path's own peak

    if e2e_targets and fresh_process:
        n = max(e2e_targets)
        say(f"{backend}: end to end, {n} target(s), in a fresh process (peak RSS)")
        fresh = run_child("e2e", {"model_dir": str(model_dir.path), "backend": backend, "threads": threads,
                                  "precision": precision, "targets": n, "steps": n_steps, "tile_rows": tile_rows,
                                  "step_graph": step_graph})
        out["end_to_end"][f"{n}_targets"]["fresh_process"] = fresh
        out["end_to_end"][f"{n}_targets"]["peak_rss_mb"] = fresh.get("peak_rss_mb") if "error" not in fresh else None
    if torch_reference:
        out["torch_eager"] = _torch_reference(model_dir, components, threads, warmup, repeats, say,
                                              torch_device, torch_fp16)
        te = (out["torch_eager"] or {}).get("components", {})
        if all(c in te for c in components) and components:
            out["ratio_ort_over_torch"] = {c: out["components"][c]["median_s"] / te[c]["median_s"]
                                           for c in components}
    _add_flops(out, model_dir, components, say)
    return out


TORCH_CHILD = "aldm.export.bench_torch"  # run as a program: the runtime does not import the models


def _torch_reference(model_dir: ModelDir, components, threads, warmup, repeats, say,
                     device: str = "cpu", fp16: bool = False) -> dict | None:
    """PyTorch eager timings from a child process (None when torch is not installed)."""
    if importlib.util.find_spec("torch") is None:
        return None
    say(f"torch eager ({device}): in a separate process")
    cfg = {"model_dir": str(model_dir.path), "components": list(components), "threads": threads,
           "warmup": warmup, "repeats": repeats, "device": device, "fp16": fp16}
    return run_child("torch", cfg, module=TORCH_CHILD)


def _add_flops(out: dict, model_dir: ModelDir, components, say) -> None:
    """FLOPs of every component graph, GFLOP/s beside each median (engine and torch eager) and
    for the end-to-end runs. Without the onnx package: a note instead, no GFLOP/s."""
    from aldm.runtime.flops import CONVENTION, graph_flops

    say("counting FLOPs of the ONNX graphs")
    try:
        counts = {c: graph_flops(model_dir.component_file(c)) for c in COMPONENTS}
    except ImportError as exc:
        out["flops"] = None
        out["flops_note"] = f"no GFLOP/s: {exc}"
        return
    out["flops_convention"] = CONVENTION
    out["flops"] = {c: {"flops": v["flops"], "macs": v["macs"],
                        "by_op": {op: e["flops"] for op, e in v["by_op"].items()},
                        "memory_bound_elements": v["memory_bound_elements"],
                        **({"unresolved_nodes": len(v["unresolved"])} if v["unresolved"] else {})}
                    for c, v in counts.items()}
    te = (out.get("torch_eager") or {}).get("components", {})
    for c in components:
        f = counts[c]["flops"]
        for res in (out["components"].get(c), te.get(c)):
            if res:
                res["gflop"] = f / 1e9
                res["gflop_per_s"] = f / res["median_s"] / 1e9
    for v in out["end_to_end"].values():
        n, calls = v["targets"], v["unet_calls"]
        f = counts["encoder"]["flops"] + n * (counts["spade"]["flops"] + counts["decoder"]["flops"]
                                              + calls * counts["unet"]["flops"])
        v["gflop"] = f / 1e9
        v["gflop_per_s"] = f / v["seconds_per_volume"] / 1e9


def bench_meta(backend: str) -> dict:
    """Where the figures come from: versions, commit, CPU, date."""
    import aldm

    meta = {"aldm": aldm.__version__, "git_commit": _git_commit(Path(aldm.__file__).resolve().parent),
            "backend": backend, "backend_versions": _versions(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        meta["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    gpu = _gpu_name() if backend in ("auto", "ort-cuda", "trt") else None
    if gpu:
        meta["gpu"] = gpu
    return meta


def _git_commit(where: Path) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def _versions() -> dict[str, str]:
    """Installed versions of the inference backends (from package metadata: nothing is imported)."""
    from importlib import metadata

    found = {}
    for label, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")),
                         ("openvino", ("openvino",)), ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
                         ("torch", ("torch",)), ("onnx", ("onnx",)), ("numpy", ("numpy",))):
        for d in dists:
            try:
                found[label] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def _fmt(v, spec: str) -> str:
    """v formatted with spec; a '-' as wide as the field when there is no figure."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 1)
    return "-".rjust(width) if v is None else format(v, spec)


def format_report(r: dict) -> str:
    meta = r.get("meta") or {}
    vers = "  ".join(f"{k} {v}" for k, v in (meta.get("backend_versions") or {}).items()
                     if k in ("onnxruntime", "openvino", "tensorrt", "torch"))
    lines = []
    if meta:
        commit = (meta.get("git_commit") or "")[:10]
        lines.append(f"aldm {meta.get('aldm')}{f' ({commit})' if commit else ''}  {vers}  "
                     f"{meta.get('cpu')} ({meta.get('cpu_count')} cores)"
                     + (f"  {meta['gpu']}" if meta.get("gpu") else "") + f"  {meta.get('date')}")
    resolved = r.get("backend_resolved")
    shown = r["backend"] + (f" ({resolved})" if resolved and resolved != r["backend"] else "")
    tiles = r.get("tile_rows")
    lines.append(f"backend {shown}  decoder {'slabs of ' + str(tiles) + ' rows' if tiles else 'whole volumes'}  precision {r.get('precision', 'default')}  "
                 f"threads {r['threads'] or 'default'}  crop {r['crop_size']}  latent {r['latent_shape']}")
    te_block = r.get("torch_eager") or {}
    te = te_block.get("components", {})
    head = f"  {'component':<9} {'GFLOP':>9} {'median s':>9} {'p90 s':>9} {'GFLOP/s':>9}"
    if te:
        head += f"   {'torch s':>9} {'GFLOP/s':>9} {'ratio':>6}"
    lines.append(head)
    for c, v in r["components"].items():
        line = (f"  {c:<9} {_fmt(v.get('gflop'), '9.4g')} {v['median_s']:9.3f} {v['p90_s']:9.3f} "
                f"{_fmt(v.get('gflop_per_s'), '9.4g')}")
        if c in te:
            ratio = (r.get("ratio_ort_over_torch") or {}).get(c)
            line += (f"   {te[c]['median_s']:9.3f} {_fmt(te[c].get('gflop_per_s'), '9.4g')} "
                     f"{_fmt(ratio, '6.2f')}")
        lines.append(line)
    if te:
        lines.append("  (ratio = engine median / torch eager median; torch eager: random weights of the same "
                     "architecture, in its own process)")
    for k, v in r["end_to_end"].items():
        stages = ", ".join(f"{s} {t:.2f}s" for s, t in v["stages_s"].items())
        rate = f", {v['gflop_per_s']:.4g} GFLOP/s" if v.get("gflop_per_s") is not None else ""
        lines.append(f"  end to end, {k.replace('_', ' ').replace('1 targets', '1 target')}: "
                     f"{v['seconds_per_volume']:.2f} s/volume ({v['steps']} steps, "
                     f"{v.get('unet_calls', v['steps'])} UNet calls; {stages}{rate})")
    lines.append(f"  peak RSS, engine path (this process): {r['peak_rss_mb']:.0f} MB")
    for k, v in r["end_to_end"].items():
        fresh = v.get("fresh_process")
        if not fresh:
            continue
        label = k.replace("_", " ").replace("1 targets", "1 target")
        if "error" in fresh:
            lines.append(f"  peak RSS, one translation ({label}) in a fresh process: not measured ({fresh['error']})")
        else:
            lines.append(f"  peak RSS, one translation ({label}) in a fresh process: {fresh['peak_rss_mb']:.0f} MB "
                         f"(load {fresh['load_s']:.2f} s, translate {fresh['seconds_per_volume']:.2f} s)")
    if "torch_eager" in r:
        if te_block.get("error"):
            lines.append(f"  torch eager: failed ({te_block['error']})")
        elif te_block:
            lines.append(f"  peak RSS, torch eager (its own process): {te_block['peak_rss_mb']:.0f} MB")
        else:
            lines.append("  torch eager: not run (torch is not installed)")
    if r.get("flops_note"):
        lines.append(f"  {r['flops_note']}")
    elif r.get("flops"):
        lines.append("  FLOPs from the ONNX graphs at batch 1, 1 MAC = 2 FLOPs (Conv, ConvTranspose, MatMul, Gemm)")
    return "\n".join(lines)
