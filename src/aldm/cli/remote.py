"""`aldm-infer --server URL`: the same sources, outputs, names, lines, report and exit codes as a
local run, computed by an `aldm serve` server (aldm.client does the HTTP).

Plain sources go one at a time; a `--batch` input is enumerated exactly as locally
(aldm.batch.discover), up to `jobs` cases in flight at once, with the same Journal report
(aldm_report.json / .csv) and exit code (0 all done, 3 some failed, 130 interrupted).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import typer

from aldm.cli._common import fail, say
from aldm.errors import AldmError, ServerError, ServerUnreachable, describe, one_line

# options of aldm-infer that only mean something to a local computation: refused with --server
LOCAL_ONLY = {"model": "--model", "backend": "--backend", "threads": "--threads",
              "decode_batch": "--decode-batch", "tile_rows": "--tile-rows", "preview": "--preview", "skull_strip": "--skull-strip",
              "ray": "--ray", "ray_address": "--ray-address", "workers": "--workers",
              "max_voxels": "--max-voxels", "source_series": "--source-series", "dicom_out": "--dicom-out"}


def main(ctx: typer.Context, server: str | None, token_file: Path | None, opts, sources, batch: Path | None,
         out: Path | None, *, prefetch: int, quiet: bool, limits) -> int:
    """aldm-infer with --server: checks, then plain sources or a batch; the exit code."""
    from aldm.client import Client
    from aldm.translator import check_options

    if server is None:
        fail("--token-file needs --server URL", 2)
    local = given_local_options(ctx)
    if local:
        fail(f"{', '.join(local)} only apply to a local run; the server uses its own model and "
             "settings (drop them or --server)", 2)
    try:
        check_options(opts)
        client = Client(server, read_token(token_file) if token_file is not None else None)
    except AldmError as exc:
        fail(str(exc), 2)
    preflight(client)
    if batch is not None:
        return run_batch(client, batch, out, opts, jobs=prefetch, quiet=quiet, limits=limits)
    return run_sources(client, sources, opts, quiet=quiet)


def given_local_options(ctx: typer.Context) -> list[str]:
    """The local-only options the user typed (a default value is not "given")."""
    given = []
    for param, flag in LOCAL_ONLY.items():
        src = ctx.get_parameter_source(param)  # typer's own (vendored) click: compare by name
        if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append(flag)
    return given


def read_token(path: Path) -> str:
    """The token in `path`, surrounding whitespace stripped; a one-line error exit 2 otherwise."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        fail(f"cannot read the token file {path}: {(exc.strerror or str(exc)).lower()}", 2)
    except UnicodeDecodeError:
        fail(f"the token file {path} is not UTF-8 text", 2)
    if not token:
        fail(f"the token file {path} is empty", 2)
    if not token.isprintable() or any(c.isspace() for c in token):
        fail(f"the token file {path} holds more than one word (one token, no spaces, expected)", 2)
    return token


def submit_options(opts) -> dict:
    """aldm.translator.Options -> the query fields of POST /v1/translations."""
    return {"targets": ",".join(opts.targets), "source_modality": opts.source_modality, "steps": opts.steps,
            "eta": opts.eta, "strength": opts.strength, "seed": opts.seed, "intensity": opts.intensity,
            "naming": opts.naming, "skull_check": opts.skull_check}


def preflight(client) -> None:
    """Fail once, before any upload, when the server cannot be reached or refuses the token: ask
    for a job that does not exist (404 is the good answer; 401/403 a bad token)."""
    try:
        client.status("0" * 32)
    except ServerUnreachable as exc:
        fail(str(exc), 1)
    except ServerError as exc:
        if exc.status in (401, 403):
            fail(str(exc), 2)


