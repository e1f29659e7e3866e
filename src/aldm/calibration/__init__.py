"""Calibration for reduced precision: collect real component inputs by running the sampler over
source volumes, then quantize (static INT8, QDQ). ONNX Runtime runs the QDQ graphs as written;
`aldm build --int8` builds TensorRT engines from the same graphs (explicit quantization,
`aldm.export.trt_qdq`)."""
