"""Scale-out on an existing engine: `--ray [ADDRESS]` spreads cases over a Ray cluster, one model
per worker (an actor), a GPU per worker when the cluster has them. Files are read by path (a
shared filesystem is assumed); archive members travel as bytes. Needs `pip install 'aldm[ray]'`.

A worker that dies (killed, out of memory) fails only the case it held: Ray restarts the actor
(up to MAX_RESTARTS times) and retries that case once on it; if it dies again the case is failed
and the batch goes on. The first Ctrl-C (the `stop` event) submits
nothing more, lets the cases in flight finish and records the rest as interrupted."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from aldm.batch import (WAIT_S, ArchiveLimits, ArchiveReader, Case, Record, _redone, from_payload,
                        output_dir, payload)
from aldm.errors import describe, require

MAX_RESTARTS = 3  # per actor, then its cases go to the others


class _Worker:
    """One model per worker process."""

    def __init__(self, model_dir: str, options: dict, backend: str, threads: int | None):
        from aldm.translator import Options, Translator
        from aldm.runtime.pipeline import Pipeline

        opts = Options(**(options | {"targets": tuple(options["targets"]),
                                     "out_dir": None}))
        self.translator = Translator(Pipeline.load(model_dir, backend=backend, threads=threads), opts)

    def run(self, d: dict, out: str) -> dict:
        import time

        case = from_payload(d)
        t = self.translator
        try:
            paths = t.output_paths(Path(case.name), output_dir(Path(out), case))
            why = ""
            if not t.options.overwrite:
                complete, why = t.completeness(paths)
                if complete:
                    return asdict(Record(case.id, "skipped", why, [str(p) for p in paths.values()]))
            next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                local = case.path
                if local is None:
                    local = Path(tmp) / ("member.nii.gz" if case.name.endswith(".gz") else "member.nii")
                    local.write_bytes(d["data"])
                vol, prep = t.load(local)
            read_s = time.perf_counter() - t0
            seed = t.seed_for(case.id)
            t1 = time.perf_counter()
            tr = t.compute(prep, seed)
            compute_s = time.perf_counter() - t1
            res = t.write(vol, prep, tr, paths, seed, {"read": read_s, "compute": compute_s})
            return asdict(Record(case.id, "done", _redone(why), [str(p) for p in res.outputs.values()], seed,
                                 read_s, compute_s, res.timings["write"]))
        except Exception as exc:  # one case's failure, whatever its type
            return asdict(Record(case.id, "failed", describe(exc)))


def run_ray(model_dir: Path, options: dict, source: Path, cases: list[Case], out: Path, *,
            address: str = "local", workers: int | None = None, backend: str = "auto",
            threads: int | None = 1, on_event: Callable[[str, Case, Record | None], None] = lambda *a: None,
            stop=None, limits: ArchiveLimits = ArchiveLimits()) -> list[Record]:
    import threading

    ray = require("ray", "ray")
    stop = stop or threading.Event()

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = workers or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS,
                       max_task_retries=1)(_Worker)
    actors = [actor.remote(str(model_dir), options, backend, threads) for _ in range(n)]
    records: dict[str, Record] = {}

    def record(case: Case, rec: Record) -> None:
        records[case.id] = rec
        on_event("case", case, rec)

    for c in cases:
        if c.refused:
            record(c, Record(c.id, "failed", f"refused: {c.refused}"))
    todo = iter([c for c in cases if not c.refused])
    archive = ArchiveReader(source, limits)
    in_flight: dict = {}

    def submit(worker) -> None:  # one case per idle worker: archive bytes never pile up in memory
        while not stop.is_set() and (case := next(todo, None)) is not None:
            try:
                d = payload(case, archive)
            except Exception as exc:
                record(case, Record(case.id, "failed", describe(exc)))
                continue
            in_flight[worker.run.remote(d, str(out))] = (worker, case)
            return

    try:
        for w in actors:
            submit(w)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            if not ready:
                continue
            worker, case = in_flight.pop(ready[0])
            try:
                record(case, Record(**ray.get(ready[0])))
            except Exception as exc:  # the worker died (RayActorError, WorkerCrashedError...)
                record(case, Record(case.id, "failed", f"worker died: {describe(exc)}"))
            submit(worker)
    except KeyboardInterrupt:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
    finally:
        archive.close()
    for c in cases:
        if c.id not in records:
            record(c, Record(c.id, "interrupted", "stopped before computing"))
    return [records[c.id] for c in cases if c.id in records]
