"""TensorRT backend (engines built by `aldm build`). Filled in by the TensorRT work."""

from __future__ import annotations

from aldm.errors import BackendError
from aldm.runtime.manifest import ModelDir


def engines_usable(model: ModelDir) -> bool:
    """True when TensorRT, a GPU and current engines for this model are all present."""
    return False


def make_runners(model: ModelDir, *, precision: str = "fp16"):
    raise BackendError("no TensorRT engines for this model; build them with `aldm build`")
