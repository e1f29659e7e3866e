"""The `torch` backend: PyTorch eager on the checkpoint a model folder records, for parity checks
and debugging. The runtime never imports it; the command line registers it with
aldm.runtime.backends.register_backend, so an inference without it needs no torch."""

from __future__ import annotations

from aldm.errors import BackendError, ModelError
from aldm.runtime.backends import register_backend
from aldm.runtime.manifest import COMPONENTS, ModelDir
from aldm.runtime.runners import Runner


def register() -> None:
    register_backend("torch", torch_runners)


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
    try:  # a relative path is found in the repository above the model folder, sha256 checked
        ref = reference_model(model, hint="run it from a clone of the aldm repository, which "
                                          "holds the file (or compare with `aldm check --reference CKPT`)")
    except ModelError as exc:
        raise BackendError(f"the torch backend needs the model's PyTorch weights: {exc}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {c: TorchRunner(ref, c, device) for c in COMPONENTS}
