"""Read the state_dict of an official (PyTorch Lightning) checkpoint without executing its code.

A checkpoint is untrusted input. Before torch sees a byte of it, `read_checkpoint`:

1. checks the container: a zip archive as `torch.save` writes it (one top-level folder holding
   `data.pkl`, `data/<key>` storages and a few small metadata records), every member STORED
   (uncompressed), members laid out without overlap inside the file. TorchScript archives
   (`code/`, `constants.pkl`), legacy non-zip pickles and anything else are refused;
2. scans `data.pkl` statically (`pickletools.genops`, nothing executed) and lists every global
   it names, resolving protocol-4 STACK_GLOBAL operands through a model of the pickle stack and
   memo (unresolvable: refused). Only tensor/parameter rebuilding, `collections.OrderedDict`,
   `torch.Size`, dtypes and storage types are allowed, plus Lightning callback classes
   (`pytorch_lightning.callbacks.*`), which Lightning 1.2 uses as the keys of its `callbacks`
   dict and which load as inert placeholder classes. No builtin callable (bytes, bytearray,
   `_codecs.encode`, ...) and no object construction opcode (INST, OBJ, NEWOBJ) gets through;

then it loads the file with torch's own `weights_only=True` unpickler (which checks every
storage record against the size the pickle claims for it) and finally checks every tensor: a
strided CPU view that fits its storage without overlapping itself (no stride-0 expansion), no
backward hooks, and all distinct views together no larger than the storages in the file. Every
refusal is a one-line CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from aldm.atomic import atomic_path
from aldm.errors import CheckpointError

MAX_PICKLE_BYTES = 64 << 20  # data.pkl; an official LDM checkpoint's is ~150 KB
MAX_META_BYTES = 4096  # version, byteorder, .format_version, ...
MAX_MEMBERS = 200_000

_META_RECORDS = {"version", ".data/version", "byteorder", ".data/serialization_id",
                 ".format_version", ".storage_alignment"}
_STORAGE_KEY = re.compile(r"data/[A-Za-z0-9_.-]+")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# Opcodes torch's weights_only unpickler reads, minus NEWOBJ (object construction). Pickle
# builds lists, dicts and tuples with these and no global at all.
_PICKLE_OPS = {
    "PROTO", "STOP", "MARK", "GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "APPEND", "APPENDS", "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING",
    "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
}
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8"}
_CALLBACK_MODULES = ("pytorch_lightning.callbacks",)


def _allowed_globals() -> frozenset[str]:
    names = {"collections.OrderedDict", "torch.Size", "torch._utils._rebuild_tensor_v2",
             "torch._utils._rebuild_parameter"}
    for dtype, storage in torch.storage._dtype_to_storage_type_map().items():
        names.add(str(dtype))  # "torch.float32"
        names.add(f"torch.{storage}")  # "torch.FloatStorage" (inside storage persistent ids)
    return frozenset(names)


_ALLOWED = _allowed_globals()


def _is_callback_class(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return attr.isidentifier() and any(module == m or module.startswith(m + ".")
                                       for m in _CALLBACK_MODULES)


class _Inert:
    """Stands in for a Lightning callback class (a `callbacks` dict key); does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_placeholders: dict[str, type] = {}


def _placeholder(name: str) -> type:
    if name not in _placeholders:
        module, _, attr = name.rpartition(".")
        _placeholders[name] = type(attr, (_Inert,), {"__module__": f"aldm.inert.{module}",
                                                     "__qualname__": attr})
    return _placeholders[name]


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({why})")


# ---------------------------------------------------------------------------- container


