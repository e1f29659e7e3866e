"""Scale-out on an existing engine: `--ray [ADDRESS]` spreads cases over a Ray cluster, one model
per worker (an actor), a GPU per worker when the cluster has them. Files are read by path (a
shared filesystem is assumed); archive members travel as bytes. Needs `pip install 'aldm[ray]'`."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from aldm.batch import Case, Record, from_payload, output_dir, payload
from aldm.errors import AldmError, require


class _Worker:
    """One model per worker process."""

    def __init__(self, model_dir: str, options: dict, backend: str, threads: int | None):
        from aldm.infer import Options, Translator
        from aldm.runtime.pipeline import Pipeline

        opts = Options(**(options | {"targets": tuple(options["targets"]),
                                     "out_dir": None}))
        self.translator = Translator(Pipeline.load(model_dir, backend=backend, threads=threads), opts)

    def run(self, d: dict, out: str) -> dict:
        import time

        from aldm.batch import _reason

        case = from_payload(d)
        t = self.translator
        try:
            paths = t.output_paths(Path(case.name), output_dir(Path(out), case))
            if not t.options.overwrite and t.is_complete(paths):
                return asdict(Record(case.id, "skipped", "complete outputs exist", [str(p) for p in paths.values()]))
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
            return asdict(Record(case.id, "done", "", [str(p) for p in res.outputs.values()], seed,
                                 read_s, compute_s, res.timings["write"]))
        except (AldmError, OSError, MemoryError) as exc:
            return asdict(Record(case.id, "failed", _reason(exc)))


def run_ray(model_dir: Path, options: dict, source: Path, cases: list[Case], out: Path, *,
            address: str = "local", workers: int | None = None, backend: str = "auto",
            threads: int | None = 1, on_event: Callable[[str, Case, Record | None], None] = lambda *a: None
            ) -> list[Record]:
    ray = require("ray", "ray")

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = workers or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(_Worker)
    actors = [actor.remote(str(model_dir), options, backend, threads) for _ in range(n)]
    records: dict[str, Record] = {}
    todo = iter([c for c in cases if not c.refused])
    for c in cases:
        if c.refused:
            records[c.id] = Record(c.id, "failed", f"refused: {c.refused}")
            on_event("case", c, records[c.id])
    in_flight = {}

    def submit(worker) -> None:  # one case per idle worker: archive bytes never pile up in memory
        case = next(todo, None)
        if case is not None:
            in_flight[worker.run.remote(payload(case, source), str(out))] = (worker, case)

    for w in actors:
        submit(w)
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        worker, case = in_flight.pop(ref)
        records[case.id] = Record(**ray.get(ref))
        on_event("case", case, records[case.id])
        submit(worker)
    return [records[c.id] for c in cases if c.id in records]
