"""Batch conversion of archives: many scans, no lost work, optionally over a Ray cluster.

Inputs: a folder (recursive *.nii / *.nii.gz), a .txt/.csv list, a BraTS-style layout (one
folder per subject; the source modality picks the file) or a .zip / .tar(.gz) archive, read one
member at a time. Every case is independent: a failure is recorded with its reason and the batch
goes on: any exception from one case, of any type, is that case's failure. Outputs are atomic;
a rerun skips a case only when its outputs match their sidecars' hashes and were made with the
same settings digest (see `Translator.completeness`), and redoes the rest, saying why. Reading the
next case and writing the previous one overlap the current computation (bounded queues whose waits
time out and honour the stop flag, so nothing can hang on a dead thread). SIGINT abandons the case
being computed, finishes the write in progress and stops; a second SIGINT aborts. The report is
rewritten (atomically) as each case finishes, so a `kill -9` leaves a report of everything done.
Archives are read within caps (member size, total extracted bytes, compression ratio); a .tar(.gz)
is streamed once, in order.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import queue
import signal
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from aldm import MODALITY_ALIASES
from aldm.atomic import atomic_path, clean_partials  # noqa: F401 - clean_partials: the batch's cleanup
from aldm.errors import AldmError, InputError, UsageError, describe, exit_now
from aldm.nifti import NIFTI_SUFFIXES, stem
from aldm.runtime.sampler import progress_only

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
WAIT_S = 0.2  # every queue wait times out this often to look at the stop flag and its peer thread


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may make aldm extract (zip bombs, lying headers)."""

    member_bytes: int = 4 << 30  # one member, uncompressed (a 1024^3 float32 volume is 4 GiB)
    total_bytes: int = 1 << 40  # all members extracted by one batch
    ratio: float = 1000.0  # uncompressed / compressed size of a zip member


@dataclass
class Case:
    id: str  # stable: the entry's path relative to the input
    rel_dir: str  # output subfolder, relative to --out
    name: str  # file name (outputs are named after it)
    path: Path | None = None  # a local file
    member: str | None = None  # an archive member
    refused: str | None = None  # why the entry is not processed at all
    dicom: object | None = None  # a DICOM study's chosen series (aldm.dicom.source.DicomSeries)


@dataclass
class Record:
    id: str
    status: str  # done | skipped | failed | interrupted
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    seed: int | None = None
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    source: str = ""  # where the case was read from (a file, or archive!/member)


# ------------------------------------------------------------------------------ discovery

def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _unsafe(rel: str) -> str | None:
    p = PurePosixPath(rel)
    if rel.startswith(("/", "\\")) or p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path"
    if ".." in p.parts:
        return "path escapes the output folder (..)"
    return None


def discover(source: Path, source_modality: str = "t1", *, source_series: str | None = None,
             limits: ArchiveLimits | None = None) -> list[Case]:
    """Every case of a batch input, refused entries included (with their reason). NIfTI files
    are cases; so is each DICOM study (its source series chosen here, from the headers alone)."""
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    name = source.name.lower()
    if source.is_file() and name.endswith(ARCHIVES):
        try:
            return _archive_cases(source, source_modality, source_series, limits or ArchiveLimits())
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, RuntimeError) as exc:
            raise AldmError(f"{source}: unreadable archive ({describe(exc)})") from None
    if source.is_file() and name.endswith((".txt", ".csv")):
        return _list_cases(source)
    if source.is_dir():
        brats = _brats_cases(source, source_modality)
        return brats if brats else _folder_cases(source) + _dicom_cases(source, source_modality, source_series)
    raise UsageError(f"{source}: expected a folder, a .txt/.csv list or a .zip/.tar(.gz) archive")


def _dicom_cases(source: Path, modality: str, pattern: str | None) -> list[Case]:
    """The DICOM studies of a folder, one case each; [] when it holds no DICOM (and pydicom, the
    extra `dicom`, is then not needed)."""
    from aldm.dicom.index import is_dicom_file

    if not any(is_dicom_file(p) for p in source.rglob("*") if p.is_file() and not _is_nifti(p.name)):
        return []
    from aldm.dicom.index import index_folder
    from aldm.dicom.source import study_cases

    return study_cases(index_folder(source), source, modality, pattern)


def _folder_cases(root: Path) -> list[Case]:
    cases = []
    for p in sorted(root.rglob("*")):
        if not _is_nifti(p.name) or p.is_dir():
            continue
        rel = p.relative_to(root).as_posix()
        parent = str(PurePosixPath(rel).parent)
        case = Case(rel, "" if parent == "." else parent, p.name, path=p)
        if p.is_symlink() and root.resolve() not in p.resolve().parents:
            case.refused = "link pointing outside the input folder"
        cases.append(case)
    return cases