def run_sources(client, sources: list[Path], opts, *, quiet: bool) -> int:
    """Each source through the server; the exit code (0, or 1 when a source failed)."""
    from aldm.cli.infer import _progress
    from aldm.translator import check_writable, output_names

    failed = 0
    with _progress(quiet) as bar:
        for src in sources:
            task = bar.add_task(f"{src.name}: uploading", total=None) if bar else None
            t0 = time.perf_counter()
            try:
                out_dir = opts.out_dir if opts.out_dir is not None else src.parent
                expected = output_names(src.name, opts.targets, opts.naming)
                check_writable({t: out_dir / n for t, n in expected.items()}, opts.overwrite)
                job = client.translate(src, out_dir, name=src.name, on_progress=_on_progress(bar, task, src.name),
                                       **submit_options(opts))
            except KeyboardInterrupt:  # translate() has cancelled the job on the server
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
            except ServerUnreachable as exc:  # nothing else will get through either
                fail(str(exc), 1)
            except ServerError as exc:
                if exc.exit_code == 2:  # a refused token: every other source would be refused too
                    fail(str(exc), 2)
                failed += 1
                typer.echo(f"error: {src}: {exc}" if _needs_name(exc, src) else f"error: {exc}", err=True)
                _hide(bar, task, src.name, "failed")
                continue
            except AldmError as exc:
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                _hide(bar, task, src.name, "failed")
                continue
            except Exception as exc:  # any other failure of this source: say which, go on to the next
                failed += 1
                typer.echo(f"error: {src}: {type(exc).__name__}: {one_line(exc)}", err=True)
                _hide(bar, task, src.name, "failed")
                continue
            _hide(bar, task, src.name, "done")
            for w in job.get("warnings") or []:
                typer.echo(f"warning: {src.name}: {w}", err=True)
            if not quiet:
                outs = ", ".join(w["file"] for w in job["written"].values())
                say(f"{src} -> {outs} ({time.perf_counter() - t0:.1f} s)")
    if failed:
        if len(sources) > 1:  # one source: its own error line already says everything
            typer.echo(f"error: {failed} of {len(sources)} source(s) failed", err=True)
        return 1
    return 0


def _needs_name(exc: ServerError, src: Path) -> bool:
    """A server reason that does not name the file gets the local path in front (the server only
    knows the upload's name)."""
    msg = str(exc)
    return src.name not in msg and str(src) not in msg


def _on_progress(bar, task, name: str, stop: threading.Event | None = None):
    def on_progress(job: dict) -> None:
        if stop is not None and stop.is_set():
            raise _Stopped
        if bar is None:
            return
        state = job.get("status")
        if state == "queued":
            pos = job.get("queue_position")
            bar.update(task, description=f"{name}: queued" + (f" ({pos} ahead)" if pos else ""))
        elif state == "running":
            bar.update(task, description=f"{name}: {job.get('stage') or 'running'}")
            if job.get("steps"):
                bar.update(task, total=job["steps"], completed=job.get("step") or 0)
        elif state == "done":
            bar.update(task, description=f"{name}: downloading")

    return on_progress


def _hide(bar, task, name: str, state: str) -> None:
    if bar is not None:
        bar.update(task, description=f"{name}: {state}", visible=False)


class _Stopped(Exception):
    """Raised from the progress callback after the first Ctrl-C: the job is cancelled."""


# ------------------------------------------------------------------------------ batch

def completeness(paths: dict[str, Path], opts) -> tuple[bool, str]:
    """Like Translator.completeness, without the model: every output and sidecar exists, each
    output's bytes are those its sidecar hashed, and the sidecar's settings agree with every
    option this run states (the server's model is not known here before a job runs)."""
    from aldm.nifti import sidecar_path
    from aldm.runtime.manifest import sha256_file

    want = {"targets": list(opts.targets), "source_modality": opts.source_modality, "intensity": opts.intensity,
            "naming": opts.naming, "seed": opts.seed}
    for k in ("steps", "eta", "strength"):
        if getattr(opts, k) is not None:
            want[k] = float(getattr(opts, k)) if k != "steps" else getattr(opts, k)
    for path in paths.values():
        side = sidecar_path(path)
        if not (path.is_file() and side.is_file()):
            return False, "" if not path.exists() else "previous run unfinished"
        try:
            doc = json.loads(side.read_text())
            settings = doc.get("settings") or {}
            changed = [k for k, v in want.items() if settings.get(k) != v]
            bytes_ok = not changed and doc.get("output_sha256") == sha256_file(path)
        except (OSError, ValueError, AttributeError):
            return False, f"unreadable sidecar {side.name}"
        if changed:
            return False, "settings changed: " + ", ".join(
                f"{k} {json.dumps(settings.get(k))[:40]} -> {json.dumps(want[k])[:40]}" for k in changed)
        if not bytes_ok:
            return False, f"{path.name} differs from the bytes its sidecar recorded"
    return True, "complete outputs with the same settings exist"


