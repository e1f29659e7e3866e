"""What a model folder may name, and which TensorRT engines are ever deserialised.

Every file a manifest names is a plain base name inside the folder (no path separators, no
`..`, not absolute, not empty, not a symbolic link), checked when ModelDir opens, before any
file is hashed or opened. An engine is deserialised only from the bytes that were hashed and
found equal to the sha256 registered in its sidecar, and only an engine registered as
version-compatible may run embedded host code. No torch, TensorRT or GPU needed: the model
folder is synthetic (ModelDir only hashes files) and TensorRT is a fake module.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import aldm.runtime.manifest as manifest_mod
from aldm.errors import BackendError, ModelError
from aldm.runtime import trt
from aldm.runtime.manifest import (COMPONENTS, MANIFEST, ComponentSpec, Manifest, ModelDir, TensorSpec,
                                   sha256_file)


def _spec(name: str) -> ComponentSpec:
    return ComponentSpec(name, f"{name}.onnx", (TensorSpec("z", ("batch", 2, 4), "float32"),),
                         (TensorSpec("out", ("batch", 2, 4), "float32"),))


def make_folder(root: Path) -> Path:
    """A model folder ModelDir accepts: four 'graphs' (random bytes), a schedule, an fp16 variant."""
    d = root / "model"
    d.mkdir()
    rng = np.random.default_rng(0)
    for c in COMPONENTS:
        (d / f"{c}.onnx").write_bytes(rng.bytes(256))
        (d / f"{c}.fp16.onnx").write_bytes(rng.bytes(128))
    np.savez(d / "schedule.npz", betas=np.linspace(0, 1, 10, dtype=np.float32))
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir())}
    m = Manifest(components={c: _spec(c) for c in COMPONENTS}, latent_shape=(2, 4, 4, 4), files=files,
                 variants={"fp16": {c: f"{c}.fp16.onnx" for c in COMPONENTS}})
    (d / MANIFEST).write_text(m.to_json())
    return d


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path)


@pytest.fixture
def no_hashing(monkeypatch):
    """Fail the test if ModelDir hashes (or opens, through sha256_file) any file."""
    calls = []
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p, *a, **k: calls.append(p) or "0" * 64)
    return calls


def test_a_clean_folder_opens(folder):
    md = ModelDir(folder)
    assert md.precisions == ["fp32", "fp16"]
    assert md.component_file("unet", "fp16") == folder / "unet.fp16.onnx"


def _outside(folder: Path, name: str = "x.onnx") -> tuple[Path, str]:
    """A file outside the model folder, and its sha256 (so a hash check alone would accept it)."""
    p = folder.parent / name
    p.write_bytes(b"not part of the model")
    return p, sha256_file(p)


BAD_NAMES = ["../x.onnx", "ABSOLUTE", "sub/x.onnx", "sub\\x.onnx", "", "..", "x/../unet.onnx"]


def _bad(folder: Path, name: str) -> str:
    return str(_outside(folder)[0]) if name == "ABSOLUTE" else name


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("where", ["component", "files", "schedule", "variant"])
def test_a_manifest_naming_a_path_outside_the_folder_is_refused_at_load(folder, no_hashing, name, where):
    bad = _bad(folder, name)
    _, digest = _outside(folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "x.onnx").write_bytes(b"not part of the model")

    def edit(m):
        if where == "component":
            m["components"]["unet"]["file"] = bad
        elif where == "schedule":
            m["schedule"]["file"] = bad
        elif where == "variant":
            m["variants"]["fp16"]["unet"] = bad
        if where == "files" or bad:
            m["files"][bad] = digest  # listed, with the outside file's real hash

    edit_manifest(folder, edit)
    with pytest.raises(ModelError) as err:
        ModelDir(folder)
    msg = str(err.value)
    assert "\n" not in msg and repr(bad) in msg, msg
    with pytest.raises(ModelError):
        ModelDir(folder, verify=False)  # checked on opening, whether or not hashes are verified
    assert no_hashing == []  # refused before anything was hashed


def test_a_non_string_file_name_is_refused(folder, no_hashing):
    edit_manifest(folder, lambda m: m["components"]["unet"].update(file=None))
    with pytest.raises(ModelError, match="unet"):
        ModelDir(folder)
    assert no_hashing == []


def test_a_symlink_out_of_the_folder_is_refused(folder, no_hashing):
    outside = folder.parent / "elsewhere.onnx"
    outside.write_bytes((folder / "unet.onnx").read_bytes())  # same bytes: the hash would pass
    (folder / "unet.onnx").unlink()
    (folder / "unet.onnx").symlink_to(outside)
    with pytest.raises(ModelError, match=r"unet\.onnx.*symbolic link") as err:
        ModelDir(folder)
    assert "\n" not in str(err.value)
    assert no_hashing == []


def test_a_symlink_inside_the_folder_is_refused_too(folder):
    (folder / "copy.onnx").write_bytes((folder / "unet.onnx").read_bytes())
    (folder / "unet.onnx").unlink()
    (folder / "unet.onnx").symlink_to("copy.onnx")
    with pytest.raises(ModelError, match="symbolic link"):
        ModelDir(folder)


def test_a_named_file_the_manifest_does_not_hash_is_refused(folder, no_hashing):
    """A component file that is not in `files` would be run without ever being verified."""
    (folder / "other.onnx").write_bytes(b"unverified")
    edit_manifest(folder, lambda m: m["components"]["decoder"].update(file="other.onnx"))
    with pytest.raises(ModelError, match="'other.onnx'.*not hashed"):
        ModelDir(folder)
    assert no_hashing == []


@pytest.mark.parametrize("name", ["unet.onnx", "unet.fp16.onnx", "schedule.npz"])
def test_a_file_changed_after_export_is_named(folder, name):
    data = bytearray((folder / name).read_bytes())
    data[10] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=rf"{name}: sha256 does not match the manifest") as err:
        ModelDir(folder)
    assert "\n" not in str(err.value)
    ModelDir(folder, verify=False)  # the names are fine; only the hash check objects


def test_add_variant_refuses_names_outside_the_folder(folder):
    md = ModelDir(folder)
    _, _ = _outside(folder)
    before = (folder / MANIFEST).read_text()
    with pytest.raises(ModelError, match=r"'\.\./x\.onnx'"):
        md.add_variant("int8", {c: "../x.onnx" for c in COMPONENTS})
    assert (folder / MANIFEST).read_text() == before


def test_add_variant_rewrites_the_manifest_atomically(folder):
    md = ModelDir(folder)
    for c in COMPONENTS:
        (folder / f"{c}.int8.onnx").write_bytes(c.encode() * 10)
    md.add_variant("int8", {c: f"{c}.int8.onnx" for c in COMPONENTS})
    assert ModelDir(folder).precisions == ["fp32", "fp16", "int8"]
    assert not [p for p in folder.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("precision", ["../x", "fp16/../../y", ""])
def test_engine_paths_take_only_known_precisions(folder, precision):
    with pytest.raises(BackendError):
        trt.engine_paths(ModelDir(folder), "unet", precision)


# ------------------------------------------------------------------ engines (fake TensorRT)

GOOD = b"a serialized engine" * 50
EVIL = b"another engine, same length!" * 34


from test_trt_plan import FakeTensorRT  # noqa: E402 - one fake TensorRT for every engine test


@pytest.fixture
def fake_trt(monkeypatch):
    import aldm.runtime.cuda as cuda

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    class Stream:  # no CUDA here
        def sync(self):
            pass

        def destroy(self):
            pass

    monkeypatch.setattr(cuda, "Stream", Stream)
    return fake


def register(md: ModelDir, data: bytes, *, version_compatible: bool = False, sha: str | None = None,
             component: str = "unet", precision: str = "fp16") -> Path:
    """Write an engine and its sidecar the way `aldm build` registers it."""
    engine, side = trt.engine_paths(md, component, precision)
    engine.parent.mkdir(exist_ok=True)
    engine.write_bytes(data)
    opts = trt.BuildOptions(precision, version_compatible=version_compatible)
    key = trt.engine_key("a" * 64, opts, {"z": ((1, 2, 4),) * 3}, "10.99.0", "GPU", "9.0")
    side.write_text(json.dumps(trt.sidecar_doc(key, opts, sha or hashlib.sha256(data).hexdigest(), 1.0)))
    return engine


def runner(md: ModelDir, engine: Path) -> trt.TrtRunner:
    return trt.TrtRunner(engine, md.component("unet"))


def test_a_registered_engine_is_deserialized_without_host_code(folder, fake_trt):
    md = ModelDir(folder)
    r = runner(md, register(md, GOOD))
    r.activate()
    assert fake_trt.deserialized == [(GOOD, False)]
    r.deactivate()


def test_host_code_is_allowed_only_for_an_engine_registered_version_compatible(folder, fake_trt):
    md = ModelDir(folder)
    runner(md, register(md, GOOD, version_compatible=True)).activate()
    assert fake_trt.deserialized == [(GOOD, True)]


def test_an_engine_changed_after_registration_is_refused_before_deserialize(folder, fake_trt):
    md = ModelDir(folder)
    engine = register(md, GOOD, version_compatible=True)
    engine.write_bytes(EVIL)
    with pytest.raises(BackendError, match=r"unet\.fp16\.plan.*sha256") as err:
        runner(md, engine).activate()
    assert "\n" not in str(err.value)
    assert fake_trt.deserialized == []


def test_a_plan_that_is_not_registered_is_never_deserialized(folder, fake_trt):
    md = ModelDir(folder)
    engine = register(md, GOOD, version_compatible=True)
    engine.with_name(engine.name + ".json").unlink()
    with pytest.raises(BackendError, match="not registered"):
        runner(md, engine).activate()
    stray = engine.with_name("stray.plan")  # a plan dropped beside the registered ones
    stray.write_bytes(GOOD)
    with pytest.raises(BackendError, match="not registered"):
        runner(md, stray).activate()
    assert fake_trt.deserialized == []


@pytest.mark.parametrize("doc", ["not json", "{}", '{"engine_sha256": 5, "options": {}}',
                                 '{"engine_sha256": "' + "0" * 64 + '"}'])
def test_a_broken_registration_is_refused(folder, fake_trt, doc):
    md = ModelDir(folder)
    engine = register(md, GOOD)
    engine.with_name(engine.name + ".json").write_text(doc)
    with pytest.raises(BackendError):
        runner(md, engine).activate()
    assert fake_trt.deserialized == []


def test_a_symlinked_engine_is_refused(folder, fake_trt):
    md = ModelDir(folder)
    engine = register(md, GOOD)
    outside = folder.parent / "outside.plan"
    outside.write_bytes(GOOD)
    engine.unlink()
    engine.symlink_to(outside)
    with pytest.raises(BackendError, match="symbolic link|not a regular file"):
        runner(md, engine).activate()
    assert fake_trt.deserialized == []


def test_the_bytes_deserialized_are_the_bytes_hashed(folder, fake_trt, monkeypatch):
    """Swap the engine for other bytes the moment it is first opened: a runner that hashes one
    read and deserialises another would hand TensorRT the swapped bytes."""
    md = ModelDir(folder)
    engine = register(md, GOOD)
    target = os.path.realpath(engine)
    opened = []

    def swap_after(real):
        def wrapper(file, *args, **kwargs):
            result = real(file, *args, **kwargs)
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == target:
                opened.append(file)
                if len(opened) == 1:
                    tmp = engine.with_name("swap.tmp")
                    with real_open(tmp, "wb") as f:
                        f.write(EVIL)
                    os.replace(tmp, engine)
            return result
        return wrapper

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", swap_after(builtins.open))
    monkeypatch.setattr(io, "open", swap_after(io.open))
    monkeypatch.setattr(os, "open", swap_after(os.open))
    runner(md, engine).activate()
    assert opened, "the engine was never opened"
    assert [b for b, _ in fake_trt.deserialized] == [GOOD]
