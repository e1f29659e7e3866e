"""Static TensorRT-compatibility check of an ONNX graph: lists offending nodes.

Rules (TensorRT 10.x ONNX parser, `onnx-tensorrt/docs/operators.md`, opset 9..24), plus our own
deployment rules: no control flow or data-dependent shapes, constant conv weights, constant
axes where the parser needs them. Needs only the `onnx` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OPSET_RANGE = (9, 24)

# ONNX ops the TensorRT 10 parser supports (the subset a convolutional diffusion model or a
# QDQ-quantized one can contain). Anything else is reported.
SUPPORTED = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast CastLike Ceil Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual
GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization LeakyRelu
Less LessOrEqual Log MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not Or Pad Pow PRelu
QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize Round Shape Sigmoid Sign Sin Size Slice Softmax Softplus Split
Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor
""".split())

# Supported by TensorRT but not allowed here: control flow, data-dependent output shapes.
FORBIDDEN = {
    "Loop": "control flow (loop)", "If": "control flow (if)", "Scan": "control flow (scan)",
    "NonZero": "data-dependent output shape", "Unique": "data-dependent output shape",
    "Compress": "data-dependent output shape", "NonMaxSuppression": "data-dependent output shape",
}

# (op, input index) that the parser needs as a build-time constant.
CONSTANT_INPUTS = {
    ("Conv", 1): "weights must be constant", ("ConvTranspose", 1): "weights must be constant",
    ("Pad", 3): "axes must be an initializer", ("ReduceSum", 1): "axes must be an initializer",
    ("ReduceMean", 1): "axes must be an initializer", ("ReduceMax", 1): "axes must be an initializer",
    ("ReduceMin", 1): "axes must be an initializer", ("Slice", 3): "axes must be an initializer",
    ("Unsqueeze", 1): "axes must be constant", ("Squeeze", 1): "axes must be constant",
    ("QuantizeLinear", 2): "zero point must be constant", ("DequantizeLinear", 2): "zero point must be constant",
}

RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@dataclass(frozen=True)
class Offense:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} node {self.node!r}: {self.reason}"


def check_graph(model) -> list[Offense]:
    """All offending nodes of an `onnx.ModelProto` (empty list: TensorRT-friendly)."""
    from onnx import helper, numpy_helper

    out: list[Offense] = []
    g = model.graph
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            out.append(Offense("<model>", "opset", f"opset {imp.version} outside TensorRT's {OPSET_RANGE}"))
        elif imp.domain not in ("", "ai.onnx"):
            out.append(Offense("<model>", "opset", f"custom domain {imp.domain!r} needs a plugin"))

    constants = {i.name for i in g.initializer}
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    for node in g.node:
        name = node.name or (node.output[0] if node.output else "?")
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            out.append(Offense(name, op, f"custom op in domain {node.domain!r}"))
            continue
        if op in FORBIDDEN:
            out.append(Offense(name, op, FORBIDDEN[op]))
            continue
        if op not in SUPPORTED:
            out.append(Offense(name, op, "not supported by the TensorRT ONNX parser"))
            continue
        for (cop, idx), why in CONSTANT_INPUTS.items():
            if op == cop and len(node.input) > idx and node.input[idx] and node.input[idx] not in constants:
                out.append(Offense(name, op, why))
        if op == "Resize":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dec = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            if dec.get("mode", "nearest") not in RESIZE_MODES:
                out.append(Offense(name, op, f"resize mode {dec['mode']!r}"))
            if dec.get("coordinate_transformation_mode", "half_pixel") not in RESIZE_COORDS:
                out.append(Offense(name, op, f"coordinate mode {dec['coordinate_transformation_mode']!r}"))
            if dec.get("mode", "nearest") == "nearest" and dec.get("nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
                out.append(Offense(name, op, f"nearest mode {dec['nearest_mode']!r}"))
            if dec.get("antialias", 0):
                out.append(Offense(name, op, "antialiasing"))
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in values:
            if values[node.input[2]].any():
                out.append(Offense(name, op, "zero point must be 0"))
    return out


def check_file(path: str | Path) -> list[Offense]:
    import onnx

    return check_graph(onnx.load(str(path), load_external_data=False))


def require_trt_compatible(path: Path, error: type[Exception] | None = None) -> None:
    """Raise `error` (AldmError by default) naming the first offending nodes unless the ONNX graph
    at `path` passes `check_file`."""
    offenses = check_file(path)
    if offenses:
        from aldm.errors import AldmError

        lines = "; ".join(map(str, offenses[:10]))
        raise (error or AldmError)(f"{path.name} is not TensorRT-compatible ({len(offenses)} nodes): {lines}")