def _check_container(f: BinaryIO, path: Path, size: int) -> tuple[str, int]:
    """Validate the zip layout; return the archive folder and the total bytes of its storages."""
    head = f.read(len(_LEGACY_MAGIC))
    if not head:
        raise _fail(path, "empty file")
    if head.startswith(_LEGACY_MAGIC) or head[:1] == b"\x80":
        raise _fail(path, "a legacy non-zip torch pickle; aldm reads only the zip format "
                          "torch.save has written since torch 1.6")
    if not head.startswith(_ZIP_MAGIC):
        raise _fail(path, "not a zip archive")
    f.seek(0)
    try:
        # count the entries before zipfile builds one object for each
        endrec = getattr(zipfile, "_EndRecData", lambda _: None)(f)
        if endrec and endrec[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
            raise _fail(path, f"{endrec[zipfile._ECD_ENTRIES_TOTAL]} zip members; "
                              f"at most {MAX_MEMBERS} expected")
        f.seek(0)
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise _fail(path, f"damaged or truncated zip: {_first_line(exc)}") from None
    if not infos:
        raise _fail(path, "empty zip archive")
    if len(infos) > MAX_MEMBERS:
        raise _fail(path, f"{len(infos)} zip members; at most {MAX_MEMBERS} expected")

    for info in infos:
        _, _, rel = info.filename.partition("/")
        if rel == "constants.pkl" or rel.startswith("code/") or info.filename == "constants.pkl":
            raise CheckpointError(f"{path} is a TorchScript archive, not a checkpoint; "
                                  "aldm never runs code from a file")
    rels: dict[str, zipfile.ZipInfo] = {}
    prefixes = set()
    for info in infos:
        prefix, _, rel = info.filename.partition("/")
        prefixes.add(prefix)
        if rel in rels:
            raise _fail(path, f"zip member {info.filename} appears twice")
        rels[rel] = info
    if len(prefixes) != 1 or "" in rels:
        raise _fail(path, "zip members are not all in one archive folder as torch.save writes them")
    (prefix,) = prefixes
    if "data.pkl" not in rels:
        raise _fail(path, "no data.pkl in the archive")
    for rel in rels:
        if rel not in _META_RECORDS and rel != "data.pkl" and not _STORAGE_KEY.fullmatch(rel):
            raise _fail(path, f"unexpected zip member {prefix}/{rel}; a torch.save checkpoint "
                              "holds only data.pkl, data/<key> and metadata records")

    spans, storage_bytes = [], 0
    for rel, info in rels.items():
        name = info.filename
        if info.flag_bits & 0x1:
            raise _fail(path, f"zip member {name} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _fail(path, f"zip member {name} is compressed; torch.save stores members "
                              "uncompressed, and aldm does not inflate data it cannot size")
        limit = {"data.pkl": MAX_PICKLE_BYTES}.get(rel, MAX_META_BYTES if rel in _META_RECORDS
                                                   else None)
        if limit is not None and info.file_size > limit:
            raise _fail(path, f"zip member {name} claims {info.file_size} bytes; "
                              f"at most {limit} expected")
        start, data_start = info.header_offset, _data_offset(f, info, path)
        end = data_start + info.file_size
        if end > size:
            raise _fail(path, f"zip member {name} claims {info.file_size} bytes, past the end "
                              f"of the {size}-byte file")
        spans.append((start, end, name))
        if rel.startswith("data/"):
            storage_bytes += info.file_size
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise _fail(path, f"zip members {name} and {other} overlap")
    return prefix, storage_bytes


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo, path: Path) -> int:
    """Where the member's bytes start, from its local header (which must agree with the
    central directory: same name, STORED, same sizes unless a data descriptor follows)."""
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise _fail(path, f"zip member {info.filename}: local header past the end of the file")
    sig, _, flags, method, _, _, _, csize, usize, nlen, xlen = _LOCAL_HEADER.unpack(raw)
    name = f.read(nlen).decode("utf-8" if flags & 0x800 else "cp437", "replace")
    if sig != _ZIP_MAGIC or name != info.filename:
        raise _fail(path, f"zip member {info.filename}: local header does not match the "
                          "central directory")
    if method != zipfile.ZIP_STORED:
        raise _fail(path, f"zip member {info.filename} is compressed; torch.save stores members "
                          "uncompressed, and aldm does not inflate data it cannot size")
    if not flags & 0x8 and 0xFFFFFFFF not in (csize, usize) and (csize, usize) != (
            info.file_size, info.file_size):
        raise _fail(path, f"zip member {info.filename}: local header and central directory "
                          "disagree on its size")
    return info.header_offset + _LOCAL_HEADER.size + nlen + xlen


# ---------------------------------------------------------------------------- pickle scan

_MARK, _ANY = object(), object()


