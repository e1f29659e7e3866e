"""Jobs of `aldm serve`: kept in the results folder (so they outlive the process), run one at a
time by the worker that owns the pipeline.

Layout of the results folder (nothing else in it is touched):

    <results>/<job id>/job.json     state, options, timings, reason (written atomically)
    <results>/<job id>/input/<name> the upload, under the file name the client gave (deleted
                                    when the job finishes)
    <results>/<job id>/out/         what `aldm-infer --out` would write: outputs and sidecars
    <results>/.incoming/            uploads being received (removed at start-up)

A job is queued -> running -> done | failed | cancelled. A server killed mid-job finds the job
"running" on disk when it starts again: it is reported failed ("server restarted") and its
partial outputs are removed; queued jobs (their uploads are complete) are queued again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from aldm.atomic import write_text
from aldm.errors import InputError, describe, one_line

log = logging.getLogger("aldm.serve")

ID_RE = re.compile(r"[A-Za-z0-9_-]{24}")
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
JOB_FILE = "job.json"
INCOMING = ".incoming"


def new_id() -> str:
    """144 random bits, URL-safe: unguessable, and never a path."""
    return secrets.token_urlsafe(18)


def valid_id(job_id: str) -> bool:
    return bool(ID_RE.fullmatch(job_id))


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,199}")


def check_name(name: str | None) -> str:
    """The upload's file name, used for output names, the NIfTI description and the seed: a plain
    .nii/.nii.gz file name (letters, digits, spaces, . _ + -), never a path."""
    if not name:
        raise InputError("the upload needs a file name: a multipart filename or a name field, "
                         "e.g. name=case01_t1.nii.gz")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InputError(f"file name {name[:80]!r} is not allowed: use letters, digits, spaces and . _ + - "
                         "(no folders), at most 200 characters")
    if not name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{name}: not a NIfTI file name (expected .nii or .nii.gz)")
    return name


class Cancelled(Exception):
    """Raised from the sampler's step callback when a running job is cancelled."""


@dataclasses.dataclass
class Job:
    id: str
    name: str
    options: dict[str, Any]  # the request's options, as given (JSON types)
    status: str = "queued"
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # target -> file name in out/
    # progress, in memory only
    stage: str | None = None
    step: int = 0
    steps: int = 0
    cancel: bool = dataclasses.field(default=False, repr=False)

    PERSISTED = ("id", "name", "options", "status", "created", "started", "finished", "error",
                 "warnings", "timings", "outputs")

    def to_disk(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PERSISTED}

    @classmethod
    def from_disk(cls, doc: dict[str, Any]) -> "Job":
        return cls(**{k: doc[k] for k in cls.PERSISTED if k in doc})


