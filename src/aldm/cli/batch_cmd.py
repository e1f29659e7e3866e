"""The batch side of aldm-infer: discovery, progress, report, exit code (0 all done, 3 failures)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import typer

from aldm.cli._common import fail, say
from aldm.errors import AldmError, exit_now


def run_batch(translator, source: Path, out: Path, *, prefetch: int, ray: str | None,
              workers: int | None, backend: str, threads: int | None, quiet: bool, limits=None) -> int:
    from aldm import batch as B

    limits = limits or B.ArchiveLimits()
    cases, journal = start_batch(source, out, translator.options.source_modality, quiet,
                                 source_series=translator.options.source_series, limits=limits)
    if ray is not None and any(c.dicom is not None for c in cases):
        fail("--ray does not take DICOM inputs yet; run the batch without --ray", 2)
    stop = threading.Event()
    bar, task = _bar(quiet, len(cases))

    def on_event(kind, case, rec):
        if kind == "case" and rec is not None:
            try:
                journal.add(rec)
            except AldmError as exc:  # the report could not be written (disk full): say so, go on
                typer.echo(f"warning: report not updated: {exc}", err=True)
            if bar:
                bar.advance(task)
            if rec.status == "failed":
                typer.echo(f"failed: {case.id}: {rec.reason}", err=True)
        elif kind == "start" and bar:
            bar.update(task, description=case.id)

    try:
        with B.sigint_stops(stop, say), (bar or _null()):
            if ray is not None:
                from aldm.batch_ray import run_ray

                opts = dataclasses.asdict(translator.options) | {"out_dir": None}
                records = run_ray(translator.pipeline.model.path, opts, source, cases, out, address=ray,
                                  workers=workers, backend=backend, threads=threads or 1, on_event=on_event,
                                  stop=stop, limits=limits)
            else:
                records = B.run_local(translator, source, cases, out, prefetch=prefetch, on_event=on_event,
                                      stop=stop, limits=limits)
    except KeyboardInterrupt:
        summary, j, c = journal.finish()
        say(f"aborted: {summary['done']} done before the second interrupt; report: {j}")
        exit_now(130)
    try:
        summary, j, c = journal.finish()
    except AldmError as exc:
        fail(f"the batch ran but its report could not be written: {exc}")
    if not quiet:
        print_summary(summary, j, c)
    return B.exit_code(records)


def start_batch(source: Path, out: Path, source_modality: str, quiet: bool, *, source_series: str | None = None,
                limits=None):
    """(cases, journal): the cases of a batch input, its output folder made and cleared of the
    temporary files an interrupted run left. Exits with a one-line error when there is nothing to do."""
    from aldm import batch as B

    try:
        cases = B.discover(source, source_modality, source_series=source_series, limits=limits)
    except AldmError as exc:
        fail(str(exc), exc.exit_code)
    if not cases:
        fail(f"{source}: no NIfTI volumes or DICOM series found", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the output folder {out}: {exc.strerror or exc}")
    stale = B.clean_partials(out)
    if stale and not quiet:
        say(f"removed {stale} temporary file(s) left by an interrupted run")
    return cases, B.Journal(out, cases, source)


def print_summary(summary: dict, j: Path, c: Path) -> None:
    m = summary["mean_s_per_case"]
    say(f"{summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed, "
        f"{summary['interrupted']} interrupted in {summary['wall_s']} s "
        f"({summary['cases_per_hour']} cases/hour; per case: read {m['read']} s, compute {m['compute']} s, "
        f"write {m['write']} s; wall {summary['wall_s_per_case']} s)")
    say(f"report: {j.with_name('aldm_report.html')} (and .json, .csv)")


def _bar(quiet: bool, total: int):
    if quiet:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    return bar, bar.add_task("batch", total=total)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
