"""`aldm bench`: component latency and GFLOP/s, end-to-end seconds per volume, peak RSS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.atomic import write_text
from aldm.cli._common import handle_errors, say, split_list


@handle_errors
def bench(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder.")],
    backend: Annotated[str, typer.Option(help="auto (as aldm-infer picks: trt > ort-cuda > ov-cpu > ort-cpu), ort-cpu, ort-cuda, ov-cpu or trt.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: all cores).")] = None,
    components: Annotated[str, typer.Option(help="Components to time, comma-separated.")] = "encoder,spade,unet,decoder",
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls per component (median and p90 reported).")] = 3,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps for the end-to-end runs. Default: the manifest's.")] = None,
    e2e: Annotated[bool, typer.Option(help="Time whole translations with 1 and 3 targets.")] = True,
    torch_ref: Annotated[bool, typer.Option("--torch/--no-torch", help="Also time PyTorch eager (if installed; in a separate process) and report the ratio.")] = True,
    torch_device: Annotated[str, typer.Option(help="Device of the PyTorch eager reference: cpu or cuda.")] = "cpu",
    torch_fp16: Annotated[bool, typer.Option("--torch-fp16", help="Run the PyTorch reference under CUDA FP16 autocast.")] = False,
    precision: Annotated[Optional[str], typer.Option(help="fp32, fp16 or int8. Default: fp16 for trt, fp32 on the CPU and ort-cuda.")] = None,
    tile_rows: Annotated[Optional[int], typer.Option(help="Slab rows of the CPU decoder for the end-to-end runs (0: whole volumes). Default: aldm-infer's.")] = None,
    step_graph: Annotated[str, typer.Option(help="auto, on or off: run DDIM through the folder's sampler-step graph (UNet + update per call; `aldm add-step-graph` adds it) or the numpy loop. auto: as aldm-infer does.")] = "auto",
    fresh: Annotated[bool, typer.Option("--fresh-process/--no-fresh-process", help="Also translate once into 3 targets in a fresh process and report that process's peak RSS.")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
) -> None:
    """Benchmark an exported model: prints a table; --json writes the figures.

    GFLOP/s = FLOPs counted from each ONNX graph (batch 1, 1 MAC = 2 FLOPs) / median seconds.
    Peak RSS is reported for this process (the engine path), for one translation in a fresh
    process, and for the PyTorch eager reference (its own process)."""
    from aldm.runtime.bench import bench_model, format_report
    from aldm.runtime.manifest import ModelDir

    result = bench_model(ModelDir(model_dir), backend=backend, threads=threads,
                         components=split_list(components), warmup=warmup, repeats=repeats,
                         e2e_targets=(1, 3) if e2e else (), steps=steps, torch_reference=torch_ref,
                         torch_device=torch_device, torch_fp16=torch_fp16, precision=precision,
                         fresh_process=fresh, tile_rows=tile_rows, step_graph=step_graph, progress=say)
    typer.echo(format_report(result))
    if json_out:
        write_text(json_out, json.dumps(result, indent=1))
