"""Read the state_dict of an official (PyTorch Lightning) checkpoint without executing its code.

Lightning 1.2 checkpoints (the official VQ-GAN) key their `callbacks` dict by callback classes,
so torch's `weights_only` loader refuses them and plain unpickling would import (and run)
whatever the file names. This module's unpickler materialises tensors and plain containers
only; every other global the file references becomes an inert placeholder class whose
construction does nothing. A payload such as `os.system` therefore never runs.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from aldm.errors import CheckpointError

_SAFE_GLOBALS: dict[str, set[str]] = {
    "collections": {"OrderedDict"},
    "builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str",
                 "bytes", "bytearray", "complex", "slice"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                     "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "torch": {"Size", "device", "float32", "float64", "float16", "bfloat16", "int64", "int32",
              "int16", "int8", "uint8", "bool", "complex64", "complex128"},
    "torch.serialization": {"_get_layout"},
}


class _Inert:
    """Stands in for any class or function a checkpoint names that is not on the allow-list."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_stubs: dict[tuple[str, str], type] = {}


def _stub(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stubs:
        _stubs[key] = type(name, (_Inert,), {"__module__": f"aldm.inert.{module}"})
    return _stubs[key]


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        return _stub(module, name)


# torch.load wants a module-like object with an Unpickler (and load for the legacy format).
restricted_pickle = types.ModuleType("aldm_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the top-level dict of a checkpoint file, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
            KeyError, TypeError, AttributeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint (or the file itself if it is a bare state_dict)."""
    return state_dict_of(read_checkpoint(path), path)


def state_dict_of(obj: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path} has no state_dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_names(bad)}")
    return sd


def save_official(path: str | Path, state_dict: dict[str, torch.Tensor],
                  ema: dict[str, torch.Tensor] | None = None, *, epoch: int = 0,
                  global_step: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint in the official Lightning layout (atomically: temp file, then rename).

    `ema` maps UNet parameter names (`input_blocks.0.0.weight`...) to their EMA values, stored
    under the official dot-free `model_ema.*` names with the decay/num_updates bookkeeping.
    """
    from aldm.models.loader import ema_name

    sd = dict(state_dict)
    if ema is not None:
        sd.update({ema_name(k): v for k, v in ema.items()})
        sd.setdefault("model_ema.decay", torch.tensor(0.9999))
        sd.setdefault("model_ema.num_updates", torch.tensor(global_step, dtype=torch.int32))
    obj = {"epoch": epoch, "global_step": global_step, "pytorch-lightning_version": "1.6.3",
           "state_dict": sd, **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    tmp.replace(path)


def _names(keys, limit: int = 6) -> str:
    keys = sorted(map(str, keys))
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
