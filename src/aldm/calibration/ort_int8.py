"""ONNX Runtime static INT8 (QDQ): per-channel INT8 weights, UINT8 activations calibrated on
recorded inputs. Only convolutions and matmuls are quantized (the compute); kept in float: the
first and last convolutions, the time/class embeddings, the vector quantizer, normalisations and
softmax (the shared precision plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from aldm.atomic import atomic_path
from aldm.calibration.collect import load_samples
from aldm.runtime.manifest import COMPONENTS, ModelDir


def first_and_last_convs(model) -> list[str]:
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    first = [n.name for n in convs if n.input[0] in inputs] or [convs[0].name]
    last = [n.name for n in convs if n.output[0] in outputs] or [convs[-1].name]
    return sorted(set(first + last))


def calibration_pick(n: int, max_samples: int = 64, seed: int = 0) -> list[int]:
    """Which recorded samples set the INT8 ranges (the rest are held out for `aldm check`)."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, min(max_samples, n), replace=False).tolist())


def held_out_feeds(calib: str | Path, component: str, batch: int, max_samples: int = 64) -> dict | None:
    """`batch` recorded rows that did not calibrate, evenly spread over the recording (for the UNet:
    over the sampling steps), stacked into one feed; None if there are none."""
    samples = load_samples(calib, component)
    used = set(calibration_pick(len(samples), max_samples))
    rest = [s for i, s in enumerate(samples) if i not in used] or samples
    if not rest:
        return None
    idx = np.linspace(0, len(rest) - 1, batch).round().astype(int)
    return {k: np.concatenate([rest[i][k] for i in idx]) for k in rest[0]}


def quantize_component(src: Path, dst: Path, samples: list[dict[str, np.ndarray]], *,
                       max_samples: int = 64, seed: int = 0) -> list[str]:
    """Write an INT8 QDQ copy of `src` (atomically, one self-contained file); returns the nodes
    kept in float."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    from aldm.export.precision import fp32_nodes

    model = onnx.load(str(src))
    exclude = sorted(fp32_nodes(model) | set(first_and_last_convs(model)))
    chosen = [samples[i] for i in calibration_pick(len(samples), max_samples, seed)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(chosen)

        def get_next(self):
            return next(self.it, None)

    with atomic_path(dst) as tmp:
        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, op_types_to_quantize=["Conv", "MatMul"],
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=False,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return exclude


def add_int8_variant(model_dir: str | Path, calib: str | Path, *, max_samples: int = 64,
                     keep_float: tuple[str, ...] = (), say: Callable[[str], None] = print) -> dict[str, str]:
    """Quantize every component but those in `keep_float`, which the int8 variant runs from their
    FP32 graphs (e.g. the encoder, whose vector quantizer turns small errors into other codes)."""
    md = ModelDir(model_dir)
    unknown = set(keep_float) - set(COMPONENTS)
    if unknown:
        from aldm.errors import UsageError

        raise UsageError(f"unknown component(s) {', '.join(sorted(unknown))}; choose from {', '.join(COMPONENTS)}")
    files = {}
    for c in COMPONENTS:
        if c in keep_float:
            files[c] = md.component(c).file
            say(f"{c}: kept in FP32")
            continue
        samples = load_samples(calib, c)
        if not samples:
            from aldm.errors import UsageError

            raise UsageError(f"{calib} has no recorded {c} inputs; run the collection first")
        name = f"{c}.int8.onnx"
        say(f"quantizing {c} on {min(max_samples, len(samples))} of {len(samples)} recorded inputs")
        quantize_component(md.component_file(c), md.file(name), samples, max_samples=max_samples)
        files[c] = name
    md.add_variant("int8", files)
    return files