class JobStore:
    """Jobs in memory, mirrored in the results folder; one lock guards both."""

    def __init__(self, root: Path, *, max_queue: int, ttl_s: float, max_bytes: int):
        self.root = Path(root)
        self.max_queue, self.ttl_s, self.max_bytes = max_queue, ttl_s, max_bytes
        self.lock = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / INCOMING
        self.on_finish: Callable[[Job], None] | None = None

    # ------------------------------------------------------------------------------ folders
    def folder(self, job_id: str) -> Path:
        assert valid_id(job_id)
        return self.root / job_id

    def input_path(self, job: Job) -> Path:
        return self.folder(job.id) / "input" / job.name

    def out_dir(self, job: Job) -> Path:
        return self.folder(job.id) / "out"

    def save(self, job: Job) -> None:
        write_text(self.folder(job.id) / JOB_FILE, json.dumps(job.to_disk(), indent=1))

    # ------------------------------------------------------------------------------ start-up
    def recover(self) -> dict[str, int]:
        """Load the jobs a previous process left: finished ones are served again, running ones
        failed ("server restarted", outputs removed), queued ones queued again (oldest first)."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        counts = collections.Counter()
        found = []
        for d in self.root.iterdir():
            if not (d.is_dir() and valid_id(d.name) and (d / JOB_FILE).is_file()):
                continue
            try:
                job = Job.from_disk(json.loads((d / JOB_FILE).read_text()))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("%s: unreadable job record (%s); removed", d.name, one_line(exc))
                shutil.rmtree(d, ignore_errors=True)
                continue
            if job.id != d.name or job.status not in STATES:
                shutil.rmtree(d, ignore_errors=True)
                continue
            if job.status == "running":
                job.status, job.error, job.finished = "failed", "server restarted", time.time()
                shutil.rmtree(self.out_dir(job), ignore_errors=True)  # no partial output survives
                shutil.rmtree(d / "input", ignore_errors=True)
                self.save(job)
                counts["failed_on_restart"] += 1
            elif job.status == "queued" and not self.input_path(job).is_file():
                job.status, job.error, job.finished = "failed", "server restarted (upload missing)", time.time()
                self.save(job)
                counts["failed_on_restart"] += 1
            found.append(job)
        for job in sorted(found, key=lambda j: j.created):
            self.jobs[job.id] = job
            if job.status == "queued":
                self.queue.append(job.id)
                counts["requeued"] += 1
            else:
                counts[job.status] += 1
        return dict(counts)

    # ------------------------------------------------------------------------------ queue
    def queue_full(self) -> bool:
        with self.lock:
            return len(self.queue) >= self.max_queue

    def add(self, job: Job) -> int | None:
        """Queue a job whose upload is in place; its position, or None when the queue is full."""
        with self.lock:
            if len(self.queue) >= self.max_queue:
                return None
            self.jobs[job.id] = job
            self.save(job)
            self.queue.append(job.id)
            self.lock.notify_all()
            return len(self.queue)

    def position(self, job_id: str) -> int | None:
        with self.lock:
            try:
                return self.queue.index(job_id) + 1
            except ValueError:
                return None

    def next(self, stop: threading.Event, timeout: float = 0.5) -> Job | None:
        """The oldest queued job, marked running; None when `stop` is set."""
        with self.lock:
            while not stop.is_set():
                if self.queue:
                    job = self.jobs[self.queue.popleft()]
                    job.status, job.started, job.stage = "running", time.time(), "load"
                    self.save(job)
                    return job
                self.lock.wait(timeout)
        return None

    def finish(self, job: Job, status: str, error: str | None = None) -> None:
        """Record the final state; the upload is deleted (results are kept, the scan is not)."""
        with self.lock:  # the upload goes first: a client that sees the final status finds it gone
            shutil.rmtree(self.folder(job.id) / "input", ignore_errors=True)
            job.status, job.error, job.finished = status, error, time.time()
            job.stage = None
            self.save(job)
        if self.on_finish:
            self.on_finish(job)

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled now. Running: flagged, stops at its next sampling step. Finished:
        its files are deleted. None if unknown."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                self.queue.remove(job_id)
                shutil.rmtree(self.folder(job_id) / "input", ignore_errors=True)
                job.status, job.finished, job.error = "cancelled", time.time(), "cancelled by the client"
                self.save(job)
            elif job.status == "running":
                job.cancel = True
            else:
                del self.jobs[job_id]
                shutil.rmtree(self.folder(job_id), ignore_errors=True)
            return job

    def counts(self) -> dict[str, int]:
        with self.lock:
            c = collections.Counter(j.status for j in self.jobs.values())
        return {s: c.get(s, 0) for s in STATES}

    # ------------------------------------------------------------------------------ disk
    def sweep(self, now: float | None = None) -> list[str]:
        """Evict finished jobs past their TTL, then the oldest finished ones while the results
        use more than max_bytes. Queued and running jobs are never evicted."""
        now = time.time() if now is None else now
        evicted = []
        with self.lock:
            finished = sorted((j for j in self.jobs.values() if j.status in FINISHED),
                              key=lambda j: j.finished or j.created)
            for j in finished:
                if now - (j.finished or j.created) > self.ttl_s:
                    evicted.append(j.id)
            rest = [j for j in finished if j.id not in evicted]
            if rest and self.max_bytes > 0:
                used = self.used_bytes()
                for j in rest:
                    if used <= self.max_bytes:
                        break
                    used -= _tree_bytes(self.folder(j.id))
                    evicted.append(j.id)
            for job_id in evicted:
                del self.jobs[job_id]
                shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return evicted

    def used_bytes(self) -> int:
        return _tree_bytes(self.root)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def reason(exc: BaseException, *paths: tuple[Path, str]) -> str:
    """A one-line reason for the client, with the server's own paths replaced by what the client
    knows them as (the upload's file name)."""
    text = "out of memory" if isinstance(exc, MemoryError) else describe(exc)
    for path, shown in paths:
        text = text.replace(str(path), shown)
    return text
