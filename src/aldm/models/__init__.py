"""PyTorch definitions of the official ALDM model and the loader for official checkpoints.

Needs torch (`pip install 'aldm[export]'`); the inference path (`aldm.runtime`) does not.
"""

from aldm.errors import require

require("torch", "export")

from aldm.models.aldm import ALDM, VQModel  # noqa: E402
from aldm.models.config import DDConfig, LDMConfig, UNetConfig, VQConfig  # noqa: E402
from aldm.models.loader import build_from_state_dict, load_official  # noqa: E402

__all__ = ["ALDM", "VQModel", "DDConfig", "LDMConfig", "UNetConfig", "VQConfig",
           "build_from_state_dict", "load_official"]
