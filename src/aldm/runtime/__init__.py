"""Inference without torch: noise schedule, samplers, runners (ONNX Runtime, TensorRT), pipeline.

Submodules import their backend lazily; importing `aldm.runtime` loads numpy only.
"""
