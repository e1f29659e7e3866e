"""Hostile checkpoint files: refused with one CheckpointError before anything runs or is allocated.

The files are built by hand (a tiny pickle assembler and a torch.save-style zip) so that each test
holds exactly the attack it names. Where it matters, a test also shows that plain torch would have
run or allocated what aldm refuses (so the test is not vacuous).
"""

from __future__ import annotations

import io
import pickle
import struct
import tracemalloc
import zipfile
from typing import Tuple

import pytest
import torch

from aldm.errors import CheckpointError
from aldm.models import LDMConfig, load_official
from aldm.models.checkpoint import read_checkpoint, read_state_dict, save_official

# ------------------------------------------------------------------ a tiny pickle assembler


def _str(x: str) -> bytes:  # BINUNICODE (protocol 1+)
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _str8(x: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    b = x.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = pickle.encode_long(n)
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:  # GLOBAL (protocol 0-3)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:  # STACK_GLOBAL (protocol 4)
    return _str8(module) + b"\x94" + _str8(name) + b"\x94" + b"\x93"


def _stack_global_via_memo(module: str, name: str) -> bytes:
    """The operands are memoised, dropped, and fetched back with BINGET before STACK_GLOBAL
    The global lands in memo slot 2 (use this first in a pickle)."""
    return _str8(module) + b"\x94" + _str8(name) + b"\x94" + b"00" + b"h\x00h\x01\x93\x94"


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _tuple(*args) + b"R"


def _tensor(numel=4, offset=0, size=(4,), stride=(1,), key="0") -> bytes:
    pid = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"),
                 _int(numel)) + b"Q"
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), pid, _int(offset),
                 _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89",
                 _call(_global("collections", "OrderedDict")))


def _ckpt(proto: int = 2, head: bytes = b"", **entries: bytes) -> bytes:
    """A pickle of {"state_dict": {"w": <4-float tensor>}, **entries}; `head` runs first."""
    entries.setdefault("state_dict", b"}" + _str("w") + _tensor() + b"s")
    body = b"".join(_str(k) + v for k, v in entries.items())
    return b"\x80" + bytes([proto]) + head + (b"0" if head else b"") + b"}(" + body + b"u."


def _zip(pkl: bytes, storages=None, *, compression=zipfile.ZIP_STORED, extra=()) -> bytes:
    storages = {"0": struct.pack("<4f", 1, 2, 3, 4)} if storages is None else storages
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
        for name, data in extra:
            z.writestr(name, data)
    return buf.getvalue()


