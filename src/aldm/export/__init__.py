"""ONNX export, the TensorRT-compatibility checker and PyTorch-vs-backend checks (needs torch)."""

from aldm.errors import require

require("torch", "export")
require("onnx", "export")

from aldm.export.onnx_export import export_model, export_official  # noqa: E402

__all__ = ["export_model", "export_official"]
