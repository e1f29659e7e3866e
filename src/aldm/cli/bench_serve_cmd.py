"""`aldm bench-serve`: what a running `aldm serve` costs over the direct pipeline, and how it
scales with concurrent clients."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.atomic import write_text
from aldm.cli._common import handle_errors, say, split_list


@handle_errors
def bench_serve(
    url: Annotated[str, typer.Argument(help="The running server, e.g. http://127.0.0.1:8080. Start it with the same model as --model (default: the bundled model) and the same backend, or the overhead figure compares different work.", show_default=False)],
    source: Annotated[Path, typer.Argument(help="A source NIfTI, translated again and again.", show_default=False)],
    token_file: Annotated[Optional[Path], typer.Option(help="A file holding the server's bearer token. Default: no token.")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated targets of every job.")] = "t2",
    runs: Annotated[int, typer.Option(help="Alternating direct/server pairs for the overhead (medians reported), and jobs per concurrency level.")] = 5,
    concurrency: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients; each level runs --runs jobs.")] = "1,2,4",
    model: Annotated[Optional[Path], typer.Option(help="Model folder of the direct in-process runs. Default: the model bundled with aldm (start the server with the same one).")] = None,
    backend: Annotated[str, typer.Option(help="Backend of the direct runs (start the server with the same one).")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps of every job. Default: the model's.")] = None,
    strength: Annotated[Optional[float], typer.Option(help="Sampling strength of every job. Default: the model's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every job (the same work on both sides).")] = 0,
    source_modality: Annotated[str, typer.Option(help="Modality of SOURCE.")] = "t1",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here. Default: table only.")] = None,
) -> None:
    """Server overhead over the direct Pipeline (median of --runs alternating pairs), then latency
    p50/p95 and throughput at each --concurrency. Prints a table; --json writes the figures."""
    from aldm.cli.remote import preflight, read_token
    from aldm.client import Client
    from aldm.errors import UsageError
    from aldm.translator import Options, Translator, default_model_dir
    from aldm.runtime.pipeline import Pipeline

    if runs < 1:
        raise UsageError("--runs must be at least 1")
    try:
        levels = [int(c) for c in split_list(concurrency)]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency must be positive integers like 1,2,4, not {concurrency!r}")
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    target_list = tuple(t.lower() for t in split_list(targets))
    client = Client(url, read_token(token_file) if token_file is not None else None)
    preflight(client)
    job_opts = {"targets": ",".join(target_list), "source_modality": source_modality, "steps": steps,
                "strength": strength, "seed": seed}
    model_dir = model or default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="aldm-bench-serve-"))
    try:
        opts = Options(target_list, work / "direct", steps=steps, seed=seed, source_modality=source_modality,
                       strength=strength, overwrite=True)
        say(f"loading {model_dir} ({backend})")
        translator = Translator(Pipeline.load(model_dir, backend=backend), opts)

        def direct() -> tuple[float, dict]:
            t0 = time.perf_counter()
            res = translator.run(source)
            wall = time.perf_counter() - t0
            return wall, {t: json.loads(p.read_text())["output_sha256"] for t, p in res.sidecars.items()}

        counter = iter(range(1 << 30))
        lock = threading.Lock()

        def served() -> tuple[float, dict]:
            with lock:
                d = work / f"server-{next(counter)}"
            t0 = time.perf_counter()
            # polls at most 0.1 s apart: ~0.05 s of polling lag per job, ~10 light requests a second
            job = client.translate(source, d, poll=0.1, **job_opts)
            wall = time.perf_counter() - t0
            shutil.rmtree(d, ignore_errors=True)
            return wall, {t: o["sidecar"] for t, o in job["outputs"].items()}

        say("warm-up: one direct run, one server job (not timed)")
        _, direct_hash = direct()
        _, sidecars = served()
        server_manifest = {s.get("manifest_sha256") for s in sidecars.values()}
        same_model = server_manifest == {translator.manifest_sha256}
        same_output = {t: s.get("output_sha256") for t, s in sidecars.items()} == direct_hash
        if not same_model:
            say("warning: the server runs a different model (manifest hash) than the direct runs: "
                "the overhead figure compares different work")
        elif not same_output:
            say("warning: the server's output differs from the direct run's (another backend or settings?)")

        direct_s, server_s = [], []
        for i in range(runs):
            direct_s.append(direct()[0])
            server_s.append(served()[0])
            say(f"pair {i + 1}/{runs}: direct {direct_s[-1]:.3f} s, server {server_s[-1]:.3f} s")
        med_d, med_s = statistics.median(direct_s), statistics.median(server_s)

        scaling = []
        for c in levels:
            latencies: list[float] = []
            todo = iter(range(runs))
            errors: list[BaseException] = []

            def client_thread() -> None:
                while not errors:
                    with lock:
                        if next(todo, None) is None:
                            return
                    try:
                        latencies.append(served()[0])
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                        errors.append(exc)

            threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                raise errors[0]
            scaling.append({"concurrency": c, "jobs": len(latencies), "wall_s": round(wall, 4),
                            "latency_p50_s": round(_percentile(latencies, 50), 4),
                            "latency_p95_s": round(_percentile(latencies, 95), 4),
                            "throughput_jobs_per_s": round(len(latencies) / wall, 4),
                            "latency_s": [round(x, 4) for x in latencies]})
            say(f"concurrency {c}: {len(latencies)} jobs in {wall:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "url": client.url, "source": str(source), "model": str(Path(model_dir).resolve()),
        "backend": translator.pipeline.backend, "manifest_sha256": translator.manifest_sha256,
        "targets": list(target_list), "steps": steps, "strength": strength, "seed": seed, "runs": runs,
        "same_model": same_model, "same_output": same_output,
        "direct_s": [round(x, 4) for x in direct_s], "server_s": [round(x, 4) for x in server_s],
        "direct_median_s": round(med_d, 4), "server_median_s": round(med_s, 4),
        "overhead_pct": round(100 * (med_s - med_d) / med_d, 2) if med_d > 0 else None,
        "direct_throughput_jobs_per_s": round(1 / med_d, 4) if med_d > 0 else None,
        "concurrency": scaling,
    }
    typer.echo(format_report(result))
    if json_out:
        write_text(json_out, json.dumps(result, indent=1))


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def format_report(r: dict) -> str:
    oh = "n/a" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.2f} %"
    lines = [
        f"server {r['url']}  model {r['model']} ({r['backend']})  targets {','.join(r['targets'])}",
        f"overhead, median of {r['runs']} alternating pairs: direct {r['direct_median_s']:.3f} s, "
        f"server {r['server_median_s']:.3f} s, {oh}"
        + ("" if r["same_model"] else "  (DIFFERENT MODEL on the server)"),
        "",
        f"{'concurrency':>11}  {'jobs':>4}  {'p50 s':>8}  {'p95 s':>8}  {'jobs/s':>8}",
    ]
    for row in r["concurrency"]:
        lines.append(f"{row['concurrency']:>11}  {row['jobs']:>4}  {row['latency_p50_s']:>8.3f}  "
                     f"{row['latency_p95_s']:>8.3f}  {row['throughput_jobs_per_s']:>8.3f}")
    if r["direct_throughput_jobs_per_s"]:
        lines.append(f"{'direct':>11}  {'':>4}  {r['direct_median_s']:>8.3f}  {'':>8}  "
                     f"{r['direct_throughput_jobs_per_s']:>8.3f}")
    return "\n".join(lines)
