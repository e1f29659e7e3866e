"""The sampler-step graph (manifest.STEP_GRAPH, `unet_step.onnx`): the UNet followed by the DDIM
update, so that one call runs a whole step x_t -> x_{t_prev} and x can stay where the graph runs.

Composed from an exported UNet graph with `onnx` alone (no torch): the UNet's nodes unchanged,
then the update of aldm.runtime.sampler.ddim_update as ONNX nodes, in float32 and in numpy's
order of operations (so both round alike):

    x0   = (x_t - s1m * eps) / sqrt(a_t)              # 1. predicted x_0
    dir  = sqrt(1 - a_prev - sigma * sigma) * eps     # 2. direction pointing to x_t
    x_prev = sqrt(a_prev) * x0 + dir + sigma * noise  # 3. x_{t-1}

with coef = [a_t, a_prev, sigma, s1m], a row of aldm.runtime.sampler.ddim_coefficients. An FP16
UNet's eps is cast to float32 first; x_t, c_concat and noise stay float32, as the UNet's I/O does.
`add_step_graph` adds the graph (and one per precision variant that has a UNet) to an existing
folder, rewriting its manifest atomically (format 4).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from aldm.errors import ModelError
from aldm.runtime.manifest import MANIFEST, STEP_GRAPH, ComponentSpec, ModelDir, TensorSpec, check_names, sha256_file

STEP_FILE = f"{STEP_GRAPH}.onnx"
PREFIX = "ddim_update/"  # names of the update's nodes and values (none of the UNet's start so)


def step_spec(unet: ComponentSpec, file: str = STEP_FILE) -> ComponentSpec:
    """The step graph's I/O: the UNet's inputs, coef (4,) and noise (like x_t); output x_prev."""
    x_t = next(t for t in unet.inputs if t.name == "x_t")
    return ComponentSpec(STEP_GRAPH, file,
                         unet.inputs + (TensorSpec("coef", (4,), "float32"), TensorSpec("noise", x_t.shape, "float32")),
                         (TensorSpec("x_prev", x_t.shape, "float32"),))


def compose(unet_path: str | Path, dst: str | Path) -> None:
    """Write the step graph of the UNet graph at `unet_path` to `dst` (atomically)."""
    import onnx
    from onnx import TensorProto, helper

    from aldm.atomic import atomic_path

    try:
        model = onnx.load(str(unet_path))
    except Exception as exc:  # onnx raises DecodeError and friends
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{unet_path}: not a readable ONNX graph ({why})") from None
    g = model.graph
    ins = {i.name: i for i in g.input}
    if set(ins) < {"x_t", "t", "c_concat", "y"} or [o.name for o in g.output] != ["eps"]:
        raise ModelError(f"{unet_path}: not a UNet graph (inputs x_t, t, c_concat, y; output eps)")
    x_type = ins["x_t"].type.tensor_type
    if x_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"{unet_path}: x_t must be float32 (the step graph's update runs in float32)")
    rank = len(x_type.shape.dim)
    eps_type = g.output[0].type.tensor_type.elem_type
    p = PREFIX
    nodes = []

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [p + out], name=p + out, **attrs))
        return p + out

    g.initializer.extend([
        helper.make_tensor(p + "coef_shape", TensorProto.INT64, [rank], [4] + [1] * (rank - 1)),
        helper.make_tensor(p + "split", TensorProto.INT64, [4], [1, 1, 1, 1]),
        helper.make_tensor(p + "one", TensorProto.FLOAT, [1] * rank, [1.0]),
    ])
    eps = "eps" if eps_type == TensorProto.FLOAT else node("Cast", ["eps"], "eps_fp32", to=TensorProto.FLOAT)
    # coef (4,) -> four (1, 1, ..., 1) scalars that broadcast against x (same rank: TensorRT-friendly)
    col = node("Reshape", ["coef", p + "coef_shape"], "coef_column")
    nodes.append(helper.make_node("Split", [col, p + "split"], [p + n for n in ("a_t", "a_prev", "sigma", "s1m")],
                                  name=p + "split_coef", axis=0))
    a_t, a_prev, sigma, s1m = (p + n for n in ("a_t", "a_prev", "sigma", "s1m"))
    # 1. predicted x_0
    x0 = node("Div", [node("Sub", ["x_t", node("Mul", [s1m, eps], "s1m_eps")], "x_minus"),
                      node("Sqrt", [a_t], "sqrt_a_t")], "x0")
    # 2. direction pointing to x_t: sqrt((1 - a_prev) - sigma^2) * eps
    c_dir = node("Sqrt", [node("Sub", [node("Sub", [p + "one", a_prev], "one_minus_a_prev"),
                                       node("Mul", [sigma, sigma], "sigma_sq")], "dir_sq")], "dir_coef")
    direction = node("Mul", [c_dir, eps], "direction")
    # 3. x_{t-1} = (sqrt(a_prev) * x0 + direction) + sigma * noise
    mean = node("Add", [node("Mul", [node("Sqrt", [a_prev], "sqrt_a_prev"), x0], "scaled_x0"), direction], "mean")
    nodes.append(helper.make_node("Add", [mean, node("Mul", [sigma, "noise"], "sigma_noise")], ["x_prev"],
                                  name=p + "x_prev"))
    g.node.extend(nodes)
    shape = [d.dim_param or d.dim_value for d in x_type.shape.dim]
    g.input.extend([helper.make_tensor_value_info("coef", TensorProto.FLOAT, [4]),
                    helper.make_tensor_value_info("noise", TensorProto.FLOAT, shape)])
    g.output.pop()
    if eps_type == TensorProto.FLOAT:  # eps stays an intermediate value: keep its type known
        g.value_info.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, shape))
    g.output.extend([helper.make_tensor_value_info("x_prev", TensorProto.FLOAT, shape)])
    g.name = f"{g.name or 'unet'}_ddim_step"
    onnx.checker.check_model(model)
    with atomic_path(Path(dst)) as tmp:
        onnx.save(model, str(tmp))


def step_variant_file(precision: str) -> str:
    return f"{STEP_GRAPH}.{precision}.onnx"


def add_step_graph(model_dir: str | Path, *, say: Callable[[str], None] = lambda s: None,
                   overwrite: bool = False) -> ComponentSpec:
    """Compose the step graph of a folder's UNet (and of each precision variant that has a UNet),
    check it against TensorRT's parser rules, register it in the manifest (format 4) and rewrite
    the manifest atomically: a crash leaves the old manifest or the new one. Needs onnx, not torch.
    overwrite: recompose a step graph the folder already has (else it is left as it is)."""
    from aldm.atomic import write_text
    from aldm.export.trt_compat import require_trt_compatible

    md = ModelDir(model_dir)
    m = md.manifest
    if md.has_step_graph and not overwrite:
        say(f"{md.path} already has the step graph ({m.components[STEP_GRAPH].file})")
        return m.components[STEP_GRAPH]
    spec = step_spec(m.components["unet"])
    written = {spec.file: md.component_file("unet")}
    variants = {k: dict(v) for k, v in m.variants.items()}
    for precision, files in variants.items():
        if "unet" in files and files["unet"] == m.components["unet"].file:  # that precision runs the FP32 UNet
            files[STEP_GRAPH] = spec.file
        elif "unet" in files:
            files[STEP_GRAPH] = step_variant_file(precision)
            written[files[STEP_GRAPH]] = md.component_file("unet", precision)
    for name, unet in written.items():
        if md.file(name).is_symlink():
            raise ModelError(f"{md.file(name)}: is a symbolic link; a model folder holds its files itself")
        compose(unet, md.file(name))
        require_trt_compatible(md.file(name), ModelError)
        say(f"{name}: {unet.name} + the DDIM update (float32)")
    # format 4 reads decoder_tiling in format 3's layout: a format-1/2 folder's old cut (which it
    # never used) is dropped, so the folder still decodes whole volumes, as it did
    new = dataclasses.replace(
        m, components=dict(m.components) | {STEP_GRAPH: spec}, variants=variants,
        files=dict(m.files) | {f: sha256_file(md.file(f)) for f in written},
        decoder_tiling=m.decoder_tiling if m.format_version >= 3 else None,
        format_version=max(m.format_version, 4))
    check_names(md.path, new)
    write_text(md.file(MANIFEST), new.to_json())
    return spec