def _file(tmp_path, data: bytes, name: str = "x.ckpt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_assembler_builds_a_checkpoint_aldm_reads(tmp_path):
    """The hand-built baseline loads, so each refusal below is due to its one attack."""
    sd = read_state_dict(_file(tmp_path, _zip(_ckpt())))
    assert torch.equal(sd["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


# ------------------------------------------------------------------ (a) TorchScript


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tag = "x"

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.tag, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        print("SCRIPTED-SETSTATE-RAN")
        self.tag = state[0]
        self.training = state[1]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_is_refused_and_its_code_never_runs(tmp_path, capfd):
    path = tmp_path / "model.ckpt"
    torch.jit.script(_Scripted()).save(str(path))
    capfd.readouterr()
    with pytest.raises(CheckpointError) as read_error:
        read_checkpoint(path)
    with pytest.raises(CheckpointError) as load_error:
        load_official(path, config=LDMConfig.tiny())
    out = capfd.readouterr()
    assert "SCRIPTED-SETSTATE-RAN" not in out.out + out.err
    for error in (read_error, load_error):
        assert str(error.value) == (f"{path} is a TorchScript archive, not a checkpoint; "
                                    "aldm never runs code from a file")
    torch.jit.load(str(path))  # what torch.load would have dispatched to: runs __setstate__
    out = capfd.readouterr()
    assert "SCRIPTED-SETSTATE-RAN" in out.out + out.err


# ------------------------------------------------------------------ (b) builtins allocation bombs

BOMBS = {
    "bytes_stack_global": (4, b"", _call(_stack_global("builtins", "bytes"), _int(300_000_000)),
                           "builtins.bytes"),
    "bytearray_global": (2, b"", _call(_global("builtins", "bytearray"), _int(300_000_000)),
                         "builtins.bytearray"),
    "bytearray_via_memo": (4, _stack_global_via_memo("builtins", "bytearray"),
                           _call(b"h\x02", _int(300_000_000)), "builtins.bytearray"),
}


@pytest.mark.parametrize("bomb", BOMBS, ids=list(BOMBS))
def test_builtins_allocation_bomb_is_refused_before_allocating(tmp_path, bomb):
    proto, head, blob, name = BOMBS[bomb]
    path = _file(tmp_path, _zip(_ckpt(proto, head, blob=blob)), "bomb.ckpt")
    assert path.stat().st_size < 2048
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=rf"bomb\.ckpt names {name}\b"):
            read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"refusing a 2 KB file allocated {peak} bytes"


# ------------------------------------------------------------------ (c) code execution payloads


def _system(form: str, marker) -> tuple[int, bytes, bytes]:
    arg = _str(f"touch {marker}")
    if form == "global":
        return 2, b"", _call(_global("posix", "system"), arg)
    if form == "stack_global":
        return 4, b"", _call(_stack_global("os", "system"), arg)
    return 4, _stack_global_via_memo("posix", "system"), _call(b"h\x02", arg)


@pytest.mark.parametrize("form", ["global", "stack_global", "stack_global_via_memo"])
def test_system_payload_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "pwned"
    proto, head, payload = _system(form, marker)
    path = _file(tmp_path, _zip(_ckpt(proto, head, callbacks=payload)), "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt names (os|posix)\.system"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"(os|posix)\.system"):
        load_official(path, config=LDMConfig.tiny())
    assert not marker.exists()
    torch.load(path, weights_only=False)  # plain unpickling runs it: the payload is real
    assert marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "builtins.getattr", "_codecs.encode",
                                  "torch.load", "torch._tensor._rebuild_from_type_v2",
                                  "pytorch_lightning.trainer.trainer.Trainer"])
def test_globals_a_checkpoint_never_needs_are_refused(tmp_path, name):
    module, _, attr = name.rpartition(".")
    path = _file(tmp_path, _zip(_ckpt(extra=_global(module, attr))))
    with pytest.raises(CheckpointError, match=rf"x\.ckpt names {name}, which a checkpoint never"):
        read_checkpoint(path)


def test_unresolvable_stack_global_fails_closed(tmp_path):
    # the module operand is a tuple, not a string: nothing static can say what it names
    pkl = _ckpt(4, extra=b")" + _str8("system") + b"\x93")
    with pytest.raises(CheckpointError, match=r"x\.ckpt names a global \(STACK_GLOBAL\) whose"):
        read_checkpoint(_file(tmp_path, _zip(pkl)))


def test_object_construction_opcodes_are_refused(tmp_path):
    newobj = _global("collections", "OrderedDict") + b")\x81"  # NEWOBJ of an allowed class
    with pytest.raises(CheckpointError, match="opcodes NEWOBJ"):
        read_checkpoint(_file(tmp_path, _zip(_ckpt(extra=newobj))))


# ------------------------------------------------------------------ (d) container


@pytest.fixture()
def small_ckpt(tmp_path):
    path = tmp_path / "small.ckpt"
    save_official(path, {"w": torch.zeros(1 << 20)})  # 4 MB of zeros: deflates to ~4 KB
    return path


def test_compressed_zip_member_is_refused(tmp_path, small_ckpt):
    src = zipfile.ZipFile(small_ckpt)
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=r"deflated\.ckpt .*member .* is compressed"):
        read_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].numel() == 1 << 20  # torch inflates


def _central_entries(data: bytes):
    """(offset of each central-directory header, its member name)."""
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        nlen = struct.unpack_from("<H", data, pos + 28)[0]
        yield pos, data[pos + 46: pos + 46 + nlen].decode()
        pos = data.find(b"PK\x01\x02", pos + 46 + nlen)


