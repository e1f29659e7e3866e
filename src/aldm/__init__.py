"""aldm: ALDM 3-D MRI modality translation, deployable.

Importing aldm never imports torch; the model definitions live in `aldm.models` (torch),
the inference path in `aldm.runtime` (numpy + onnxruntime / TensorRT).
"""

from aldm.errors import AldmError

__version__ = "0.1.0"

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Modality order of the official model: the target class y indexes this tuple."""

MODALITY_ALIASES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c", "t1gd"), "t2": ("t2", "t2w"),
                    "flair": ("flair", "t2f")}
"""File-name suffixes of each modality: BraTS 2018-2021 names, then BraTS 2023 ones."""

__all__ = ["AldmError", "MODALITIES", "MODALITY_ALIASES", "__version__"]
