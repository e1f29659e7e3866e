"""The QDQ ONNX `aldm calibrate` writes, in the form TensorRT's explicit quantization accepts.

`aldm calibrate` quantizes for ONNX Runtime on the CPU: UINT8 activations with a zero point
(asymmetric), INT8 per-channel weights with zero point 0, INT32 biases behind a DequantizeLinear.
TensorRT quantizes symmetrically only: signed INT8, zero point 0 (its ONNX parser refuses any
other zero point), and dequantizes INT8/FP8/INT4, not INT32. So, from the same calibration:
- each activation's calibrated range [(0 - z) s, (255 - z) s] becomes the symmetric range that
  covers it: scale max(z, 255 - z) s / 127, INT8 zero point 0 (a range that is not centred on 0
  loses up to one bit of resolution; the calibration itself is unchanged);
- each INT32 bias is folded back to float (TensorRT fuses the bias into the INT8 convolution);
- weights are already symmetric INT8 and stay as they are.
"""

from __future__ import annotations

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def tensorrt_qdq(model):
    """A copy of `model` (an onnx.ModelProto) with symmetric INT8 activations and float biases;
    a graph without Q/DQ nodes comes back unchanged."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from aldm.errors import ModelError

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    pairs: dict[str, str] = {}  # UINT8 zero point -> its scale
    folded: dict[str, np.ndarray] = {}  # DequantizeLinear output -> float bias
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        x, scale, zp = (list(node.input) + ["", ""])[:3]
        if node.op_type == "DequantizeLinear" and x in inits and inits[x].data_type == TensorProto.INT32:
            q = numpy_helper.to_array(inits[x]).astype(np.float64)
            z = numpy_helper.to_array(inits[zp]).astype(np.float64) if zp else 0.0
            folded[node.output[0]] = ((q - z) * numpy_helper.to_array(inits[scale])).astype(np.float32)
        elif zp and zp in inits and inits[zp].data_type == TensorProto.UINT8:
            if pairs.setdefault(zp, scale) != scale:
                raise ModelError(f"{graph.name}: zero point {zp} is used with two scales")
    for zp, scale in pairs.items():
        z = numpy_helper.to_array(inits[zp]).astype(np.float32)
        s = numpy_helper.to_array(inits[scale]).astype(np.float32)
        amax = np.maximum(z, 255 - z) * s  # the larger side of the calibrated range
        inits[scale].CopyFrom(numpy_helper.from_array((amax / 127).astype(np.float32), scale))
        inits[zp].CopyFrom(numpy_helper.from_array(np.zeros(z.shape, np.int8), zp))
    if folded:
        kept = [n for n in graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
        used = {i for n in graph.node for i in n.input}
        unused = [i for i in graph.initializer if i.name not in used and i.name not in folded]
        for i in unused:
            graph.initializer.remove(i)
    return model


def has_qdq(model) -> bool:
    """True if the graph quantizes anything (an INT8 variant keeps some components in float)."""
    return any(n.op_type in QDQ_OPS for n in model.graph.node)
