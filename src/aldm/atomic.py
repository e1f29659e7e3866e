"""One way to write a file: a temporary name in the same folder, fsync, rename.

Every file aldm writes (outputs, sidecars, reports, manifests, engines, caches, previews) goes
through `atomic_path`, so a final name never holds a partial file: a crash leaves at most a
`.<name>.partial-*` file, removed on failure and by `clean_partials` on the next run. A full
disk (ENOSPC) or a file-size limit (EFBIG) is an AldmError naming the file, with nothing left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from aldm.errors import AldmError

PARTIAL_GLOB = ".*.partial-*"
_COMPOUND = (".nii.gz", ".tar.gz")


def _split(name: str) -> tuple[str, str]:
    for ext in _COMPOUND:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    base, ext = os.path.splitext(name)
    return base, ext


def partial_name(path: Path) -> Path:
    """The temporary sibling of `path`; keeps the extension (nibabel picks the format by it)."""
    base, ext = _split(path.name)
    return path.with_name(f".{base}.partial-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_error(path: Path, exc: OSError) -> AldmError:
    """A one-line AldmError for a failed write (disk full, size limit, permissions...)."""
    why = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (size limit)",
           errno.EDQUOT: "disk quota exceeded"}.get(exc.errno or -1, exc.strerror or str(exc))
    return AldmError(f"cannot write {path}: {why}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path` (fsync, rename), on any
    failure it is removed. OSErrors become a one-line AldmError."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (each file fsynced, then one
    rename), on any failure it is removed: a folder of outputs (a DICOM series) is whole or absent."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            if not overwrite:
                raise AldmError(f"{path} exists; pass --overwrite to replace it")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def clean_partials(folder: str | Path) -> int:
    """Remove temporary files a killed run left under `folder` (never a final name)."""
    folder, n = Path(folder), 0
    if folder.is_dir():
        for p in sorted(folder.rglob(PARTIAL_GLOB)):
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                n += 1
            elif p.is_dir() and not p.is_symlink():  # an unfinished atomic_dir
                import shutil

                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n