def _brats_cases(root: Path, modality: str) -> list[Case]:
    """One subfolder per subject holding `<...>[_-]<modality>.nii(.gz)`; [] if the layout differs."""
    aliases = MODALITY_ALIASES.get(modality, (modality,))
    cases = []
    subjects = [d for d in sorted(root.iterdir()) if d.is_dir()]
    for d in subjects:
        hits = [f for f in sorted(d.iterdir()) if _is_nifti(f.name) and
                any(stem(f).lower().endswith(sep + a) for a in aliases for sep in "_-")]
        if hits:
            cases.append(Case(f"{d.name}/{hits[0].name}", d.name, hits[0].name, path=hits[0]))
    return cases if subjects and len(cases) == len(subjects) else []


def _list_cases(listing: Path) -> list[Case]:
    rows = []
    with open(listing, newline="") as f:
        if listing.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            col = next((c for c in (reader.fieldnames or []) if c.lower() in ("path", "source", "file")),
                       (reader.fieldnames or [None])[0])
            rows = [r[col].strip() for r in reader if r.get(col, "").strip()]
        else:
            rows = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    cases, seen = [], {}
    for entry in rows:
        p = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
        rel = stem(p)
        seen[rel] = seen.get(rel, 0) + 1
        rel_dir = rel if seen[rel] == 1 else f"{rel}__{seen[rel]}"  # one folder per entry: no clashes
        cases.append(Case(entry, rel_dir, p.name, path=p))
    return cases


def _archive_cases(archive: Path, modality: str = "t1", pattern: str | None = None,
                   limits: ArchiveLimits = ArchiveLimits()) -> list[Case]:
    """NIfTI members as cases, DICOM members' headers into one index whose studies are cases too:
    the archive is listed in a single pass (each DICOM member read once, within `limits`, and
    dropped once its header is indexed)."""
    from aldm.dicom.index import PREAMBLE, build, is_dicom_bytes

    cases: list[Case] = []

    def dicom(name: str, f, size: int):
        head = f.read(PREAMBLE)
        if is_dicom_bytes(head) and size <= limits.member_bytes:
            yield name, io.BytesIO(head + f.read())

    def zip_members(z: zipfile.ZipFile):
        for info in z.infolist():
            if info.is_dir():
                continue
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if not _is_nifti(info.filename):
                if not (is_link or info.flag_bits & 0x1 or _unsafe(info.filename) or _bomb(info, limits)):
                    with z.open(info) as f:
                        yield from dicom(info.filename, f, info.file_size)
                continue
            case = Case(info.filename, "", PurePosixPath(info.filename).name, member=info.filename)
            case.refused = ("link" if is_link else "encrypted member (password-protected zip)"
                            if info.flag_bits & 0x1 else _unsafe(info.filename))
            if not case.refused:
                case.rel_dir = _parent(info.filename)
            cases.append(case)

    def tar_members(t: tarfile.TarFile):
        for m in t:
            if m.isdir():
                continue
            if not _is_nifti(m.name):
                if m.isfile() and not _unsafe(m.name):
                    yield from dicom(m.name, t.extractfile(m), m.size)
                continue
            case = Case(m.name, "", PurePosixPath(m.name).name, member=m.name)
            case.refused = "link" if (m.issym() or m.islnk()) else (
                _unsafe(m.name) or (None if m.isfile() else "not a regular file"))
            if not case.refused:
                case.rel_dir = _parent(m.name)
            cases.append(case)

    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            index = _index_dicom(zip_members(z), build)
    else:
        with tarfile.open(archive) as t:
            index = _index_dicom(tar_members(t), build)
    if index:
        from aldm.dicom.source import study_cases

        cases += study_cases(index, None, modality, pattern)
    return cases


def _index_dicom(entries, build):
    """Index the DICOM entries; pydicom (extra `dicom`) is imported only if there is one."""
    first = next(entries, None)
    if first is None:
        from aldm.dicom.index import Index

        return Index()
    return build(itertools.chain([first], entries))


