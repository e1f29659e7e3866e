"""Normalisations rewritten so that ONNX Runtime computes their statistics accurately.

ONNX Runtime's CPU kernels for GroupNormalization and InstanceNormalization (and the
LayerNormalization it fuses a plain mean/variance pattern into) lose precision as a group grows,
as one float32 running sum would (measured, not read in its source). A VQ-GAN group at full
resolution holds up to 4 x 144 x 192 x 144 = 16 M values, and the statistics lose ~1e-3 of
relative precision (measured on the default model's decoder: 2.5e-3 on one layer, 7e-4 on the
whole graph, 4 % of encoder codes flipped). PyTorch is exact to ~1e-7. This rewrite replaces
each such node with the same function, its means taken one axis at a time (innermost first, so
no single sum exceeds ~200 terms) and its variance from centred values:

    r = reshape(x, [B, G, C/G, *spatial]);  mu = mean_C/G(mean_D(mean_H(mean_W(r))))
    d = r - mu;  var = (staged mean of d*d);  y = reshape(d / sqrt(var + eps)) * scale + bias

Measured on the same layers: 1e-7 relative; the default model's decoder went from 12.2 to 8.3 s
on 2 cores (peak memory +0.5 GB: centred copies of the largest activations). The nodes carry
the metadata key `aldm.normalisation` (the original op type); the precision plan keeps them
FP32 like the op they replace. TensorRT parses the pattern with standard layers.
"""

from __future__ import annotations

import numpy as np

MARK = "aldm.normalisation"
OPS = ("GroupNormalization", "InstanceNormalization")


def stabilise_norms(model) -> int:
    """Rewrite every GroupNormalization/InstanceNormalization of `model` (an onnx ModelProto,
    changed in place, static spatial dims) as staged reductions. Returns the number rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    new_nodes, count = [], 0
    for node in g.node:
        if node.op_type not in OPS:
            new_nodes.append(node)
            continue
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) < 3 or any(d is None for d in shape[1:]):
            raise ValueError(f"{node.name}: {node.op_type} needs static channel and spatial dims to be "
                             f"rewritten (got {shape})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        eps = float(attrs.get("epsilon", 1e-5))
        channels, spatial = shape[1], shape[2:]
        groups = int(attrs["num_groups"]) if node.op_type == "GroupNormalization" else channels
        if node.op_type == "GroupNormalization" and _param_len(node.input[1], inits, const_nodes) != channels:
            raise ValueError(f"{node.name}: GroupNormalization scale must have one value per channel (opset >= 21)")
        p = f"{node.name or node.output[0]}/staged"
        made: list = []
        made_consts: set[str] = set()

        def const(name: str, value) -> str:
            full = f"{p}/{name}"
            if full not in made_consts:
                g.initializer.append(numpy_helper.from_array(np.asarray(value), full))
                made_consts.add(full)
            return full

        def op(kind: str, inputs: list[str], name: str, **kw) -> str:
            out = f"{p}/{name}"
            made.append(helper.make_node(kind, inputs, [out], name=out, **kw))
            return out

        def staged_mean(src: str, tag: str) -> str:
            cur = src
            for axis in range(len(spatial) + 2, 1, -1):  # innermost axis first
                cur = op("ReduceMean", [cur, const(f"axis{axis}", np.array([axis], np.int64))],
                         f"{tag}_mean{axis}", keepdims=1)
            return cur

        grouped = [0, groups, channels // groups, *spatial]  # 0: keep the (dynamic) batch dim
        r = op("Reshape", [node.input[0], const("grouped", np.array(grouped, np.int64))], "grouped_x")
        d = op("Sub", [r, staged_mean(r, "x")], "centred")
        var = staged_mean(op("Mul", [d, d], "square"), "sq")
        std = op("Sqrt", [op("Add", [var, const("eps", np.array(eps, np.float32))], "var_eps")], "std")
        n = op("Mul", [d, op("Reciprocal", [std], "inv_std")], "normed")
        n = op("Reshape", [n, const("shape", np.array([0, channels, *spatial], np.int64))], "normed_x")
        bshape = np.array([1, channels] + [1] * len(spatial), np.int64)
        scale = op("Reshape", [node.input[1], const("bshape", bshape)], "scale")
        bias = op("Reshape", [node.input[2], const("bshape", bshape)], "bias")
        scaled = op("Mul", [n, scale], "scaled")
        made.append(helper.make_node("Add", [scaled, bias], list(node.output), name=f"{p}/out"))
        for m in made:
            m.metadata_props.extend(node.metadata_props)
            m.metadata_props.add(key=MARK, value=node.op_type)
        new_nodes.extend(made)
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
    return count


def _param_len(name: str, inits, const_nodes) -> int | None:
    from onnx import helper, numpy_helper

    if name in inits:
        return int(np.prod(inits[name].dims))
    if name in const_nodes:
        return int(numpy_helper.to_array(helper.get_attribute_value(const_nodes[name].attribute[0])).size)
    return None
