"""aldm: ALDM 3-D MRI modality translation, deployable.

Importing aldm never imports torch; the model definitions live in `aldm.models` (torch),
the inference path in `aldm.runtime` (numpy + onnxruntime / TensorRT).
"""

from aldm.errors import AldmError

__version__ = "0.1.0"

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Modality order of the official model: the target class y indexes this tuple."""

__all__ = ["AldmError", "MODALITIES", "__version__"]
