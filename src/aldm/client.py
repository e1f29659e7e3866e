"""A small client for `aldm serve` (standard library only: urllib).

    from aldm.client import Client

    c = Client("http://127.0.0.1:8080", token="...")
    job = c.translate("case01_t1.nii.gz", "out/", targets="t2,flair", seed=0)
    job["written"]  # {"t2": {"file": "out/case01_t1_t2.nii.gz", "sidecar": "out/case01_t1_t2.json"}, ...}

Uploads stream the file from disk (a raw body with a Content-Length, read in 1 MiB blocks);
downloads stream into a temporary file beside the destination and are renamed into place, so a
final name never holds a partial file. Retries: 429 and 503 are retried after the server's
`Retry-After` seconds, connection refused/reset with exponential backoff (0.25 s doubling, capped
at 4 s), `retries` times in all; any other 4xx/5xx is raised at once. Errors are
`aldm.errors.ServerError` (the server's one-line `error` as the message, `status` its HTTP code),
`ServerUnreachable` (no answer) and `JobFailed` (an accepted job that failed or was cancelled).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterator

from aldm.atomic import atomic_path, write_text
from aldm.errors import AldmError, InputError, JobFailed, ServerError, ServerUnreachable
from aldm.nifti import sidecar_path

BLOCK = 1 << 20  # bytes read from disk / the socket at a time
TERMINAL = ("done", "failed", "cancelled")
BACKOFF_S, BACKOFF_CAP_S = 0.25, 4.0
FIRST_POLL_S = 0.05
_NIFTI = (".nii.gz", ".nii")
_TRANSPORT = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead,
              http.client.BadStatusLine)


def safe_name(name: object) -> str:
    """A file name the server reported, refused unless it is a plain NIfTI file name (a server
    must not make the client write outside its output folder or over hidden files)."""
    if (not isinstance(name, str) or not name or name != Path(name).name or "/" in name or "\\" in name
            or name.startswith(".") or not name.lower().endswith(_NIFTI) or "\x00" in name):
        raise ServerError(f"the server reported an unusable output file name {name!r}")
    return name


def _retry_after(headers) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); 1 s if absent."""
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    if not value:
        return 1.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return 1.0


def _one_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:500]


def _query(params: dict) -> str:
    items = []
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        items.append((k, str(v)))
    return urllib.parse.urlencode(items)


