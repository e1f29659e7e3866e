"""A DICOM input as aldm's Volume: index it, choose the source series, read it, record why.

The Volume made from a series carries a NIfTI header on the series' own grid (sform and qform
scanner-based, code 1), so the NIfTI outputs overlay the series, and `dicom`, what `--dicom-out`
and the sidecar need: the series, why it was chosen, its sorted slice headers.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from aldm.dicom.index import Index, Series, index_input
from aldm.dicom.select import Choice, choose
from aldm.dicom.volume import Slice, read_series
from aldm.errors import InputError


@dataclass
class DicomSeries:
    series: Series
    reason: str  # why it was chosen
    candidates: list[str]
    slices: list[Slice] | None = None  # sorted along the normal, once read

    def record(self) -> dict:
        """What the sidecar says about the source series."""
        i = self.series.info
        return {"series_instance_uid": self.series.uid, "study_instance_uid": self.series.study_uid,
                "series_number": i.get("SeriesNumber"), "series_description": self.series.description,
                "files": len(self.series.files), "chosen_because": self.reason, "candidates": self.candidates}

    def summary(self) -> str:
        """One line for the batch report and the console."""
        return f"DICOM series {self.series.label()}: {self.reason}"


def choose_in(index: Index, where: str, modality: str, pattern: str | None) -> DicomSeries:
    """The source series of the one study an input holds."""
    if not index.studies:
        why = f"; {len(index.broken)} unreadable DICOM file(s), e.g. {Path(index.broken[0][0]).name}: " \
              f"{index.broken[0][1]}" if index.broken else ""
        what = "is a folder holding no DICOM image series" if Path(where).is_dir() else "holds no DICOM image series"
        raise InputError(f"{where}: {what} (and is not a NIfTI file){why}")
    if len(index.studies) > 1:
        raise InputError(f"{where}: holds {len(index.studies)} studies; convert them with --batch")
    c: Choice = choose(index.studies[0], modality, pattern)
    return DicomSeries(c.series, c.reason, c.candidates)


def open_input(source: Path, modality: str, pattern: str | None, limits=None) -> tuple[Index, DicomSeries]:
    """Index a folder, file or archive in one pass and choose its source series."""
    index = index_input(source, limits)
    return index, choose_in(index, str(source), modality, pattern)


@contextlib.contextmanager
def local_files(files: list[str], archive=None) -> Iterator[list[str]]:
    """The series' files on disk: in place, or archive members copied to a temporary folder
    (in archive order, so a tar is read forward once)."""
    if archive is None:
        yield files
        return
    with tempfile.TemporaryDirectory(prefix="aldm-dicom-") as tmp:
        local = []
        for i, member in enumerate(files):
            p = Path(tmp) / f"{i:06d}_{Path(member).name[-80:]}"
            with open(p, "wb") as dst:
                archive.copy(member, dst)
            local.append(str(p))
        yield local


def study_cases(index: Index, root: Path | None, modality: str, pattern: str | None) -> list:
    """One batch case per study of an index (a folder's, `root`; or an archive's, None): its
    chosen series, or the reason none can be chosen. Output folder: the series' folder in the
    input; output names: the series' sanitised description, else its UID."""
    from pathlib import PurePosixPath

    from aldm.batch import Case

    def rel(name: str) -> str:
        return Path(name).resolve().relative_to(root.resolve()).as_posix() if root else name

    cases, names = [], set()
    placed = set()  # folders whose broken files a case already names
    for study in index.studies:
        try:
            c = choose(study, modality, pattern)
        except InputError as exc:
            folder = _common([rel(f) for s in study.series for f in s.files] or [rel(f) for f in study.nonimage])
            cases.append(Case(f"{folder or '.'} (study {study.uid})", folder, "study", refused=str(exc)))
            continue
        chosen = DicomSeries(c.series, c.reason, c.candidates)
        folder = _common([rel(f) for f in c.series.files])
        name = c.series.name()
        if (folder, name) in names:  # two series named alike in one folder
            name = f"{name}_{c.series.uid.replace('.', '_')[-12:]}"
        names.add((folder, name))
        case = Case(f"{folder}/{name}" if folder else name, folder, name, dicom=chosen)
        broken = index.broken_beside(c.series)
        if broken:
            case.refused = f"{PurePosixPath(broken[0][0]).name} beside series {c.series.label()} is {broken[0][1]}"
        placed |= {str(PurePosixPath(f).parent) for f, _ in broken}
        cases.append(case)
    for f, why in index.broken:  # broken files beside no chosen series: a failed case each
        if str(PurePosixPath(f).parent) not in placed:
            r = rel(f)
            cases.append(Case(r, str(PurePosixPath(r).parent).strip("."), PurePosixPath(r).name,
                              refused=f"DICOM file {why}"))
    return cases


def _common(paths: list[str]) -> str:
    """The deepest folder holding every one of `paths` ("" at the top)."""
    parts = [Path(p).parent.parts for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return "/".join(out)


def load(chosen: DicomSeries, files: list[str], where: str, index: Index | None = None, *, max_voxels: int):
    """The chosen series as a Volume named `<where>/<series name>` (outputs are named after it)."""
    import nibabel as nib

    from aldm.nifti import Volume

    label = f"{where}: series {chosen.series.label()}"
    broken = index.broken_beside(chosen.series) if index is not None else []
    if broken:
        f, why = broken[0]
        raise InputError(f"{label}: {Path(f).name} beside its slices is {why}; the series may be incomplete")
    data, affine, slices = read_series(files, label, max_voxels=max_voxels)
    if not np.isfinite(data).all():
        raise InputError(f"{label}: contains NaN or Inf voxels")
    if not data.any():
        raise InputError(f"{label}: every voxel is 0")
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    for s in slices:  # keep headers only: the pixels live in `data`
        if "PixelData" in s.dataset:
            del s.dataset.PixelData
    chosen.slices = slices
    vol = Volume(Path(where) / chosen.series.name(), data, affine, img.header, data.shape)
    vol.dicom = chosen
    return vol
