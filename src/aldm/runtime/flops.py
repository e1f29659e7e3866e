"""Arithmetic work of an ONNX graph, counted from its shapes (`graph_flops`).

Convention (the same as ../shared/reference/FLOPs.md, i.e. torch's FlopCounterMode):
**1 multiply-accumulate (MAC) = 2 FLOPs**, and only the compute-bound ops are counted:

* Conv          MACs = output elements x (C_in / group) x prod(kernel)
* ConvTranspose MACs = input elements x (C_out / group) x prod(kernel)
* MatMul        MACs = output elements x K (batch dimensions broadcast as numpy does)
* Gemm          MACs = M x N x K

Bias adds, normalisation, activations, softmax, resize, padding and concatenation are not
FLOPs here. They are memory-bound: their output element counts are reported separately as
`memory_bound_elements` (one element per output value of each such node; shape-only nodes such
as Reshape/Unsqueeze/Shape are left out). A fused engine may never materialise some of them,
so read that figure as the traffic of a naive executor, not a measurement.

Shapes come from ONNX shape inference with every symbolic input dimension (the dynamic
"batch" axis of an aldm export) fixed to `batch` (1 by default). Needs the `onnx` package
(the `export` / `test` extras); without it `graph_flops` raises ImportError.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any

CONVENTION = ("FLOPs = 2 x multiply-accumulates of Conv, ConvTranspose, MatMul and Gemm at batch 1; "
              "bias adds, normalisation, activations, softmax and resize are not FLOPs "
              "(their output elements are memory_bound_elements)")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "Reshape", "Squeeze", "Unsqueeze",
                            "Flatten", "Identity", "Range"})
_MISSING_ONNX = ("counting FLOPs needs the onnx package (pip install 'aldm[export]' or 'onnx>=1.16')")


def graph_flops(onnx_path: str | Path, *, batch: int = 1, per_node: bool = False) -> dict[str, Any]:
    """FLOPs and MACs per op type of the ONNX graph at `onnx_path`, for a batch of `batch`.

    Returns {"convention", "batch", "flops", "macs", "by_op": {op: {"nodes", "macs", "flops"}},
    "memory_bound_elements", "memory_bound_by_op": {op: elements}, "unresolved": [node names whose
    shapes inference could not determine: not counted]}; with per_node, also "nodes": one
    {"name", "op", "inputs", "macs"} per compute node (inputs name the weights). Raises
    ImportError without onnx.
    """
    try:
        import onnx
        from onnx import shape_inference
    except ImportError as exc:
        raise ImportError(_MISSING_ONNX) from exc

    model = onnx.load(str(onnx_path))
    _fix_symbolic_inputs(model, batch)
    del model.graph.value_info[:]  # the exporter's symbolic shapes would keep "batch" alive
    model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes = _known_shapes(model)

    by_op: dict[str, dict[str, int]] = {}
    memory: dict[str, int] = {}
    unresolved: list[str] = []
    nodes: list[dict[str, Any]] = []
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in COMPUTE_OPS:
            macs = _macs(node, shapes)
            if macs is None:
                unresolved.append(node.name or op)
                continue
            entry = by_op.setdefault(op, {"nodes": 0, "macs": 0, "flops": 0})
            entry["nodes"] += 1
            entry["macs"] += macs
            entry["flops"] += 2 * macs
            if per_node:
                nodes.append({"name": node.name, "op": op, "inputs": list(node.input), "macs": macs})
        elif op not in SHAPE_ONLY_OPS:
            elements = 0
            for out in node.output:
                shape = shapes.get(out)
                if shape is None:
                    if out:
                        unresolved.append(node.name or op)
                    continue
                elements += prod(shape)
            memory[op] = memory.get(op, 0) + elements
    macs_total = sum(v["macs"] for v in by_op.values())
    out = {"convention": CONVENTION, "batch": batch, "flops": 2 * macs_total, "macs": macs_total,
           "by_op": dict(sorted(by_op.items())), "memory_bound_elements": sum(memory.values()),
           "memory_bound_by_op": dict(sorted(memory.items(), key=lambda kv: -kv[1])),
           "unresolved": unresolved}
    if per_node:
        out["nodes"] = nodes
    return out


def _fix_symbolic_inputs(model, batch: int) -> None:
    """Every dim_param (or unknown dim) of the graph inputs -> `batch` (aldm's only dynamic axis)."""
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = batch


def _known_shapes(model) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = value.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = t.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for node in model.graph.node:  # Constant nodes carry their shapes in the attribute
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in a.t.dims)
    return shapes


def _attr(node, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _macs(node, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of one compute node, None when a shape it needs is unknown."""
    op = node.op_type
    get = shapes.get
    if op == "Conv":
        w, y = get(node.input[1]), get(node.output[0])
        if w is None or y is None:
            return None
        return prod(y) * w[1] * prod(w[2:])  # w: (C_out, C_in/group, k...)
    if op == "ConvTranspose":
        x, w = get(node.input[0]), get(node.input[1])
        if x is None or w is None:
            return None
        return prod(x) * w[1] * prod(w[2:])  # w: (C_in, C_out/group, k...)
    if op == "MatMul":
        a, y = get(node.input[0]), get(node.output[0])
        if a is None or y is None:
            return None
        return prod(y) * a[-1]
    if op == "Gemm":
        a, y = get(node.input[0]), get(node.output[0])
        if a is None or y is None or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA") else a[1]
        return prod(y) * k
    return None


def model_flops(model_dir, components=None) -> dict[str, dict[str, Any]]:
    """graph_flops of each component's fp32 graph in an aldm model folder (a ModelDir).
    The precision variants hold the same Conv/MatMul/Gemm nodes, so the count is theirs too."""
    from aldm.runtime.manifest import COMPONENTS

    return {c: graph_flops(model_dir.component_file(c)) for c in (components or COMPONENTS)}
