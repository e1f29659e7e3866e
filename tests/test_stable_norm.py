"""Normalisations are exported as staged reductions that ONNX Runtime computes to float32
accuracy on full-resolution groups, and `aldm check` tells a broken float32 tie from a wrong code."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from aldm.export.precision import fp32_nodes
from aldm.export.stable_norm import MARK, stabilise_norms
from aldm.export.trt_compat import check_graph
from aldm.runtime.compare import Tolerance, code_gaps, compare


def _norm_model(op: str, shape: list[int], groups: int, eps: float, scale, bias):
    attrs = {"num_groups": groups} if op == "GroupNormalization" else {}
    node = helper.make_node(op, ["x", "scale", "bias"], ["y"], name="norm", epsilon=eps, **attrs)
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'decoder', 'norm_out']")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("op,groups", [("GroupNormalization", 2), ("InstanceNormalization", 8)])
def test_staged_norm_matches_float64_on_large_offset_groups(op, groups):
    rng = np.random.default_rng(0)
    # 4 channels x 64^3 = 1 M values per group, offset 3 std from zero: where one float32 sum drifts
    x = (3 + rng.standard_normal((2, 8, 64, 64, 64))).astype(np.float32)
    scale = rng.uniform(0.5, 2, 8).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    ref = (torch.nn.functional.group_norm(torch.from_numpy(x).double(), groups, torch.from_numpy(scale).double(),
                                          torch.from_numpy(bias).double(), 1e-6)).numpy()
    model = _norm_model(op, [2, 8, 64, 64, 64], groups, 1e-6, scale, bias)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # dynamic batch, as exported
    assert stabilise_norms(model) == 1
    assert not {n.op_type for n in model.graph.node} & {"GroupNormalization", "InstanceNormalization"}
    got = _run(model, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-6
    assert _run(model, x[:1]).shape == (1, 8, 64, 64, 64)  # the batch stays dynamic
    assert check_graph(model) == []


def test_rewritten_nodes_are_marked_kept_fp32_and_keep_their_scope():
    scale, bias = np.ones(4, np.float32), np.zeros(4, np.float32)
    model = _norm_model("GroupNormalization", [1, 4, 8, 8, 8], 2, 1e-6, scale, bias)
    stabilise_norms(model)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)) > 10
    inits = [i.name for i in model.graph.initializer]
    assert len(inits) == len(set(inits))  # each constant written once
    for n in model.graph.node:
        props = {p.key: p.value for p in n.metadata_props}
        assert props[MARK] == "GroupNormalization" and "norm_out" in props["pkg.torch.onnx.name_scopes"]
    assert fp32_nodes(model) == set(names)
    assert model.graph.node[-1].output[0] == "y"  # consumers of the original output are untouched


def test_dynamic_spatial_dims_are_refused_with_the_node_named():
    model = _norm_model("InstanceNormalization", [1, 4, 8, 8, 8], 4, 1e-5, np.ones(4, np.float32),
                        np.zeros(4, np.float32))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "w"
    with pytest.raises(ValueError, match="norm: InstanceNormalization needs static"):
        stabilise_norms(model)


def test_a_different_code_is_agreement_only_at_a_reference_tie():
    codebook = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    h = np.zeros((1, 2, 1, 1, 3), np.float32)
    h[0, :, 0, 0, 0] = [0.5, 0.5]  # equidistant from codes 0 and 1: a tie
    h[0, :, 0, 0, 1] = [0.9, 0.1]  # clearly code 0
    h[0, :, 0, 0, 2] = [-0.9, 0.1]  # clearly code 2
    gaps = code_gaps(h, codebook)
    assert gaps.shape == (1, 1, 1, 3) and gaps[0, 0, 0, 0] < 1e-12 and gaps[0, 0, 0, 1] > 1
    ref = np.stack([codebook[0], codebook[0], codebook[2]], -1).reshape(1, 2, 1, 1, 3)
    got = ref.copy()
    got[0, :, 0, 0, 0] = codebook[1]  # the tie broken the other way
    tol = Tolerance(1e-4, 1.0, tie_gap=1e-6)
    r = compare("encoder", "ort-cpu/fp32", got, ref, tol, gaps)
    assert r and r.code_agreement == 1.0 and r.ties == 1 and "(1 ties)" in str(r)
    got[0, :, 0, 0, 1] = codebook[1]  # a real disagreement
    r = compare("encoder", "ort-cpu/fp32", got, ref, tol, gaps)
    assert not r and r.code_agreement == pytest.approx(2 / 3) and r.ties == 1
    assert not compare("encoder", "x", got, ref, Tolerance(1e-4, 1.0), gaps)  # no tie_gap: no excuse
