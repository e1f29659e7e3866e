"""One pass over a folder or archive: every DICOM file's header (never its pixels), grouped into
series by SeriesInstanceUID and series into studies by StudyInstanceUID.

A file is DICOM when it carries the Part-10 preamble ("DICM" at byte 128). Objects without
pixels (structured reports, presentation states, DICOMDIR) are kept aside as non-image objects;
files with the preamble whose header cannot be parsed are kept as broken, so the series beside
them can say why they may be incomplete. Archive members are read within the batch's caps.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from aldm.dicom import pydicom
from aldm.errors import AldmError, InputError, one_line
from aldm.nifti import is_nifti

PREAMBLE = 132  # 128 bytes of preamble, then b"DICM"
HEADER_KEYS = ("SeriesDescription", "ProtocolName", "SeriesNumber", "Modality", "ImageType",
               "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "RepetitionTime", "EchoTime",
               "InversionTime", "ContrastBolusAgent", "Rows", "Columns", "NumberOfFrames")


@dataclass
class Series:
    uid: str
    study_uid: str
    files: list[str] = field(default_factory=list)  # local paths or archive member names, input order
    info: dict = field(default_factory=dict)  # HEADER_KEYS of its first file, as plain JSON values

    @property
    def description(self) -> str:
        return str(self.info.get("SeriesDescription") or "")

    def label(self) -> str:
        """How a series is named in messages: number, description, slice count."""
        n = self.info.get("SeriesNumber")
        return f"#{n if n is not None else '?'} '{self.description or '(no description)'}' ({len(self.files)} files)"

    def name(self) -> str:
        """Output file stem: the sanitised SeriesDescription, else the series UID."""
        s = re.sub(r"[^A-Za-z0-9_-]+", "_", self.description).strip("_-")[:64]
        return s or "series_" + self.uid.replace(".", "_")


@dataclass
class Study:
    uid: str
    series: list[Series] = field(default_factory=list)  # image series
    nonimage: list[str] = field(default_factory=list)  # DICOM objects without pixels


@dataclass
class Index:
    studies: list[Study] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)  # (file, why): preamble, bad header

    def __bool__(self) -> bool:
        return bool(self.studies or self.broken)

    def broken_beside(self, series: Series) -> list[tuple[str, str]]:
        """Broken files in a folder that holds files of `series` (its slices, perhaps)."""
        dirs = {str(PurePosixPath(f).parent) for f in series.files}
        return [(f, why) for f, why in self.broken if str(PurePosixPath(f).parent) in dirs]


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= PREAMBLE and head[128:132] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_dicom_bytes(f.read(PREAMBLE))
    except OSError:
        return False


def _plain(value):
    """A header value as JSON-safe data (multi-values as lists, numbers as floats)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        return float(value) if not isinstance(value, int) else int(value)
    return str(value)


def read_header(name: str, fileobj) -> tuple[str, str, str, dict] | str:
    """(study uid, series uid, kind, info) of one DICOM object, or why it is unreadable."""
    try:
        ds = pydicom().dcmread(fileobj, stop_before_pixels=True)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        info = {k: _plain(ds.get(k)) for k in HEADER_KEYS}
    except AttributeError as exc:
        return f"not usable: {one_line(exc)}"
    except Exception as exc:  # pydicom raises many kinds on truncated or malformed headers
        return f"unreadable DICOM header ({type(exc).__name__}: {one_line(exc)})"
    kind = "image" if info.get("Rows") and info.get("Columns") else "nonimage"
    return study, series, kind, info


def build(entries: Iterator[tuple[str, object]]) -> Index:
    """The index of (name, file object or path) DICOM entries."""
    studies: dict[str, Study] = {}
    series: dict[str, Series] = {}
    index = Index()
    for name, obj in entries:
        got = read_header(name, obj)
        if isinstance(got, str):
            index.broken.append((name, got))
            continue
        study_uid, series_uid, kind, info = got
        study = studies.setdefault(study_uid, Study(study_uid))
        if kind == "nonimage":
            study.nonimage.append(name)
            continue
        s = series.get(series_uid)
        if s is None:
            s = series[series_uid] = Series(series_uid, study_uid, info=info)
            study.series.append(s)
        s.files.append(name)
    index.studies = list(studies.values())
    return index


def index_folder(root: Path, *, max_bytes: int = 4 << 30) -> Index:
    """Every DICOM file under `root` (recursive; files in place, never copied)."""
    def entries():
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not is_nifti(p))
        for p in files:
            if p.is_symlink() and root.resolve() not in p.resolve().parents:
                continue  # a link out of the input folder is never followed
            if is_dicom_file(p) and p.stat().st_size <= max_bytes:
                yield str(p), str(p)
    return build(entries())


def index_archive(archive: Path, limits) -> Index:
    """Every DICOM member of a zip or tar, read once, in archive order, within `limits`."""
    from aldm.batch import _bomb, _unsafe

    def zip_entries():
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.is_dir() or _unsafe(info.filename) or info.flag_bits & 0x1:
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000 or _bomb(info, limits):
                    continue
                with z.open(info) as f:
                    head = f.read(PREAMBLE)
                    if is_dicom_bytes(head):
                        yield info.filename, io.BytesIO(head + f.read(limits.member_bytes))

    def tar_entries():
        with tarfile.open(archive, "r|*") as t:
            for m in t:
                if not m.isfile() or _unsafe(m.name) or m.size > limits.member_bytes:
                    continue
                f = t.extractfile(m)
                head = f.read(PREAMBLE)
                if is_dicom_bytes(head):
                    yield m.name, io.BytesIO(head + f.read())

    try:
        return build(zip_entries() if archive.name.lower().endswith(".zip") else tar_entries())
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise AldmError(f"{archive}: unreadable archive ({type(exc).__name__}: {one_line(exc)})") from None


def index_input(source: Path, limits=None) -> Index:
    """The DICOM index of a folder, a single DICOM file, or a .zip/.tar(.gz) archive."""
    from aldm.batch import ARCHIVES, ArchiveLimits

    if source.is_file() and source.name.lower().endswith(ARCHIVES):
        return index_archive(source, limits or ArchiveLimits())
    if source.is_dir() or (source.is_file() and is_dicom_file(source)):
        return index_folder(source)
    raise InputError(f"{source}: not a DICOM folder, file or archive")


def looks_dicom(source: Path) -> bool:
    """Whether a single-source argument is meant as DICOM: a folder, a DICOM file, an archive."""
    from aldm.batch import ARCHIVES

    return source.is_dir() or source.name.lower().endswith(ARCHIVES + (".dcm",)) or (
        source.is_file() and is_dicom_file(source))