def _bomb(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    if info.file_size > limits.member_bytes:
        return f"member of {info.file_size:,} bytes, over the cap of {limits.member_bytes:,}"
    if info.file_size > (1 << 20) and info.file_size > limits.ratio * max(info.compress_size, 1):
        return (f"compression ratio {info.file_size / max(info.compress_size, 1):,.0f}:1 "
                f"over the cap of {limits.ratio:,.0f}:1 (zip bomb?)")
    return None


def _parent(rel: str) -> str:
    parent = str(PurePosixPath(rel).parent)
    return "" if parent == "." else parent


class ArchiveReader:
    """Extracts archive members within `limits`: a zip by name, a tar as one forward stream in
    archive order (cases are discovered in that order, so each member is read once; asking for an
    earlier member reopens the stream)."""

    def __init__(self, source: Path, limits: ArchiveLimits = ArchiveLimits()):
        self.source, self.limits, self.extracted = source, limits, 0
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: Iterator[tarfile.TarInfo] | None = None

    def copy(self, member: str, dst: io.BufferedIOBase) -> None:
        if self.source.name.lower().endswith(".zip"):
            self._zip = self._zip or zipfile.ZipFile(self.source)
            info = self._zip.getinfo(member)
            if why := _bomb(info, self.limits):
                raise InputError(f"{member}: {why}")
            with self._zip.open(info) as src:
                self._copy(member, src, dst)
        else:
            with self._tar_member(member) as src:
                self._copy(member, src, dst)

    @contextlib.contextmanager
    def _tar_member(self, member: str):
        for _ in range(2):
            if self._members is None:
                self._tar = tarfile.open(self.source, "r|*")
                self._members = iter(self._tar)
            for m in self._members:
                if m.name == member:
                    if not m.isfile():
                        raise InputError(f"{member}: not a regular file")
                    yield self._tar.extractfile(m)
                    return
            self.close()
        raise InputError(f"{member}: not found in {self.source}")

    def _copy(self, member: str, src, dst) -> None:
        n = 0
        while block := src.read(1 << 20):
            n += len(block)
            if n > self.limits.member_bytes:
                raise InputError(f"{member}: larger than the cap of {self.limits.member_bytes:,} bytes")
            if self.extracted + n > self.limits.total_bytes:
                raise InputError(f"{member}: the batch has extracted {self.limits.total_bytes:,} bytes, its cap")
            dst.write(block)
        self.extracted += n

    def close(self) -> None:
        for f in (self._zip, self._tar):
            if f is not None:
                f.close()
        self._zip = self._tar = self._members = None


@contextlib.contextmanager
def materialize(case: Case, archive: ArchiveReader) -> Iterator[Path]:
    """A local file for the case: the file itself, or one archive member copied to a temp file."""
    if case.path is not None:
        yield case.path
        return
    suffix = ".nii.gz" if case.name.lower().endswith(".gz") else ".nii"
    with tempfile.TemporaryDirectory(prefix="aldm-member-") as tmp:
        local = Path(tmp) / f"member{suffix}"
        with open(local, "wb") as dst:
            archive.copy(case.member, dst)
        yield local


# ------------------------------------------------------------------------------ local runner

class Stop(Exception):
    """Raised from the sampler callback after SIGINT: abandon the case being computed."""


def output_dir(out: Path, case: Case) -> Path:
    d = (out / case.rel_dir).resolve() if case.rel_dir else out.resolve()
    if d != out.resolve() and out.resolve() not in d.parents:
        raise AldmError(f"{case.id}: output would escape {out}")
    return d


def _put(q: queue.Queue, item, give_up: Callable[[], bool]) -> bool:
    """Put with bounded waits; False (item dropped) once `give_up()` says the consumer is gone."""
    while True:
        try:
            q.put(item, timeout=WAIT_S)
            return True
        except queue.Full:
            if give_up():
                return False


def _get(q: queue.Queue, producer: threading.Thread):
    """Get with bounded waits; None (end of queue) if the producer died without saying so."""
    while True:
        try:
            return q.get(timeout=WAIT_S)
        except queue.Empty:
            if not producer.is_alive():
                try:
                    return q.get_nowait()
                except queue.Empty:
                    return None


def run_local(translator, source: Path, cases: list[Case], out: Path, *, prefetch: int = 2,
              on_event: Callable[[str, Case, Record | None], None] = lambda *a: None,
              stop: threading.Event | None = None, limits: ArchiveLimits = ArchiveLimits()) -> list[Record]:
    """Reader thread -> compute (this thread) -> writer thread, with bounded queues."""
    stop = stop or threading.Event()
    closing = threading.Event()  # set when this thread leaves: the reader stops producing
    loaded: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    to_write: queue.Queue = queue.Queue(maxsize=1)
    records: dict[str, Record] = {}
    lock = threading.Lock()

    def record(rec: Record, case: Case) -> None:
        with lock:
            records[rec.id] = rec
        on_event("case", case, rec)

    def read(case: Case, archive: ArchiveReader):
        """The loaded case, or None when it was recorded (refused, skipped, failed)."""
        if case.refused:
            record(Record(case.id, "failed", f"refused: {case.refused}"), case)
            return None
        try:
            d = output_dir(out, case)
            paths = translator.output_paths(Path(case.name), d)
            why = ""  # with --overwrite: redone without a reason to give
            if not translator.options.overwrite:
                complete, why = translator.completeness(paths)
                if complete:
                    record(Record(case.id, "skipped", why, [str(p) for p in paths.values()]), case)
                    return None
            t0 = time.perf_counter()
            d.mkdir(parents=True, exist_ok=True)
            if case.dicom is not None:
                in_archive = source.is_file() and source.name.lower().endswith(ARCHIVES)
                vol, prep = translator.load_dicom(case.dicom, Path(f"{source}!" if in_archive else source) / case.rel_dir,
                                                  archive if in_archive else None)
            else:
                with materialize(case, archive) as local:
                    vol, prep = translator.load(local)
            if case.member is not None:
                vol.path = Path(f"{source}!/{case.member}")
            return case, paths, vol, prep, time.perf_counter() - t0, why
        except Exception as exc:  # one case's failure, whatever its type, never the batch's
            record(Record(case.id, "failed", describe(exc)), case)
            return None

    def reader() -> None:
        archive = ArchiveReader(source, limits)
        try:
            for case in cases:
                if stop.is_set() or closing.is_set():
                    break
                item = read(case, archive)
                if item is not None and not _put(loaded, item, closing.is_set):
                    break
        finally:
            archive.close()
            _put(loaded, None, closing.is_set)

    def writer() -> None:
        while (item := _get(to_write, main)) is not None:
            case, paths, vol, prep, tr, seed, read_s, compute_s, why = item
            try:
                res = translator.write(vol, prep, tr, paths, seed, {"read": read_s, "compute": compute_s})
                said = "; ".join(x for x in (_redone(why), vol.dicom.summary() if vol.dicom else "") if x)
                record(Record(case.id, "done", said, [str(p) for p in res.outputs.values()], seed,
                              read_s, compute_s, res.timings["write"]), case)
            except Exception as exc:
                record(Record(case.id, "failed", describe(exc), seed=seed), case)

    main = threading.current_thread()
    read_t = threading.Thread(target=reader, daemon=True, name="aldm-reader")
    write_t = threading.Thread(target=writer, daemon=True, name="aldm-writer")
    read_t.start()
    write_t.start()

    def check_stop(i, n, t, x):
        if stop.is_set():
            raise Stop

    try:
        while (item := _get(loaded, read_t)) is not None:
            case, paths, vol, prep, read_s, why = item
            if stop.is_set():
                record(Record(case.id, "interrupted", "stopped before computing"), case)
                continue
            on_event("start", case, None)
            seed = translator.seed_for(case.id)
            t0 = time.perf_counter()
            try:
                tr = translator.compute(prep, seed, callback=progress_only(check_stop))
            except Stop:
                record(Record(case.id, "interrupted", "stopped while computing", seed=seed), case)
                continue
            except Exception as exc:
                record(Record(case.id, "failed", describe(exc), seed=seed), case)
                continue
            _put(to_write, (case, paths, vol, prep, tr, seed, read_s, time.perf_counter() - t0, why),
                 lambda: not write_t.is_alive())
    finally:
        closing.set()
        _put(to_write, None, lambda: not write_t.is_alive())
        write_t.join()  # the write in progress finishes (a second Ctrl-C lands here too)
        read_t.join(timeout=5 * WAIT_S)
    return [records[c.id] for c in cases if c.id in records]


def _redone(why: str) -> str:
    return f"redone: {why}" if why else ""




@contextlib.contextmanager
def sigint_stops(stop: threading.Event, say: Callable[[str], None]):
    """First Ctrl-C: finish the write in progress, then stop. Second: abort at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say("interrupt: finishing the current write, then stopping (Ctrl-C again to abort)")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # After a first Ctrl-C the process is on its way out (report, summary, interpreter shutdown
        # joining threads); a second one then ends it at once, quietly, instead of surfacing as a
        # KeyboardInterrupt traceback from wherever shutdown happens to be. The report on disk is
        # always a complete one (atomic replace), so nothing is lost by not unwinding.
        signal.signal(signal.SIGINT, _exit_at_once if stop.is_set() else old)


def _exit_at_once(signum, frame):
    exit_now(130)


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C waits for the block (the report being written), then acts as it would have: an
    interrupt's exit never leaves a report file half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: came.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if came and callable(old):
        old(signal.SIGINT, came[0])


# ------------------------------------------------------------------------------ report

def summarise(records: list[Record], wall_s: float) -> dict:
    done = [r for r in records if r.status == "done"]
    n = len(done)
    per = lambda attr: sum(getattr(r, attr) for r in done) / n if n else 0.0  # noqa: E731
    return {
        "cases": len(records), "done": n,
        "skipped": sum(r.status == "skipped" for r in records),
        "failed": sum(r.status == "failed" for r in records),
        "interrupted": sum(r.status == "interrupted" for r in records),
        "wall_s": round(wall_s, 2),
        "cases_per_hour": round(3600 * n / wall_s, 1) if wall_s > 0 and n else 0.0,
        "wall_s_per_case": round(wall_s / n, 2) if n else None,
        "mean_s_per_case": {"read": round(per("read_s"), 2), "compute": round(per("compute_s"), 2),
                            "write": round(per("write_s"), 2)},
    }


def write_report(records: list[Record], summary: dict, out: Path, prefix: str = "aldm_report") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, c = out / f"{prefix}.json", out / f"{prefix}.csv"
    with atomic_path(j) as tmp:
        tmp.write_text(json.dumps({"summary": summary, "cases": [asdict(r) for r in records]}, indent=1))
    with atomic_path(c) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(Record("", ""))))
        w.writeheader()
        for r in records:
            w.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in asdict(r).items()})
    return j, c


class Journal:
    """The batch report, rewritten (temp file + rename) as each case finishes, so a `kill -9`
    leaves a report of every case done so far; `finish` adds the final summary. The HTML page is
    written before the JSON/CSV, so it lists every case they do; a finished case is listed at
    once and its row gets its thumbnail once that is made."""

    def __init__(self, out: Path, cases: list[Case], source: Path | None = None):
        self.out, self.order, self.t0 = out, [c.id for c in cases], time.perf_counter()
        self.sources = {c.id: str(c.path) if c.path is not None else f"{source}!/{c.member}" for c in cases}
        self.records: dict[str, Record] = {}
        self.views: dict = {}  # case id -> report_html.CaseView
        self.lock = threading.Lock()  # held while any report file (page, thumbnail, JSON, CSV) is written
        self.closed = False

    def add(self, rec: Record) -> None:
        from aldm.report_html import case_view

        rec.source = rec.source or self.sources.get(rec.id, "")
        with self.lock:  # listed at once (a kill or a second Ctrl-C may come while the thumbnail is made)
            self.records[rec.id] = rec
            if self.closed:
                return
            self._write(finished=False)
        if rec.status in ("done", "skipped"):  # then its thumbnail, outside the lock, and the page again
            view = case_view(self.out, rec, fresh=rec.status == "done", lock=self.lock, closed=lambda: self.closed)
            with self.lock:
                self.views[rec.id] = view
                if not self.closed:
                    self._write(finished=False, page_only=True)

    def ordered(self) -> list[Record]:
        return [self.records[i] for i in self.order if i in self.records]

    def _write(self, finished: bool, page_only: bool = False) -> tuple[dict, Path, Path]:
        from aldm.report_html import write_html

        records = self.ordered()
        summary = summarise(records, time.perf_counter() - self.t0) | {"finished": finished}
        page = write_html(self.out, records, self.views, summary)
        if page_only:
            return summary, page, page
        return (summary, *write_report(records, summary, self.out))

    def finish(self) -> tuple[dict, Path, Path]:
        """The final report; nothing is written after it (threads still running may be cut off by
        the process's exit, so none may be in the middle of a report file then)."""
        with sigint_deferred(), self.lock:
            self.closed = True
            return self._write(finished=True)


def exit_code(records: list[Record]) -> int:
    if any(r.status == "interrupted" for r in records):
        return 130
    return 3 if any(r.status == "failed" for r in records) else 0


def payload(case: Case, archive: ArchiveReader) -> dict:
    """A case as plain data for a remote worker (archive members travel as bytes)."""
    d = asdict(case)
    d["path"] = str(case.path) if case.path else None
    if case.member is not None and not case.refused:
        buf = io.BytesIO()
        archive.copy(case.member, buf)
        d["data"] = buf.getvalue()
    return d


def from_payload(d: dict) -> Case:
    d = {k: v for k, v in d.items() if k != "data"}
    d["path"] = Path(d["path"]) if d["path"] else None
    return Case(**d)


def os_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
