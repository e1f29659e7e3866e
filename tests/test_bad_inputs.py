"""The bad-input corpus, run as a user would: real subprocesses (a test runner can hide tracebacks).

Every kind exits non-zero with one `error:` line naming the problem, no traceback and no partial
file; in a batch the good cases alongside still complete, bit-identical to a clean run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import edit_manifest, synthetic_volume, write_nifti

INFER = [sys.executable, "-m", "aldm.cli.infer"]
ALDM = [sys.executable, "-m", "aldm.cli.main"]
FAST = ["--targets", "t2", "--steps", "5", "--seed", "7", "--quiet"]


# ------------------------------------------------------------------------------ the corpus files

def _nii(path: Path, data, affine=None, **kw) -> Path:
    return write_nifti(path, data, affine, **kw)


def _patch_dims(path: Path, dims) -> Path:
    """Rewrite dim[0..3] of an uncompressed .nii header (offset 40, int16 x 8)."""
    b = bytearray(path.read_bytes())
    b[40:48] = np.asarray([len(dims), *dims], "<i2").tobytes()
    path.write_bytes(bytes(b))
    return path


def _degenerate_sform(path: Path) -> Path:
    img = nib.Nifti1Image(synthetic_volume(), np.eye(4))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:, 1] = 0  # a zero column: the y voxel axis maps to nowhere
    aff[3, 3] = 1
    img.set_sform(aff, code=1)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def _nan_affine(path: Path) -> Path:
    """An uncompressed .nii whose srow_x[0] (header offset 280, float32) is NaN, qform unset."""
    _nii(path, synthetic_volume(), qform_code=0, sform_code=1)
    b = bytearray(path.read_bytes())
    b[280:284] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(b))
    return path


def _with(data_fn):
    def make(path: Path) -> Path:
        return _nii(path, data_fn())
    return make


def _nan():
    v = synthetic_volume().astype(np.float32)
    v[20, 18, 10] = np.nan
    return v


def _inf():
    v = synthetic_volume().astype(np.float32)
    v[20, 18, 10] = np.inf
    return v


def _truncated_gzip(path: Path) -> Path:
    b = _nii(path, synthetic_volume()).read_bytes()
    path.write_bytes(b[: len(b) // 3])
    return path


def _truncated_nii(path: Path) -> Path:
    _nii(path, synthetic_volume())
    path.write_bytes(path.read_bytes()[:600])
    return path


def _huge_dims(path: Path) -> Path:
    return _patch_dims(_nii(path, synthetic_volume()), (30000, 30000, 30000))


def _zero_dim(path: Path) -> Path:
    return _patch_dims(_nii(path, synthetic_volume()), (40, 0, 20))


def _text(path: Path) -> Path:
    path.write_bytes(b"this is not a nifti file at all\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _complex(path: Path) -> Path:
    return _nii(path, synthetic_volume().astype(np.complex64))


def _rgb(path: Path) -> Path:
    rgb = np.zeros((40, 36, 20), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    rgb["R"] = synthetic_volume() // 4
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    return path


# name -> (file name, maker, what the one error line must say)
BAD_FILES = {
    "degenerate_sform": ("sform0.nii.gz", _degenerate_sform, "affine (sform/qform) is degenerate"),
    "nan_affine": ("nanaff.nii", _nan_affine, "affine (sform/qform) is degenerate"),
    "nan_voxels": ("nan.nii.gz", _with(_nan), "NaN or Inf voxels"),
    "inf_voxels": ("inf.nii.gz", _with(_inf), "NaN or Inf voxels"),
    "four_d": ("fourd.nii.gz", _with(lambda: np.ones((20, 20, 10, 3), np.int16)), "4-D series of 3 volumes"),
    "two_d": ("twod.nii.gz", _with(lambda: np.ones((40, 36), np.int16)), "2-D image"),
    "huge_header_dims": ("huge.nii", _huge_dims, "over the limit of"),
    "zero_dim": ("zerodim.nii", _zero_dim, "empty grid"),
    "truncated_gzip": ("trunc.nii.gz", _truncated_gzip, "corrupt or truncated gzip"),
    "truncated_nii": ("trunc2.nii", _truncated_nii, "trunc2.nii"),
    "not_nifti": ("text.nii.gz", _text, "not a readable NIfTI"),
    "empty_file": ("empty.nii.gz", _empty, "empty.nii.gz"),
    "all_zero": ("zeros.nii.gz", _with(lambda: np.zeros((30, 30, 20), np.int16)), "every voxel is 0"),
    "complex_dtype": ("complex.nii.gz", _complex, "complex or RGB"),
    "rgb_dtype": ("rgb.nii.gz", _rgb, "complex or RGB"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name, (fname, make, _) in BAD_FILES.items():
        make(d / fname)
    return d


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    for i in range(2):
        write_nifti(d / f"good{i}.nii.gz", synthetic_volume(seed=40 + i))
    return d


# ------------------------------------------------------------------------------ how a user sees it

def _run(cmd, *, cwd: Path | None = None, preexec=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, preexec_fn=preexec, stdin=subprocess.DEVNULL)


def _one_error_line(res: subprocess.CompletedProcess, expect: str, code: int | None = None) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode != 0, out
    if code is not None:
        assert res.returncode == code, out
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, f"expected one error line, got:\n{res.stderr}"
    assert expect.lower() in errors[0].lower(), errors[0]
    return errors[0]


def _no_partials(*folders: Path) -> None:
    for f in folders:
        left = [p for p in f.rglob("*") if ".partial" in p.name]
        assert not left, left


# ------------------------------------------------------------------------------ single files

@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_source_file_one_line_no_output(tiny_export, corpus, tmp_path, kind):
    fname, _, expect = BAD_FILES[kind]
    out = tmp_path / "out"
    res = _run([*INFER, corpus / fname, "--out", out, "--model", tiny_export, *FAST])
    line = _one_error_line(res, expect, code=1)
    assert fname in line  # names the file
    assert not list(out.rglob("*.nii*")) and not list(out.rglob("*.json")) if out.exists() else True
    _no_partials(tmp_path)


def test_degenerate_sform_single_file_mode_goes_on_to_the_next_source(tiny_export, corpus, good, tmp_path):
    out = tmp_path / "out"
    res = _run([*INFER, corpus / "sform0.nii.gz", good / "good0.nii.gz", "--out", out, "--model", tiny_export,
                *FAST])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "sform0.nii.gz" in res.stderr and "degenerate" in res.stderr
    assert (out / "good0_t2.nii.gz").is_file() and (out / "good0_t2.json").is_file()


@pytest.mark.parametrize("kind,args,expect", [
    ("missing_file", ["{tmp}/nope.nii.gz"], "no such file"),
    ("folder_as_source", ["{tmp}"], "is a folder"),
    ("wrong_extension", ["{tmp}/notes.txt"], "not a NIfTI file"),
])
def test_bad_source_paths(tiny_export, tmp_path, kind, args, expect):
    (tmp_path / "notes.txt").write_text("hello")
    res = _run([*INFER, *[a.format(tmp=tmp_path) for a in args], "--model", tiny_export, *FAST])
    _one_error_line(res, expect, code=1)


@pytest.mark.parametrize("args,expect", [
    (["--targets", "t2,nonsense"], "unknown target"),
    (["--targets", "t2", "--steps", "7"], "steps"),
    (["--targets", "t1"], "source modality"),
])
def test_usage_errors_exit_2(tiny_export, good, tmp_path, args, expect):
    res = _run([*INFER, good / "good0.nii.gz", "--out", tmp_path, "--model", tiny_export, "--quiet", *args])
    _one_error_line(res, expect, code=2)


def test_output_folder_under_a_regular_file(tiny_export, good, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    res = _run([*INFER, good / "good0.nii.gz", "--out", blocker / "sub", "--model", tiny_export, *FAST])
    _one_error_line(res, "not writable", code=1)
    res = _run([*INFER, "--batch", good, "--out", blocker / "sub", "--model", tiny_export, *FAST])
    _one_error_line(res, "cannot create the output folder", code=1)


def _file_size_limit(nbytes: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def test_disk_full_is_a_clean_failure_with_nothing_partial(tiny_export, tmp_path):
    src = write_nifti(tmp_path / "big.nii.gz", synthetic_volume(shape=(64, 64, 48), seed=3))
    out = tmp_path / "out"
    res = _run([*INFER, src, "--out", out, "--model", tiny_export, *FAST], preexec=_file_size_limit(20_000))
    _one_error_line(res, "file too large", code=1)
    assert not (out / "big_t2.nii.gz").exists() and not (out / "big_t2.json").exists()
    _no_partials(out)
    # in a batch: the case fails, the report (small) is written and names the reason
    res = _run([*INFER, "--batch", tmp_path, "--out", out, "--model", tiny_export, *FAST],
               preexec=_file_size_limit(20_000))
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    report = json.loads((out / "aldm_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["failed"]
    assert "file too large" in report["cases"][0]["reason"]
    assert not (out / "big_t2.nii.gz").exists()
    _no_partials(out)


# ------------------------------------------------------------------------------ batch archives

def _nifti_bytes(tmp_path: Path, seed: int) -> bytes:
    p = write_nifti(tmp_path / f"tmp{seed}.nii.gz", synthetic_volume(seed=seed))
    b = p.read_bytes()
    p.unlink()
    return b


def _tar_add(t: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    t.addfile(info, io.BytesIO(data) if data else None)


def _archive_kinds(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """kind -> (archive, bad member id, what its report reason says). Each archive also holds a
    good member `ok/a.nii.gz`."""
    good = _nifti_bytes(tmp_path, 1)
    kinds = {}

    def tar(kind, member, reason, **fields):
        path = tmp_path / f"{kind}.tar.gz"
        with tarfile.open(path, "w:gz") as t:
            _tar_add(t, "ok/a.nii.gz", good)
            _tar_add(t, member, good if not fields else b"", **fields)
        kinds[kind] = (path, member, reason)

    tar("tar_symlink", "ok/link.nii.gz", "link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    tar("tar_hardlink", "ok/hard.nii.gz", "link", type=tarfile.LNKTYPE, linkname="ok/a.nii.gz")
    tar("tar_device", "ok/dev.nii.gz", "not a regular file", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
    tar("tar_dotdot", "../../escape.nii.gz", "escapes the output folder")
    tar("tar_absolute", "/abs/b.nii.gz", "absolute path")

    def zf(kind, member, reason, write):
        path = tmp_path / f"{kind}.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("ok/a.nii.gz", good)
            write(z, member)
        kinds[kind] = (path, member, reason)

    zf("zip_dotdot", "../up.nii.gz", "escapes the output folder", lambda z, m: z.writestr(m, good))
    zf("zip_absolute", "/abs/c.nii.gz", "absolute path", lambda z, m: z.writestr(m, good))
    zf("zip_bomb", "ok/bomb.nii.gz", "compression ratio",
       lambda z, m: z.writestr(m, b"\0" * (20 << 20), compress_type=zipfile.ZIP_BZIP2))
    # an encrypted member, made with the zip tool (zipfile cannot encrypt)
    enc = tmp_path / "zip_encrypted.zip"
    work = tmp_path / "enc"
    (work / "ok").mkdir(parents=True)
    (work / "ok" / "a.nii.gz").write_bytes(good)
    (work / "ok" / "secret.nii.gz").write_bytes(good)
    subprocess.run(["zip", "-q", str(enc), "ok/a.nii.gz"], cwd=work, check=True)
    subprocess.run(["zip", "-q", "-P", "pw", str(enc), "ok/secret.nii.gz"], cwd=work, check=True)
    kinds["zip_encrypted"] = (enc, "ok/secret.nii.gz", "encrypted")
    return kinds


@pytest.mark.skipif(shutil.which("zip") is None, reason="the zip tool makes the encrypted member")
def test_archive_corpus_refuses_each_bad_member_and_converts_the_good_one(tiny_export, tmp_path):
    kinds = _archive_kinds(tmp_path)
    assert len(kinds) == 9
    for kind, (archive, member, reason) in kinds.items():
        out = tmp_path / f"out_{kind}"
        res = _run([*INFER, "--batch", archive, "--out", out, "--model", tiny_export, *FAST])
        assert res.returncode == 3 and "Traceback" not in res.stderr, (kind, res.stderr)
        cases = {c["id"]: c for c in json.loads((out / "aldm_report.json").read_text())["cases"]}
        assert cases["ok/a.nii.gz"]["status"] == "done", (kind, cases)
        assert cases[member]["status"] == "failed" and reason in cases[member]["reason"], (kind, cases[member])
        assert f"failed: {member}" in res.stderr
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
        assert written == ["ok/a_t2.nii.gz"], (kind, written)
        assert not (tmp_path / "escape_t2.nii.gz").exists() and not (tmp_path / "up_t2.nii.gz").exists()
        _no_partials(out)


@pytest.mark.parametrize("name,content,expect", [
    ("garbage.zip", b"PK not really a zip", "unreadable archive"),
    ("garbage.tar.gz", b"\x1f\x8b but not gzip", "unreadable archive"),
])
def test_unreadable_archive_is_one_line(tiny_export, tmp_path, name, content, expect):
    (tmp_path / name).write_bytes(content)
    res = _run([*INFER, "--batch", tmp_path / name, "--out", tmp_path / "o", "--model", tiny_export, *FAST])
    _one_error_line(res, expect, code=1)


def test_member_over_the_size_cap(tiny_export, tmp_path):
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as t:
        _tar_add(t, "a.nii", b"\0" * (3 << 20))
        _tar_add(t, "b.nii.gz", _nifti_bytes(tmp_path, 2))
    out = tmp_path / "out"
    res = _run([*INFER, "--batch", archive, "--out", out, "--model", tiny_export, *FAST, "--max-member-mb", "1"])
    assert res.returncode == 3, res.stderr
    cases = {c["id"]: c for c in json.loads((out / "aldm_report.json").read_text())["cases"]}
    assert "larger than the cap" in cases["a.nii"]["reason"] and cases["b.nii.gz"]["status"] == "done"


def test_total_extraction_cap(tmp_path):
    from aldm.batch import ArchiveLimits, ArchiveReader
    from aldm.errors import InputError

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(f"m{i}.nii", os.urandom(4000))
    reader = ArchiveReader(archive, ArchiveLimits(total_bytes=10_000))
    reader.copy("m0.nii", io.BytesIO())
    reader.copy("m1.nii", io.BytesIO())
    with pytest.raises(InputError, match="extracted 10,000 bytes, its cap"):
        reader.copy("m2.nii", io.BytesIO())
    reader.close()


def test_max_voxels_option(tiny_export, good, tmp_path):
    res = _run([*INFER, good / "good0.nii.gz", "--out", tmp_path, "--model", tiny_export, *FAST,
                "--max-voxels", "1000"])
    _one_error_line(res, "over the limit of 1,000 (raise it with --max-voxels)", code=1)
    res = _run([*INFER, good / "good0.nii.gz", "--out", tmp_path, "--model", tiny_export, *FAST,
                "--max-voxels", str(40 * 36 * 20)])
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------ the whole corpus in one batch

def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_batch_over_good_and_bad_files(tiny_export, corpus, good, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(corpus, mixed)
    for p in good.iterdir():
        shutil.copy(p, mixed / p.name)
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert _run([*INFER, "--batch", good, "--out", clean, "--model", tiny_export, *FAST]).returncode == 0
    res = _run([*INFER, "--batch", mixed, "--out", out, "--model", tiny_export, *FAST], timeout=600)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    cases = {c["id"]: c for c in json.loads((out / "aldm_report.json").read_text())["cases"]}
    nifti_bad = {k: v for k, v in BAD_FILES.items()}
    for kind, (fname, _, expect) in nifti_bad.items():
        assert cases[fname]["status"] == "failed" and expect.lower() in cases[fname]["reason"].lower(), (kind, cases[fname])
    for p in good.iterdir():
        stem = p.name[: -len(".nii.gz")]
        assert cases[p.name]["status"] == "done"
        assert _sha(out / f"{stem}_t2.nii.gz") == _sha(clean / f"{stem}_t2.nii.gz")
    assert len(cases) == len(BAD_FILES) + 2
    _no_partials(out)


# ------------------------------------------------------------------------------ models and checkpoints

def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _dotdot(m):
    name = m["components"]["unet"]["file"]
    m["components"]["unet"]["file"] = "../" + name
    m["files"]["../" + name] = m["files"].pop(name)


def _tamper(model: Path) -> None:
    p = model / json.loads((model / "manifest.json").read_text())["components"]["decoder"]["file"]
    b = bytearray(p.read_bytes())
    b[-100] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("kind,prepare,expect", [
    ("manifest_dotdot", lambda m: edit_manifest(m, _dotdot), ".."),
    ("tampered_graph", lambda m: _tamper(m), "sha256 does not match"),
    ("no_manifest", lambda m: (m / "manifest.json").unlink(), "not an aldm model folder"),
    ("manifest_not_json", lambda m: (m / "manifest.json").write_text("{not json"), "unreadable manifest"),
    ("manifest_other_format", lambda m: edit_manifest(m, lambda d: d.update(format_version=999)), "format version"),
])
def test_bad_model_folder(tiny_export, good, tmp_path, kind, prepare, expect):
    model = _copy_model(tiny_export, tmp_path / "model")
    prepare(model)
    res = _run([*INFER, good / "good0.nii.gz", "--out", tmp_path / "o", "--model", model, *FAST])
    _one_error_line(res, expect)
    res = _run([*ALDM, "check", model, "--precisions", "fp32"])
    _one_error_line(res, expect)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def _torchscript(path: Path) -> Path:
    """A scripted module whose __setstate__ prints: torch.load would run it (via torch.jit.load)."""
    import torch

    class Loud(torch.nn.Module):
        def forward(self, x):
            return x

        @torch.jit.export
        def __getstate__(self):
            return (self.training,)

        @torch.jit.export
        def __setstate__(self, state: tuple[bool]):
            print("ALDM-SETSTATE-RAN")
            self.training = state[0]

    torch.jit.save(torch.jit.script(Loud()), str(path))
    return path


def _builtins_bomb(path: Path) -> Path:
    """A torch-style zip whose pickle calls builtins.bytes(300_000_000) (protocol 4, STACK_GLOBAL)."""
    import pickle

    class Bomb:
        def __reduce__(self):
            return (bytes, (300_000_000,))

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": Bomb()}, protocol=4))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    return path


@pytest.mark.parametrize("kind,make,expect", [
    ("torchscript_checkpoint", _torchscript, "TorchScript"),
    ("builtins_bomb_checkpoint", _builtins_bomb, "builtins"),
    ("not_a_checkpoint", lambda p: (p.write_bytes(b"hello"), p)[1], "not a"),
    ("missing_checkpoint", lambda p: p, "not found"),
])
def test_bad_checkpoint_for_export(tmp_path, kind, make, expect):
    pytest.importorskip("torch", reason="aldm export needs the export extra")
    ckpt = make(tmp_path / "last.ckpt")
    out = tmp_path / "model"
    res = _run([*ALDM, "export", "--ldm", ckpt, "--out", out])
    _one_error_line(res, expect)
    assert "ALDM-SETSTATE-RAN" not in res.stdout + res.stderr
    assert not out.exists() or not list(out.iterdir())
    _no_partials(tmp_path)


@pytest.mark.parametrize("kind,args,expect", [
    ("eval_missing_prediction", ["{tmp}/nope.nii.gz", "{tmp}/ref.nii.gz"], "nope.nii.gz"),
    ("eval_bad_reference", ["{tmp}/good.nii.gz", "{tmp}/text.nii.gz"], "text.nii.gz"),
    ("check_not_a_model", ["{tmp}"], "not an aldm model folder"),
])
def test_eval_and_check_bad_paths(tmp_path, kind, args, expect):
    write_nifti(tmp_path / "good.nii.gz", synthetic_volume())
    (tmp_path / "text.nii.gz").write_text("not a volume")
    cmd = ["check", *args] if kind.startswith("check") else ["eval", *args]
    res = _run([*ALDM, *[a.format(tmp=tmp_path) for a in cmd]])
    _one_error_line(res, expect)
