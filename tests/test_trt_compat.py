"""The TensorRT-compatibility checker flags what TensorRT cannot build; exported graphs pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aldm.export.trt_compat import check_file, check_graph


def _model(nodes, inputs, initializers=(), opset=21):
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4, 4])
W = numpy_helper.from_array(np.ones((2, 2, 3, 3, 3), np.float32), "w")


def test_a_static_conv_graph_is_clean():
    m = _model([helper.make_node("Conv", ["x", "w"], ["h"], pads=[1] * 6),
                helper.make_node("Relu", ["h"], ["out"])], [X], [W])
    assert check_graph(m) == []


def test_conv_with_runtime_weights_is_flagged():
    wi = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2, 3, 3, 3])
    m = _model([helper.make_node("Conv", ["x", "w"], ["out"], name="dyn_conv")], [X, wi])
    (off,) = check_graph(m)
    assert off.node == "dyn_conv" and "weights must be constant" in off.reason


@pytest.mark.parametrize("op,reason", [("NonZero", "data-dependent"), ("Det", "not supported"),
                                       ("Unique", "data-dependent")])
def test_unsupported_or_data_dependent_ops_are_flagged(op, reason):
    m = _model([helper.make_node(op, ["x"], ["out"], name="bad")], [X])
    offenses = check_graph(m)
    assert [o.node for o in offenses] == ["bad"] and reason in offenses[0].reason


def test_loop_and_custom_domain_and_opset_are_flagged():
    body = helper.make_graph([], "body", [], [])
    loop = helper.make_node("Loop", ["", ""], ["out"], body=body, name="loop")
    custom = helper.make_node("MyOp", ["x"], ["y"], domain="com.example", name="custom")
    m = _model([loop, custom], [X], opset=25)
    reasons = " | ".join(str(o) for o in check_graph(m))
    assert "control flow" in reasons and "com.example" in reasons and "opset 25" in reasons


def test_resize_modes():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2, 2], np.float32), "s")
    ok = helper.make_node("Resize", ["x", "", "s"], ["out"], mode="nearest", nearest_mode="floor",
                          coordinate_transformation_mode="asymmetric")
    bad = helper.make_node("Resize", ["x", "", "s"], ["out"], mode="cubic", name="cubic")
    assert check_graph(_model([ok], [X], [scales])) == []
    assert "cubic" in str(check_graph(_model([bad], [X], [scales]))[0])


def test_every_exported_graph_passes(tiny_export):
    for f in ("encoder.onnx", "spade.onnx", "unet.onnx", "decoder.onnx"):
        assert check_file(tiny_export / f) == [], f
        ops = {n.op_type for n in onnx.load(str(tiny_export / f)).graph.node}
        assert not ops & {"Loop", "If", "Scan", "Einsum"}
    unet_ops = {n.op_type for n in onnx.load(str(tiny_export / "unet.onnx")).graph.node}
    assert "ReduceMean" in unet_ops and "GroupNormalization" not in unet_ops  # staged (stable_norm)