def run_batch(client, source: Path, out: Path, opts, *, jobs: int, quiet: bool, limits) -> int:
    from aldm import batch as B
    from aldm.cli.batch_cmd import _bar, _null, print_summary, start_batch
    from aldm.translator import output_names

    cases, journal = start_batch(source, out, opts.source_modality, quiet)
    if any(c.dicom is not None for c in cases):
        fail("--server takes NIfTI sources only; convert DICOM inputs locally (without --server)", 2)
    stop = threading.Event()
    fatal: list[str] = []  # the server went away or refused the token: the other cases are not sent
    bar, task = _bar(quiet, len(cases))
    archive = B.ArchiveReader(source, limits)
    archive_lock = threading.Lock()
    sub = submit_options(opts)

    def record(case, rec) -> None:
        try:
            journal.add(rec)
        except AldmError as exc:  # the report could not be written (disk full): say so, go on
            typer.echo(f"warning: report not updated: {exc}", err=True)
        if bar:
            bar.advance(task)
        if rec.status == "failed":
            typer.echo(f"failed: {case.id}: {rec.reason}", err=True)

    def one(case) -> B.Record:
        if case.refused:
            return B.Record(case.id, "failed", f"refused: {case.refused}")
        if fatal:
            return B.Record(case.id, "failed", f"not sent: {fatal[0]}")
        if stop.is_set():
            return B.Record(case.id, "interrupted", "stopped before computing")
        try:
            d = B.output_dir(out, case)
            paths = {t: d / n for t, n in output_names(case.name, opts.targets, opts.naming).items()}
            why = ""
            if not opts.overwrite:
                complete, why = completeness(paths, opts)
                if complete:
                    return B.Record(case.id, "skipped", why, [str(p) for p in paths.values()])
            d.mkdir(parents=True, exist_ok=True)
            if bar:
                bar.update(task, description=case.id)
            with _local_copy(case, archive, archive_lock) as local:
                return _send(client, case, local, d, sub, why, stop)
        except ServerUnreachable as exc:
            fatal.append(str(exc))
            return B.Record(case.id, "failed", str(exc))
        except ServerError as exc:
            if exc.exit_code == 2:
                fatal.append(str(exc))
            return B.Record(case.id, "failed", describe(exc))
        except Exception as exc:  # one case's failure, whatever its type, never the batch's
            return B.Record(case.id, "failed", describe(exc))

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="aldm-remote")
    try:
        with B.sigint_stops(stop, say), (bar or _null()):
            futures = {pool.submit(one, c): c for c in cases}
            for fut in concurrent.futures.as_completed(futures):
                record(futures[fut], fut.result())
    except KeyboardInterrupt:  # second Ctrl-C: jobs in flight are cancelled at their next poll
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        summary, j, c = journal.finish()
        say(f"aborted: {summary['done']} done before the second interrupt; report: {j}")
        return 130
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        archive.close()
    try:
        summary, j, c = journal.finish()
    except AldmError as exc:
        fail(f"the batch ran but its report could not be written: {exc}")
    if fatal:
        typer.echo(f"error: {fatal[0]}", err=True)
    if not quiet:
        print_summary(summary, j, c)
    return B.exit_code(journal.ordered())


def _send(client, case, local: Path, d: Path, sub: dict, why: str, stop):
    """One case through the server: its Record (read = upload, compute = queue + run, write = downloads)."""
    from aldm import batch as B

    marks = {"t0": time.perf_counter()}
    progress = _on_progress(None, None, case.name, stop)

    def on_submit(_job):
        marks["submitted"] = time.perf_counter()

    def on_progress(job):
        progress(job)
        if job.get("status") in ("done", "failed", "cancelled"):
            marks["finished"] = time.perf_counter()

    try:
        job = client.translate(local, d, name=case.name, case_id=case.id, on_submit=on_submit,
                               on_progress=on_progress, **sub)
    except _Stopped:
        return B.Record(case.id, "interrupted", "stopped while computing")
    except ServerError as exc:
        seed = _seed(getattr(exc, "job", None))
        return B.Record(case.id, "failed", str(exc), seed=seed)
    end = time.perf_counter()
    sub_t, fin_t = marks.get("submitted", end), marks.get("finished", end)
    files = [w["file"] for w in job["written"].values()]
    return B.Record(case.id, "done", f"redone: {why}" if why else "", files, _seed(job),
                    sub_t - marks["t0"], fin_t - sub_t, end - fin_t)


def _seed(job) -> int | None:
    for o in ((job or {}).get("outputs") or {}).values():
        seed = (o.get("sidecar") or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return None


class _local_copy:
    """The case as a local file: the file itself, or its archive member copied to a temp file
    (archives are read under a lock: a tar is one forward stream)."""

    def __init__(self, case, archive, lock):
        self.case, self.archive, self.lock, self.tmp = case, archive, lock, None

    def __enter__(self) -> Path:
        if self.case.path is not None:
            return self.case.path
        suffix = ".nii.gz" if self.case.name.lower().endswith(".gz") else ".nii"
        fd, name = tempfile.mkstemp(prefix="aldm-member-", suffix=suffix)
        self.tmp = Path(name)
        try:
            with self.lock, os.fdopen(fd, "wb") as dst:
                self.archive.copy(self.case.member, dst)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.tmp

    def __exit__(self, *exc) -> bool:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        return False
