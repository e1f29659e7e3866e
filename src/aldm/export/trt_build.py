"""`aldm build`: one TensorRT engine per component from the exported ONNX.

Explicit optimisation profiles (batch 1..max_targets, spatial dims from the manifest). FP16 and
INT8 builds keep the precision plan's layers (norms, softmax, quantizer, time embedding) in FP32
with precision constraints; TF32 is off (the quantizer's argmin must not see TF32 matmuls).
Engines are cached by content (`aldm.runtime.trt`): a current engine is reused, anything
else is rebuilt. Engines, sidecars and the timing cache are written atomically (temporary name,
fsync, rename); the sidecar, which registers the engine's sha256, is written after the engine.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from aldm.atomic import clean_partials, write_bytes, write_text
from aldm.errors import BackendError
from aldm.runtime.manifest import ModelDir
from aldm.runtime.trt import (ENGINE_DIR, BuildOptions, current_key, engine_components, engine_paths, is_current,
                              profile, sidecar_doc)


def plan_layers(network, fp32_node_names: set[str]) -> list[str]:
    """Pin to FP32 every layer that comes from a plan node (TensorRT names layers after the ONNX
    node, sometimes with a suffix) and every normalisation/softmax layer. Q/DQ layers are never
    pinned: a QuantizeLinear on a plan node's output is named after that output (`<node>_output_0_
    QuantizeLinear`) but must produce INT8."""
    import tensorrt as trt

    pinned = []
    always = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    qdq = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in qdq:
            continue
        if layer.type in always or any(layer.name == n or layer.name.startswith(n + "_")
                                       or layer.name.startswith(n + "/") for n in fp32_node_names):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def parser_errors(parser) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))


def int8_network(parser, qdq_path: Path) -> bool:
    """Parse the INT8 variant `aldm calibrate` wrote, made symmetric for TensorRT
    (`aldm.export.trt_qdq`); returns whether it quantizes anything (a component the variant keeps
    in float is its FP32 graph: no Q/DQ, so no INT8 flag)."""
    import onnx

    from aldm.export.trt_qdq import has_qdq, tensorrt_qdq

    qdq = tensorrt_qdq(onnx.load(str(qdq_path)))
    if not parser.parse(qdq.SerializeToString(), str(qdq_path)):
        raise BackendError(f"TensorRT could not parse {qdq_path.name}: {parser_errors(parser)}")
    return has_qdq(qdq)


def build_component(model: ModelDir, component: str, options: BuildOptions, *,
                    timing_cache: Path | None = None, say: Callable[[str], None] = print) -> dict:
    import onnx
    import tensorrt as trt

    from aldm.export.precision import fp32_nodes

    key = current_key(model, component, options)
    if key is None:
        raise BackendError("TensorRT and a CUDA GPU are needed to build engines")
    engine, side = engine_paths(model, component, options.precision)
    if is_current(side, key, engine):
        say(f"{component}: engine is current ({options.precision}), reused")
        return json.loads(side.read_text())
    onnx_path = model.component_file(component, "fp32")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    quantized = False
    if options.precision == "int8":  # explicit quantization: the network is the calibrated QDQ graph
        quantized = int8_network(parser, model.component_file(component, "int8"))
    elif not parser.parse_from_file(str(onnx_path)):
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    config.clear_flag(trt.BuilderFlag.TF32)
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile(model.component(component), options.max_targets).items():
        prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)
    if options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = plan_layers(network, fp32_nodes(onnx.load(str(onnx_path), load_external_data=False)))
        say(f"{component}: {len(pinned)} of {network.num_layers} layers pinned to FP32")
    if quantized:  # the Q/DQ scales come from `aldm calibrate`; no calibrator (deprecated in TRT 10.1)
        config.set_flag(trt.BuilderFlag.INT8)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    say(f"{component}: building {options.precision} engine (batch 1..{options.max_targets})")
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendError(f"TensorRT failed to build {component} ({options.precision})")
    data = bytes(blob)
    engine.parent.mkdir(parents=True, exist_ok=True)
    side.unlink(missing_ok=True)  # no registration points at the old engine while it is replaced
    write_bytes(engine, data)
    if cache is not None:
        write_bytes(timing_cache, bytes(cache.serialize()))
    doc = sidecar_doc(key, options, hashlib.sha256(data).hexdigest(), time.perf_counter() - t0)
    write_text(side, json.dumps(doc, indent=1))  # registers the bytes just written
    return doc


def build_engines(model_dir: str | Path, options: BuildOptions, *, timing_cache: Path | None = None,
                  say: Callable[[str], None] = print) -> dict[str, dict]:
    model = ModelDir(model_dir)
    clean_partials(model.path / ENGINE_DIR)  # what a killed build left behind
    return {c: build_component(model, c, options, timing_cache=timing_cache, say=say)
            for c in engine_components(model, options.precision)}  # the step graph's too, where the folder has it
