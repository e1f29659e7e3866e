"""The model, its worker and its metrics: what `aldm serve` keeps warm between requests."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from aldm.errors import UsageError
from aldm.runtime.sampler import progress_only
from aldm.serve.jobs import Cancelled, Job, JobStore, reason

log = logging.getLogger("aldm.serve")

MODALITIES = ("t1", "t1ce", "t2", "flair")
STAGES = ("load_preprocess", "encode", "spade", "sample", "decode", "write", "total")


@dataclasses.dataclass(frozen=True)
class Settings:
    model: Path | None = None  # None: the bundled model
    backend: str = "auto"
    threads: int | None = None
    results: Path = Path("aldm-results")
    max_queue: int = 16
    max_upload_mb: int = 512
    results_ttl_s: float = 86400.0
    max_results_gb: float = 20.0
    min_free_mb: int = 1024  # /readyz fails below this much free space on the results disk
    token: str | None = None
    max_voxels: int | None = None  # None: aldm-infer's default


def parse_options(raw: dict[str, Any], modalities=MODALITIES) -> dict[str, Any]:
    """Request fields -> aldm-infer options (JSON types), or a UsageError naming the field."""
    known = {"targets", "source_modality", "steps", "eta", "strength", "seed", "intensity", "naming",
             "skull_check", "name", "case_id"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(known))}")

    def conv(key, kind, label):
        v = raw.get(key)
        if v is None or v == "":
            return None
        try:
            return kind(v)
        except (TypeError, ValueError):
            raise UsageError(f"{key} must be {label}, not {str(v)[:40]!r}") from None

    src = str(raw.get("source_modality") or "t1").lower()
    targets = [t.strip().lower() for t in str(raw.get("targets") or "").split(",") if t.strip()]
    skull = str(raw.get("skull_check", "true")).lower()
    if skull not in ("true", "false", "1", "0", "yes", "no"):
        raise UsageError(f"skull_check must be true or false, not {skull[:20]!r}")
    opts = {
        "targets": targets or [m for m in modalities if m != src],
        "source_modality": src,
        "steps": conv("steps", int, "an integer"),
        "eta": conv("eta", float, "a number"),
        "strength": conv("strength", float, "a number"),
        "seed": conv("seed", int, "an integer"),
        "intensity": str(raw.get("intensity") or "unit"),
        "naming": str(raw.get("naming") or "stem"),
        "skull_check": skull in ("true", "1", "yes"),
    }
    case_id = raw.get("case_id")
    if case_id is not None:  # keys the seed only; never part of a path
        case_id = str(case_id)
        if not case_id or len(case_id) > 500 or not case_id.isprintable():
            raise UsageError("case_id must be 1-500 printable characters")
        opts["case_id"] = case_id
    for k in ("eta", "strength"):
        if opts[k] is not None and not math.isfinite(opts[k]):
            raise UsageError(f"{k} must be a finite number")
    return opts


class Metrics:
    """Prometheus metrics on a registry of their own (nothing global)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("aldm_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.queue_depth = Gauge("aldm_queue_depth", "Jobs waiting for the worker", registry=r)
        self.jobs = Gauge("aldm_jobs", "Jobs in the results folder by state", ["state"], registry=r)
        self.finished = Counter("aldm_jobs_finished", "Jobs finished by this process, by final state",
                                ["state"], registry=r)
        buckets = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, math.inf)
        self.stage = Histogram("aldm_stage_seconds", "Time per pipeline stage of finished jobs", ["stage"],
                               buckets=buckets, registry=r)
        self.wait = Histogram("aldm_queue_wait_seconds", "Time jobs spent queued", buckets=buckets, registry=r)
        self.info = Gauge("aldm_model_info", "The served model (value 1)",
                          ["model_sha256", "backend", "version"], registry=r)
        self.ready = Gauge("aldm_ready", "1 when the model is loaded and warm", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """Loads and warms the model (in the background: /healthz answers meanwhile), owns the job
    store and the one worker thread that runs jobs on the pipeline."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.store = JobStore(settings.results, max_queue=settings.max_queue, ttl_s=settings.results_ttl_s,
                              max_bytes=int(settings.max_results_gb * (1 << 30)))
        self.store.on_finish = self._finished
        self.pipeline = None
        self.model_sha256 = None
        self.load_error: str | None = None
        self.warm = threading.Event()
        self.stop = threading.Event()  # the worker takes no new job
        self.draining = False  # SIGTERM: new jobs get 503
        self.durations: list[float] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------ life cycle
    def start(self) -> dict[str, int]:
        recovered = self.store.recover()
        self.update_gauges()
        for target in (self._load_and_work, self._janitor):
            t = threading.Thread(target=target, name=f"aldm-{target.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        return recovered

    def drain(self) -> None:
        """Stop taking new jobs (503); the running one finishes; queued ones stay queued on disk."""
        self.draining = True
        self.stop.set()
        with self.store.lock:
            self.store.lock.notify_all()

    def running(self) -> bool:
        """A job is running (the store marks it under its lock as the worker takes it)."""
        with self.store.lock:
            return any(j.status == "running" for j in self.store.jobs.values())

    def _load_and_work(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
            self.load_error = reason(exc)
            log.error("model not loaded: %s", self.load_error)
            return
        self._work()

    def _load(self) -> None:
        from aldm.translator import default_model_dir
        from aldm.runtime.manifest import MANIFEST, sha256_file
        from aldm.runtime.pipeline import Pipeline
        from aldm.runtime.sampler import ddim_timesteps

        s = self.settings
        t0 = time.perf_counter()
        pipe = Pipeline.load(s.model or default_model_dir(), backend=s.backend, threads=s.threads)
        self.model_sha256 = sha256_file(pipe.model.file(MANIFEST))
        # warm every component once, on the model's own grid (and engines, where the backend has them)
        m = pipe.manifest
        x = np.full((1, 1, *m.preprocessing.crop_size), -1.0, np.float32)
        z = pipe.encode(x)
        classes = np.arange(len(m.modalities), dtype=np.int64)  # every class's MS-SPADE graph
        c = pipe.condition(np.repeat(z, len(classes), axis=0), classes)[1:2]
        t = np.array([int(ddim_timesteps(m.sampler.steps, m.schedule.timesteps)[-1])], np.int64)
        pipe.denoiser(c, np.array([1], np.int64))(c[:, : z.shape[1]], t)
        pipe.decode(c[:, z.shape[1]:])
        self.pipeline = pipe
        self.metrics.info.labels(self.model_sha256, pipe.backend, _version()).set(1)
        self.warm.set()
        self.metrics.ready.set(1)
        log.info("model %s on %s loaded and warm in %.1f s", pipe.model.path, pipe.backend,
                 time.perf_counter() - t0)

    def ready(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"model not loaded: {self.load_error}"
        if not self.warm.is_set():
            return False, "loading and warming the model"
        if self.draining:
            return False, "shutting down"
        root = self.store.root
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".aldm-ready-"):
                pass
        except OSError as exc:
            return False, f"results folder is not writable ({exc.strerror or exc})"
        free = shutil.disk_usage(root).free
        if free < self.settings.min_free_mb << 20:
            return False, f"results disk has {free >> 20} MiB free, under {self.settings.min_free_mb} MiB"
        return True, "ready"

    # ------------------------------------------------------------------------------ the worker
    def translator(self, options: dict[str, Any], out_dir: Path | None = None):
        """The aldm-infer Translator for these options (raises UsageError for bad ones)."""
        from aldm.translator import Options, Translator

        kw = {}
        if self.settings.max_voxels:
            kw["max_voxels"] = self.settings.max_voxels
        opts = Options(tuple(options["targets"]), out_dir, options["steps"], options["eta"], options["seed"],
                       options["source_modality"], options["naming"], options["intensity"],
                       strength=options["strength"], skull_check=options["skull_check"], **kw)
        return Translator(self.pipeline, opts)

    def _work(self) -> None:
        while True:
            job = self.store.next(self.stop)
            if job is None:
                return
            try:
                self._run(job)
            finally:
                self.update_gauges()

    def _run(self, job: Job) -> None:
        store = self.store
        src, out = store.input_path(job), store.out_dir(job)
        self.metrics.wait.observe(max(0.0, job.started - job.created))
        self.update_gauges()

        def on_stage(name: str) -> None:
            job.stage = name
            if job.cancel:
                raise Cancelled

        def on_step(i: int, n: int, t, x) -> None:
            job.step, job.steps = i + 1, n
            if job.cancel:
                raise Cancelled

        try:
            tr = self.translator(job.options, out)
            res = tr.run(src, callback=progress_only(on_step), on_stage=on_stage, case_id=job.options.get("case_id"))
        except Cancelled:
            shutil.rmtree(out, ignore_errors=True)
            store.finish(job, "cancelled", "cancelled by the client")
            return
        except BaseException as exc:  # noqa: BLE001 - every failure is the job's, never the worker's
            shutil.rmtree(out, ignore_errors=True)
            store.finish(job, "failed", reason(exc, (src, job.name), (src.parent, ".")))
            if not isinstance(exc, Exception):
                raise
            return
        job.timings = {k: round(v, 4) for k, v in res.timings.items()}
        job.warnings = list(res.warnings)
        job.outputs = {t: p.name for t, p in res.outputs.items()}
        job.stage = "write"
        store.finish(job, "done")

    def _finished(self, job: Job) -> None:
        self.metrics.finished.labels(job.status).inc()
        if job.status == "done":
            for k, v in job.timings.items():
                self.metrics.stage.labels(k).observe(v)
            self.durations = (self.durations + [job.timings.get("total", 0.0)])[-20:]
        self.update_gauges()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue times the recent mean job time."""
        mean = statistics.fmean(self.durations) if self.durations else 10.0
        return int(min(600, max(1, math.ceil(mean * max(1, len(self.store.queue)) / 2))))

    def update_gauges(self) -> None:
        for state, n in self.store.counts().items():
            self.metrics.jobs.labels(state).set(n)
        self.metrics.queue_depth.set(len(self.store.queue))

    def _janitor(self) -> None:
        while not self.stop.wait(30):
            try:
                if self.store.sweep():
                    self.update_gauges()
            except OSError as exc:  # a disk hiccup must not end the janitor
                log.warning("results sweep failed: %s", exc)


def _version() -> str:
    import aldm

    return aldm.__version__