def _scan_pickle(data: bytes, path: Path) -> list[str]:
    """Every global `data.pkl` names, found without executing it; refuses what a checkpoint
    never needs. Returns the Lightning callback classes to register as inert placeholders."""
    names: list[str] = []
    bad_ops: set[str] = set()
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop() -> Any:
        if not stack or stack[-1] is _MARK:
            raise ValueError("stack underflow")
        return stack.pop()

    try:
        for op, arg, _ in pickletools.genops(data):
            op_name = op.name
            if op_name not in _PICKLE_OPS:
                bad_ops.add(op_name)
            if op_name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                names.append(f"{module}.{attr}")
            elif op_name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if type(module) is not str or type(attr) is not str:
                    raise CheckpointError(
                        f"{path} names a global (STACK_GLOBAL) whose name cannot be read "
                        "without running the pickle; refused")
                names.append(f"{module}.{attr}")
                stack.append(_ANY)
                continue
            if op_name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is _MARK:
                    raise ValueError("memo store from an empty stack")
                memo[len(memo) if op_name == "MEMOIZE" else arg] = stack[-1]
            elif op_name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise ValueError(f"memo key {arg} read before it is written")
                stack.append(memo[arg])
            elif op_name == "DUP":
                top = pop()
                stack += [top, top]
            elif op_name == "POP":
                if not stack:
                    raise ValueError("stack underflow")
                stack.pop()  # pops an object, or the mark if the frame is empty (as pickle does)
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    while stack and stack[-1] is not _MARK:
                        stack.pop()
                    if not stack:
                        raise ValueError("no MARK before an opcode that needs one")
                    stack.pop()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                for item in op.stack_after:
                    stack.append(_MARK if item is pickletools.markobject
                                 else arg if op_name in _STRING_OPS else _ANY)
    except CheckpointError:
        raise
    except Exception as exc:  # genops and the stack model: a malformed pickle
        raise _fail(path, f"data.pkl is not a well-formed pickle: {_first_line(exc)}") from None

    refused = sorted({n for n in names if n not in _ALLOWED and not _is_callback_class(n)})
    if refused:
        raise CheckpointError(
            f"{path} names {_names(refused, 4)}, which a checkpoint never needs "
            "(allowed: tensors, OrderedDict, torch.Size, dtypes, Lightning callback classes); "
            "refused without running anything")
    if bad_ops:
        raise _fail(path, f"data.pkl uses pickle opcodes {_names(bad_ops, 4)}; a torch.save "
                          "checkpoint (pickle protocol 2) never does")
    return sorted({n for n in names if _is_callback_class(n)})


# ---------------------------------------------------------------------------- tensors


def _check_tensors(obj: Any, path: Path, storage_bytes: int) -> None:
    seen: set[int] = set()
    views: set[tuple] = set()
    total = 0
    todo = [obj]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if not isinstance(x, (type, torch.Tensor)) and hasattr(x, "__dict__"):
            todo.extend(vars(x).values())  # e.g. the `_metadata` an OrderedDict's BUILD sets
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
        elif isinstance(x, torch.Tensor):
            nbytes = _check_view(x, path)
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape),
                   x.stride(), x.dtype)
            if key not in views:
                views.add(key)
                total += nbytes
    if total > storage_bytes:
        raise _fail(path, f"its tensors address {total} bytes but its storages hold only "
                          f"{storage_bytes}")


def _check_view(t: torch.Tensor, path: Path) -> int:
    if t.layout is not torch.strided or t.device.type != "cpu":
        raise _fail(path, f"a {t.layout} tensor on {t.device}; only dense CPU tensors expected")
    if t._backward_hooks:
        raise _fail(path, "a tensor carries backward hooks")
    item, numel = t.element_size(), t.numel()
    capacity = t.untyped_storage().nbytes()
    if numel == 0:
        return 0
    if any(s < 0 for s in t.stride()) or t.storage_offset() < 0:
        raise _fail(path, f"a tensor of shape {tuple(t.shape)} has negative strides")
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if (last + 1) * item > capacity or numel * item > capacity:
        raise _fail(path, f"a tensor of shape {tuple(t.shape)} and stride {t.stride()} claims "
                          f"{numel * item} bytes from a {capacity}-byte storage")
    return numel * item


# ---------------------------------------------------------------------------- public


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the top-level dict of a checkpoint file, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix, storage_bytes = _check_container(f, path, size)
            with zipfile.ZipFile(f) as z:
                pkl = z.read(f"{prefix}/data.pkl")
            callbacks = _scan_pickle(pkl, path)
            f.seek(0)
            with torch.serialization.safe_globals([(_placeholder(n), n) for n in callbacks]):
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    except CheckpointError:
        raise
    except Exception as exc:  # torch's weights_only unpickler, record-size checks, I/O
        raise _fail(path, _torch_reason(exc)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    _check_tensors(obj, path, storage_bytes)
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: the archive folder is "archive", not the temp name


def _torch_reason(exc: BaseException) -> str:
    """The cause in torch's message, without its advice (to reload with weights_only=False)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = found.group(1).strip() if found else _first_line(exc)
    return reason.split(" This is an internal miniz error")[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _names(keys, limit: int = 6) -> str:
    keys = sorted(map(str, keys))
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
