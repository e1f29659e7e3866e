"""Backend names -> runners for the four components; `auto` picks the fastest available."""

from __future__ import annotations

from aldm.errors import BackendError, UsageError
from aldm.runtime.manifest import COMPONENTS, ModelDir
from aldm.runtime.runners import OrtRunner, Runner

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "torch")


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def auto_order(model: ModelDir) -> list[str]:
    """Candidates for `auto`, best first: TensorRT (engines + GPU), ORT CUDA, ORT CPU."""
    from aldm.runtime import trt

    order = []
    if trt.engines_usable(model):
        order.append("trt")
    if ort_cuda_available():
        order.append("ort-cuda")
    order.append("ort-cpu")
    return order


def make_runners(model: ModelDir, backend: str = "ort-cpu", *, threads: int | None = None,
                 precision: str = "fp32") -> dict[str, Runner]:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = auto_order(model)[0]
    if backend in ("ort-cpu", "ort-cuda"):
        device = backend.split("-")[1]
        return {c: OrtRunner(model.file(model.component(c).file), model.component(c),
                             device=device, threads=threads) for c in COMPONENTS}
    if backend == "trt":
        from aldm.runtime import trt

        return trt.make_runners(model, precision=precision)
    return torch_runners(model)


def torch_runners(model: ModelDir) -> dict[str, Runner]:
    """PyTorch eager on the checkpoint the manifest records (for parity checks and debugging)."""
    try:
        import torch

        from aldm.export.check import TorchRunner, reference_model
    except ImportError:
        raise BackendError("the torch backend needs torch: pip install 'aldm[export]'") from None
    if not model.manifest.source.get("ldm_ckpt"):
        raise BackendError("the torch backend needs the source checkpoint, and this model's "
                           "manifest records none")
    ref = reference_model(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {c: TorchRunner(ref, c, device) for c in COMPONENTS}
