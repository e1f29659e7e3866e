"""ONNX export (torch), the TensorRT-compatibility checker and precision plans (onnx only), and
PyTorch-vs-backend checks. Submodules import torch only where they need it."""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("export_model", "export_official"):
        from aldm.errors import require

        require("torch", "export")
        require("onnx", "export")
        from aldm.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(name)


__all__ = ["export_model", "export_official"]
