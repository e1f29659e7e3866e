"""Calibration for reduced precision: collect real component inputs by running the sampler over
source volumes, then quantize for ONNX Runtime (static INT8, QDQ) or feed TensorRT's INT8
entropy calibrator (`aldm.calibration.trt_calibrator`)."""
