"""Precision plans: which nodes stay FP32 when a graph runs in FP16 (or INT8), and FP16 copies.

One plan serves every consumer: the FP16 ONNX copy (ONNX Runtime on CPU/GPU, TensorRT
strongly-typed builds) and TensorRT's per-layer precision constraints. Kept in FP32:
- normalisations (GroupNorm/InstanceNorm statistics overflow or lose precision in FP16;
  TensorRT's FP16 InstanceNorm/GroupNorm issues), softmax (official: fp32);
- the vector quantizer (distance and argmin: FP16 picks different codes, SPEC §2.7);
- the timestep embedding (t·freq reaches ~1000, where FP16's step is 0.5: cos/sin would be
  noise) and the time/class embedding MLPs.
Nodes are found by op type, by the module scope the exporter records in node metadata, and by
the mark aldm.export.stable_norm puts on the nodes of a rewritten normalisation.
"""

from __future__ import annotations

import ast
from pathlib import Path

from aldm.export.stable_norm import MARK as NORM_MARK

FP32_OPS = frozenset({"GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax",
                      "ArgMin", "ArgMax", "TopK", "Cos", "Sin"})
FP32_SCOPES = ("quantize", "time_embed", "label_emb")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def node_scope(node) -> str:
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            try:
                return ".".join(s for s in ast.literal_eval(p.value) if s)
            except (ValueError, SyntaxError):
                return p.value
    return ""


def fp32_nodes(model) -> set[str]:
    """Names of the nodes a reduced-precision build must keep in FP32 (see module docstring)."""
    keep = set()
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        scope = node_scope(node)
        if (node.op_type in FP32_OPS or any(f".{s}" in f".{scope}" for s in FP32_SCOPES)
                or any(p.key == NORM_MARK for p in node.metadata_props)):
            keep.add(node.name)
        if node.op_type in ("Cos", "Sin"):  # t -> float -> t * freqs feeds them: keep that chain
            for inp in node.input:
                n = producers.get(inp)
                while n is not None and n.op_type in ("Mul", "Cast", "Unsqueeze", "Reshape"):
                    keep.add(n.name)
                    n = producers.get(n.input[0])
    return keep


KEEP_FP32_INPUTS = {("Resize", 1), ("Resize", 2)}  # roi and scales are float32 by definition


def to_fp16(src: str | Path, dst: str | Path) -> int:
    """Write an FP16 copy of an ONNX graph: FP32 inputs/outputs, the plan's nodes in FP32 with
    FP32 data flowing between them (a Cast only where the precision really changes), FP16
    everywhere else. Returns the number of nodes kept in FP32."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    g = model.graph
    keep = fp32_nodes(model)
    # Constant nodes become initializers so that constants are converted once, not cast at run time.
    for node in [n for n in g.node if n.op_type == "Constant"]:
        attr = {a.name: a for a in node.attribute}
        if "value" in attr:
            t = onnx.TensorProto()
            t.CopyFrom(attr["value"].t)
            t.name = node.output[0]
            g.initializer.append(t)
            g.node.remove(node)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: i for i in g.initializer}
    dtype = {i.name: F32 for i in g.input if elem.get(i.name) == F32}
    dtype.update({n: i.data_type for n, i in inits.items() if i.data_type == F32})
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes = []

    def as_type(name: str, want: int) -> str:
        if dtype.get(name, want) == want:
            return name
        if name in inits and want == F16:
            if name not in half_inits:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                half_inits[name] = name + "__fp16"
                g.initializer.append(numpy_helper.from_array(arr, half_inits[name]))
                dtype[half_inits[name]] = F16
            return half_inits[name]
        if (name, want) not in casts:
            casts[(name, want)] = f"{name}__to_{'fp16' if want == F16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[(name, want)]], to=want,
                                          name=casts[(name, want)] + "_cast"))
            dtype[casts[(name, want)]] = want
        return casts[(name, want)]

    for node in list(g.node):
        want = F32 if node.name in keep else F16
        for i, name in enumerate(node.input):
            if name and dtype.get(name) in (F32, F16):
                node.input[i] = as_type(name, F32 if (node.op_type, i) in KEEP_FP32_INPUTS else want)
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i in (F32, F16):
                to.i = want
        for a in node.attribute:
            if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == F32 and want == F16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
        for out in node.output:
            if elem.get(out) in (F32, F16):
                dtype[out] = want
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    for out in g.output:
        if dtype.get(out.name) == F16:
            inner = out.name + "__fp16"
            for node in nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            nodes.append(helper.make_node("Cast", [inner], [out.name], to=F32, name=out.name + "_cast"))
    unused = {n for n, i in inits.items() if n in half_inits and all(
        n not in nd.input for nd in nodes)}
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("value_info")
    for init in [i for i in g.initializer if i.name in unused]:
        g.initializer.remove(init)
    from aldm.atomic import atomic_path

    with atomic_path(dst) as tmp:  # external data (if the source had any) was loaded: one file
        onnx.save(model, str(tmp))
    return len(keep)


def add_fp16_variant(model_dir, say=print) -> dict[str, str]:
    """Write `<component>.fp16.onnx` for every component and register them in the manifest. A
    folder with the sampler-step graph also gets its FP16 copy: the FP16 UNet followed by the
    same FP32 update (composed, not converted: the update never runs in FP16)."""
    from aldm.export.step_graph import compose, step_variant_file
    from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH, ModelDir

    md = ModelDir(model_dir)
    files = {}
    for c in COMPONENTS:
        name = f"{c}.fp16.onnx"
        kept = to_fp16(md.component_file(c), md.file(name))
        say(f"{c}: FP16 copy written, {kept} nodes kept in FP32")
        files[c] = name
    if md.has_step_graph:
        files[STEP_GRAPH] = step_variant_file("fp16")
        compose(md.file(files["unet"]), md.file(files[STEP_GRAPH]))
        say(f"{STEP_GRAPH}: the FP16 UNet + the DDIM update in FP32")
    md.add_variant("fp16", files)
    return files
