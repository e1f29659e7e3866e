"""`aldm build`: TensorRT engines (and the FP16 ONNX copy) for an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import fail, handle_errors, say


@handle_errors
def build(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder.")],
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="FP16 engines (norms, softmax, quantizer and time embedding stay FP32) or plain FP32.")] = True,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engines from the QDQ graphs `aldm calibrate` wrote (explicit quantization; FP16 where the graph is not quantized). A new calibration makes them stale.")] = False,
    max_targets: Annotated[int, typer.Option(help="Largest batch the engines accept: targets x sources per call.")] = 3,
    workspace: Annotated[float, typer.Option(help="Builder workspace in GB.")] = 8.0,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Timing cache file, read and updated (faster rebuilds).")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="Engines that later TensorRT versions can run (lean runtime embedded; a little slower).")] = False,
    hardware_compatible: Annotated[bool, typer.Option("--hardware-compatible", help="Engines that run on any Ampere or newer GPU (a little slower).")] = False,
    no_cuda_graph: Annotated[bool, typer.Option("--no-cuda-graph", help="Do not capture the UNet step as a CUDA graph at run time.")] = False,
    onnx_only: Annotated[bool, typer.Option("--onnx-only", help="Only write the FP16 ONNX copy (works without TensorRT or a GPU).")] = False,
) -> None:
    """Build one engine per component, cached by content: a current engine is reused, a stale one
    (other ONNX, precision, profile, TensorRT version or GPU) is rebuilt."""
    from aldm.errors import require

    require("onnx", "gpu", "export")  # the FP16 copy and the INT8 graphs are read and written with onnx
    from aldm.export.precision import add_fp16_variant
    from aldm.runtime.manifest import ModelDir
    from aldm.runtime.trt import BuildOptions, tensorrt_version

    md = ModelDir(model_dir)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    if precision == "fp16" and "fp16" not in md.manifest.variants:
        add_fp16_variant(model_dir, say=say)
    if onnx_only:
        return
    if tensorrt_version() is None:
        fail("TensorRT is not installed here, so no engines were built "
             "(install it from NVIDIA's index: pip install 'aldm[gpu]'); --onnx-only skips this step")
    from aldm.export.trt_build import build_engines

    options = BuildOptions(precision, max_targets, workspace, version_compatible, hardware_compatible,
                           not no_cuda_graph)
    docs = build_engines(model_dir, options, timing_cache=timing_cache, say=say)
    for c, doc in docs.items():
        typer.echo(f"{c}: {precision} engine {doc['key_digest']} ({doc['build_seconds']} s)")