def test_member_sizes_past_the_end_of_the_file_are_refused(tmp_path, small_ckpt):
    data = bytearray(small_ckpt.read_bytes())
    for pos, name in _central_entries(bytes(data)):
        if name.endswith("/data/0"):
            struct.pack_into("<II", data, pos + 20, 0x7FFFFFF0, 0x7FFFFFF0)  # sizes
    path = _file(tmp_path, bytes(data), "huge.ckpt")
    with pytest.raises(CheckpointError, match=r"huge\.ckpt .*claims 2147483632 bytes, past the end"):
        read_checkpoint(path)


def test_two_members_sharing_the_same_bytes_are_refused(tmp_path):
    """Central-directory entries pointing at one stored member: N storages from one file span."""
    pkl = _ckpt(extra=b"}" + _str("v") + _tensor(key="1") + b"s")
    data = bytearray(_zip(pkl, {"0": struct.pack("<4f", 1, 2, 3, 4), "1": bytes(16)}))
    entries = dict((name, pos) for pos, name in _central_entries(bytes(data)))
    offset0 = struct.unpack_from("<I", data, entries["archive/data/0"] + 42)[0]
    struct.pack_into("<I", data, entries["archive/data/1"] + 42, offset0)
    path = _file(tmp_path, bytes(data), "alias.ckpt")
    with pytest.raises(CheckpointError, match=r"alias\.ckpt .*(overlap|does not match)"):
        read_checkpoint(path)


def test_legacy_non_zip_pickle_is_refused(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.ckpt .*legacy non-zip torch pickle"):
        read_checkpoint(path)


def test_unexpected_zip_member_is_refused(tmp_path):
    path = _file(tmp_path, _zip(_ckpt(), extra=[("archive/extra/run.py", "import os")]))
    with pytest.raises(CheckpointError, match=r"unexpected zip member archive/extra/run\.py"):
        read_checkpoint(path)


# ------------------------------------------------------------------ (e) tensor views


@pytest.mark.parametrize("view", [
    dict(size=(10**9,), stride=(0,)),  # a 4-byte storage expanded to 4 GB
    dict(size=(1000, 1000), stride=(0, 0)),
    dict(size=(10**9,), stride=(1,)),  # past the end of its storage
    dict(offset=3, size=(4,), stride=(1,)),
    dict(numel=10**9),  # the storage claims more elements than its record holds
], ids=["stride0", "stride0_2d", "too_long", "offset", "storage_numel"])
def test_tensor_view_that_does_not_fit_its_storage_is_refused(tmp_path, view):
    pkl = _ckpt(state_dict=b"}" + _str("w") + _tensor(**view) + b"s")
    with pytest.raises(CheckpointError, match=r"view\.ckpt is not a readable PyTorch checkpoint"):
        read_state_dict(_file(tmp_path, _zip(pkl), "view.ckpt"))


def test_tensors_addressing_more_than_the_stored_bytes_are_refused(tmp_path):
    """Two distinct full views of one 16-byte storage address 32 bytes."""
    two = b"}(" + _str("a") + _tensor() + _str("b") + _tensor(size=(2, 2), stride=(2, 1)) + b"u"
    with pytest.raises(CheckpointError, match="address 32 bytes but its storages hold only 16"):
        read_checkpoint(_file(tmp_path, _zip(_ckpt(state_dict=two))))


def test_views_of_one_storage_within_its_size_load(tmp_path):
    """Slices of one storage (as a saved view of a bigger tensor) are fine."""
    base = torch.arange(8.0)
    path = tmp_path / "views.ckpt"
    save_official(path, {"a": base[:4], "b": base[4:]})
    sd = read_state_dict(path)
    assert torch.equal(sd["a"], base[:4]) and torch.equal(sd["b"], base[4:])


def test_torch_refusals_are_reported_without_its_advice_to_disable_weights_only(tmp_path):
    """A structure torch's weights-only unpickler refuses (BUILD on a list): the one-line error
    gives the cause and never suggests loading with weights_only=False."""
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(_file(tmp_path, _zip(_ckpt(extra=b"]}b"))))
    message = str(error.value)
    assert message.endswith("(Can only build Tensor, Parameter, OrderedDict or types allowlisted "
                            "via `add_safe_globals`, but got <class 'list'>)")
    assert "\n" not in message and "weights_only" not in message