class Client:
    """One `aldm serve` server. Thread-safe: every call opens its own connection."""

    def __init__(self, url: str, token: str | None = None, *, retries: int = 8, timeout: float = 60):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AldmError(f"server URL {url!r}: expected http(s)://HOST[:PORT]")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.token = token or None
        self.retries, self.timeout = max(0, int(retries)), timeout
        handlers = []
        if _loopback(parts.hostname):  # a proxy from the environment must not intercept localhost
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------------------ the API
    def submit(self, path: str | os.PathLike, *, name: str | None = None, targets=None,
               source_modality: str | None = None, steps: int | None = None, eta: float | None = None,
               strength: float | None = None, seed: int | None = None, intensity: str | None = None,
               naming: str | None = None, skull_check: bool | None = None,
               case_id: str | None = None) -> dict:
        """Upload one NIfTI (streamed from disk) as a new job; the server's 202 document.
        `case_id` keys the per-case seed (default: the name), as a local batch keys it by the
        case's path inside its input."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a NIfTI file")
        if not path.name.lower().endswith(_NIFTI):
            raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
        try:
            size = path.stat().st_size
            os.close(os.open(path, os.O_RDONLY))  # unreadable: say so before connecting
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None
        query = _query({"name": name or path.name, "targets": targets, "source_modality": source_modality,
                        "steps": steps, "eta": eta, "strength": strength, "seed": seed, "intensity": intensity,
                        "naming": naming, "skull_check": skull_check, "case_id": case_id})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._request("POST", f"/v1/translations?{query}", headers=headers,
                           body=lambda: _file_chunks(path)) as resp:
            return _json(resp)

    def status(self, job_id: str) -> dict:
        with self._request("GET", self._job(job_id)) as resp:
            return _json(resp)

    def wait(self, job_id: str, poll: float = 0.5, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is done, failed or cancelled; its last status document. Polls start
        0.05 s apart and double up to `poll` s (short jobs are not held back by the interval).
        `on_progress` sees every document polled. A timeout raises ServerError (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min(FIRST_POLL_S, poll)
        while True:
            job = self.status(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.get("status") in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise ServerError(f"job {job_id} not finished after {timeout:g} s (status {job.get('status')})")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(interval * 2, poll)

    def download(self, job_id: str, target: str, dest_path: str | os.PathLike) -> Path:
        """Stream one output to `dest_path`: a temporary file in its folder, renamed when complete."""
        dest = Path(dest_path)
        attempt = 0
        while True:
            try:
                with self._request("GET", f"{self._job(job_id)}/{urllib.parse.quote(target, safe='')}",
                                   attempt=attempt) as resp:
                    with atomic_path(dest) as tmp:
                        _stream_to(resp, tmp)
                return dest
            except _Transport as exc:  # cut mid-stream: nothing is left; fetch it again
                attempt = exc.attempt + 1
                if attempt > self.retries:
                    raise ServerUnreachable(f"download of {target} from {self.url} failed: {exc.reason}") from None
                time.sleep(_backoff(attempt))

    def cancel(self, job_id: str) -> dict:
        with self._request("DELETE", self._job(job_id)) as resp:
            return _json(resp)

    def translate(self, path: str | os.PathLike, out_dir: str | os.PathLike, *, poll: float = 0.5,
                  timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
                  on_submit: Callable[[dict], None] | None = None, **opts) -> dict:
        """Submit, wait, then download every output and write every sidecar into `out_dir` under the
        names the server reports. The finished job document, plus `written`: {target: {"file",
        "sidecar"}} (local paths). A failed or cancelled job raises JobFailed with the server's
        reason; a case is written whole or not at all. Ctrl-C (or any error) while waiting cancels
        the job on the server."""
        out = Path(out_dir)
        accepted = self.submit(path, **opts)
        if on_submit is not None:
            on_submit(accepted)
        job_id = accepted["id"]
        try:
            job = self.wait(job_id, poll=poll, timeout=timeout, on_progress=on_progress)
        except BaseException:
            with contextlib.suppress(Exception):
                self.cancel(job_id)
            raise
        if job.get("status") != "done":
            reason = job.get("error") or f"job {job.get('status', 'ended')}"
            raise JobFailed(_one_line(str(reason)), job)
        outputs = job.get("outputs") or {}
        if not outputs:
            raise ServerError(f"job {job_id} is done but the server reports no outputs")
        written: dict[str, dict[str, str]] = {}
        files: list[Path] = []
        try:
            out.mkdir(parents=True, exist_ok=True)
            for target, o in outputs.items():
                file = out / safe_name(o.get("file"))
                if not isinstance(o.get("sidecar"), dict):
                    raise ServerError(f"job {job_id} is done but the server reports no sidecar for {target}")
                files.append(self.download(job_id, target, file))
                side = sidecar_path(file)
                files.append(write_text(side, json.dumps(o["sidecar"], indent=1)))
                written[target] = {"file": str(file), "sidecar": str(side)}
        except OSError as exc:
            _remove(files)
            raise AldmError(f"cannot write into {out}: {exc.strerror or exc}") from None
        except BaseException:
            _remove(files)
            raise
        return job | {"written": written}

    def healthz(self) -> dict:
        with self._request("GET", "/healthz") as resp:
            return _json(resp)

    def readyz(self) -> bool:
        try:
            with self._request("GET", "/readyz", attempt=self.retries):  # no waiting for readiness
                return True
        except ServerError as exc:
            if exc.status == 503:
                return False
            raise

    # ------------------------------------------------------------------------------ HTTP
    @staticmethod
    def _job(job_id: str) -> str:
        return f"/v1/translations/{urllib.parse.quote(str(job_id), safe='')}"

    @contextlib.contextmanager
    def _request(self, method: str, route: str, *, headers: dict | None = None,
                 body: Callable[[], Iterator[bytes]] | None = None, attempt: int = 0):
        """The open response of a 2xx answer, with the retries of the class docstring.
        `body` makes a fresh iterator of the upload per attempt (the file is reopened)."""
        url = self.url + route
        h = {"Accept": "application/json"} | (headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        while True:
            data = body() if body is not None else None
            req = urllib.request.Request(url, data=data, headers=h, method=method)
            try:
                resp = self._opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                with contextlib.closing(exc):
                    err = _server_error(exc)
                    if exc.code in (429, 503) and attempt < self.retries:
                        wait = _retry_after(exc.headers)
                        attempt += 1
                        time.sleep(wait)
                        continue
                raise err from None
            except (urllib.error.URLError, *_TRANSPORT, socket.timeout, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if _retryable(reason) and attempt < self.retries:
                    attempt += 1
                    time.sleep(_backoff(attempt))
                    continue
                raise ServerUnreachable(f"cannot reach the server at {self.url}: {_why(reason)}") from None
            finally:
                if data is not None:
                    data.close()
            try:
                yield _Response(resp, attempt)
            finally:
                resp.close()
            return


class _Transport(Exception):
    def __init__(self, reason: str, attempt: int = 0):
        super().__init__(reason)
        self.reason, self.attempt = reason, attempt


class _Response:
    """The response plus the retry count spent on it (downloads go on counting from there)."""

    def __init__(self, resp, attempt: int):
        self.resp, self.attempt = resp, attempt

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n)

    @property
    def headers(self):
        return self.resp.headers

    @property
    def status(self) -> int:
        return self.resp.status


def _file_chunks(path: Path) -> Iterator[bytes]:
    """The file in BLOCK-sized reads (never whole into memory); closed when the iterator is."""
    f = open(path, "rb")  # noqa: SIM115 - closed by the generator, also when abandoned
    try:
        while block := f.read(BLOCK):
            yield block
    finally:
        f.close()


def _stream_to(resp: _Response, tmp: Path) -> None:
    expected = resp.headers.get("Content-Length")
    n = 0
    with open(tmp, "wb") as f:
        while True:
            try:
                block = resp.read(BLOCK)
            except (*_TRANSPORT, socket.timeout, OSError) as exc:
                raise _Transport(_why(exc), resp.attempt) from None
            if not block:
                break
            n += len(block)
            f.write(block)
    if expected is not None and expected.isdigit() and n != int(expected):
        raise _Transport(f"got {n} of {expected} bytes", resp.attempt)


def _json(resp) -> dict:
    try:
        doc = json.loads(resp.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServerError(f"the server answered {resp.status} with a body that is not JSON ({exc})",
                          resp.status) from None
    except (*_TRANSPORT, socket.timeout, OSError) as exc:
        raise ServerUnreachable(f"the server's answer was cut off: {_why(exc)}") from None
    if not isinstance(doc, dict):
        raise ServerError(f"the server answered {resp.status} with JSON that is not an object", resp.status)
    return doc


def _server_error(exc: urllib.error.HTTPError) -> ServerError:
    """The server's one-line `error` field (or the status line when the body has none)."""
    message = ""
    try:
        body = exc.read(64 << 10)
        doc = json.loads(body.decode("utf-8"))
        if isinstance(doc, dict) and doc.get("error"):
            message = _one_line(str(doc["error"]))
        elif isinstance(doc, dict) and doc.get("detail"):  # a framework's own error shape
            message = _one_line(doc["detail"] if isinstance(doc["detail"], str) else json.dumps(doc["detail"]))
    except Exception:  # noqa: BLE001 - any unreadable body: fall back to the status line
        pass
    return ServerError(message or f"HTTP {exc.code} {exc.reason}", exc.code)


def _retryable(reason) -> bool:
    return isinstance(reason, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError,
                               BrokenPipeError, http.client.RemoteDisconnected,
                               http.client.IncompleteRead, http.client.BadStatusLine))


def _backoff(attempt: int) -> float:
    """0.25 s before the first retry, doubling, at most 4 s."""
    return min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_CAP_S)


def _why(exc) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if isinstance(exc, ConnectionError) else exc.strerror
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return _one_line(str(exc)) or type(exc).__name__


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
