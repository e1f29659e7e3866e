"""aldm.client and `aldm-infer --server` against a fake `aldm serve` (http.server in a thread,
the issue-17 API with canned answers): retries honour Retry-After, client errors are not retried,
uploads stream the file with a Content-Length, downloads are atomic, and the CLI writes the
server's outputs and sidecars under the names it reports with aldm-infer's lines and exit codes."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import aldm.client
from aldm.client import Client
from aldm.errors import JobFailed, ServerError, ServerUnreachable
from conftest import synthetic_volume, write_nifti

SRC_NAME = "case01_t1.nii.gz"


# ------------------------------------------------------------------------------ the fake server

class Fake:
    """State and script of the fake server; every request is recorded in `seen`."""

    def __init__(self, nifti: bytes):
        self.nifti = nifti
        self.token: str | None = None
        self.seen: list[dict] = []
        self.post_answers: list[tuple[int, dict, dict]] = []  # (status, headers, json) before accepting
        self.failures: dict[str, str] = {}  # source name -> the job's one-line reason
        self.cut_downloads = False
        self.output_name: str | None = None  # a fixed (hostile) output name
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()

    def count(self, method: str, prefix: str = "/v1/translations") -> int:
        return sum(r["method"] == method and r["path"].startswith(prefix) for r in self.seen)

    def posts(self) -> list[dict]:
        return [r for r in self.seen if r["method"] == "POST"]


def _stem(name: str) -> str:
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else name


def _handler(fake: Fake):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, doc=None, headers=None, body: bytes | None = None, ctype="application/json"):
            data = body if body is not None else json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self):
            url = urllib.parse.urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            rec = {"t": time.monotonic(), "method": self.command, "path": url.path, "query": dict(urllib.parse.parse_qsl(url.query)),
                   "headers": dict(self.headers.items()), "body": body}
            with fake.lock:
                fake.seen.append(rec)
            if fake.token and url.path not in ("/healthz", "/readyz") and \
                    self.headers.get("Authorization") != f"Bearer {fake.token}":
                return self._send(401, {"error": "missing or invalid token"})
            parts = [p for p in url.path.split("/") if p]
            if self.command == "POST" and parts == ["v1", "translations"]:
                with fake.lock:
                    answer = fake.post_answers.pop(0) if fake.post_answers else None
                if answer is not None:
                    return self._send(answer[0], answer[2], answer[1])
                job_id = secrets.token_hex(16)
                q = rec["query"]
                fake.jobs[job_id] = {"name": q.get("name"), "targets": q.get("targets", "t2").split(","),
                                     "query": q, "polls": 0, "status": "queued"}
                return self._send(202, {"id": job_id, "status": "queued", "url": f"/v1/translations/{job_id}",
                                        "queue_position": 0}, {"Location": f"/v1/translations/{job_id}"})
            if len(parts) >= 3 and parts[:2] == ["v1", "translations"]:
                job = fake.jobs.get(parts[2])
                if job is None:
                    return self._send(404, {"error": f"no job {parts[2]}"})
                if self.command == "DELETE":
                    job["status"] = "cancelled"
                    return self._send(200, self._doc(parts[2], job))
                if len(parts) == 3:
                    job["polls"] += 1
                    if job["status"] not in ("cancelled",):
                        job["status"] = ("queued", "running", "done")[min(job["polls"] - 1, 2)]
                        if job["status"] == "done" and job["name"] in fake.failures:
                            job["status"] = "failed"
                    return self._send(200, self._doc(parts[2], job))
                if len(parts) == 4 and job["status"] == "done" and parts[3] in job["targets"]:
                    if fake.cut_downloads:  # headers promise the whole file, half of it comes
                        self.send_response(200)
                        self.send_header("Content-Type", "application/gzip")
                        self.send_header("Content-Length", str(len(fake.nifti)))
                        self.end_headers()
                        self.wfile.write(fake.nifti[: len(fake.nifti) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    return self._send(200, body=fake.nifti, ctype="application/gzip")
                return self._send(404, {"error": "no such output"})
            if url.path == "/healthz":
                return self._send(200, {"status": "ok"})
            return self._send(404, {"error": "not found"})

        def _doc(self, job_id: str, job: dict) -> dict:
            doc = {"id": job_id, "status": job["status"], "name": job["name"], "targets": job["targets"],
                   "stage": "sample" if job["status"] == "running" else None, "step": 1, "steps": 2,
                   "queue_position": 0 if job["status"] == "queued" else None, "created": 1.0,
                   "started": None, "finished": None, "timings": {}, "warnings": [], "error": None}
            if job["status"] == "failed":
                doc["error"] = fake.failures[job["name"]]
            if job["status"] == "done":
                doc["warnings"] = ["a warning from the server"]
                q = job["query"]
                doc["outputs"] = {}
                for t in job["targets"]:
                    file = fake.output_name or f"{_stem(job['name'])}_{t}.nii.gz"
                    doc["outputs"][t] = {"file": file, "url": f"/v1/translations/{job_id}/{t}", "sidecar": {
                        "target": t, "output": file, "seed": 1234,
                        "output_sha256": hashlib.sha256(fake.nifti).hexdigest(),
                        "manifest_sha256": "0" * 64,
                        "settings": {"targets": job["targets"], "source_modality": q.get("source_modality"),
                                     "intensity": q.get("intensity"), "naming": q.get("naming"),
                                     "seed": int(q["seed"]) if "seed" in q else None}}}
            return doc

        do_GET = do_POST = do_DELETE = _handle

    return Handler


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> bytes:
    return write_nifti(tmp_path_factory.mktemp("nii") / "out.nii.gz", synthetic_volume(seed=5)).read_bytes()


@pytest.fixture()
def server(nifti):
    fake = Fake(nifti)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def src(tmp_path) -> Path:
    return write_nifti(tmp_path / SRC_NAME, synthetic_volume())


# ------------------------------------------------------------------------------ retries

@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(server, src, status):
    server.post_answers.append((status, {"Retry-After": "1"}, {"error": "queue full"}))
    t0 = time.monotonic()
    job = Client(server.url, retries=3).submit(src, targets="t2")
    waited = time.monotonic() - t0
    assert waited >= 1.0, waited  # the header's second, not the 0.25 s backoff
    assert waited < 3.0
    assert job["status"] == "queued" and len(job["id"]) == 32
    posts = server.posts()
    assert len(posts) == 2  # one refused, one accepted
    assert posts[0]["body"] == posts[1]["body"] == src.read_bytes()  # the upload is sent again, whole


def test_retries_stop_after_retries(server, src):
    server.post_answers.extend([(429, {"Retry-After": "0"}, {"error": "queue full (4 jobs)"})] * 5)
    with pytest.raises(ServerError) as exc:
        Client(server.url, retries=2).submit(src, targets="t2")
    assert exc.value.status == 429 and str(exc.value) == "queue full (4 jobs)"
    assert len(server.posts()) == 3  # the first try and 2 retries


@pytest.mark.parametrize("status,message", [(400, "target t1 is the source modality; it is already there"),
                                            (401, "missing or invalid token"), (404, "no such route"),
                                            (413, "upload over the 1 MB cap")])
def test_other_client_errors_are_not_retried(server, src, status, message):
    server.post_answers.append((status, {"Retry-After": "0"}, {"error": message}))
    with pytest.raises(ServerError) as exc:
        Client(server.url, retries=5).submit(src, targets="t2")
    assert exc.value.status == status and str(exc.value) == message
    assert exc.value.exit_code == (2 if status == 401 else 1)
    assert len(server.posts()) == 1


def test_unknown_job_is_404_with_the_servers_reason(server):
    with pytest.raises(ServerError) as exc:
        Client(server.url).status("f" * 32)
    assert exc.value.status == 404 and str(exc.value) == f"no job {'f' * 32}"
    assert server.count("GET") == 1


def test_connection_refused_backs_off_exponentially(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    monkeypatch.setattr(aldm.client.time, "sleep", sleeps.append)
    with pytest.raises(ServerUnreachable) as exc:
        Client(f"http://127.0.0.1:{port}", retries=8).status("a" * 32)
    assert sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert "connection refused" in str(exc.value) and exc.value.status is None


# ------------------------------------------------------------------------------ upload / download

def test_upload_streams_the_file_with_a_content_length(server, tmp_path, monkeypatch):
    path = tmp_path / "big_t1.nii.gz"
    data = os.urandom(3 * aldm.client.BLOCK + 12345)
    path.write_bytes(data)
    reads: list = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def close(self):
            self.f.close()

    real_open = open
    monkeypatch.setattr(aldm.client, "open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)),
                        raising=False)
    job = Client(server.url).submit(path, targets=["t2", "flair"], seed=0, eta=0.5, skull_check=False)
    (post,) = server.posts()
    assert post["body"] == data
    assert post["headers"]["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in post["headers"]
    assert post["headers"]["Content-Type"] == "application/octet-stream"
    assert post["query"] == {"name": "big_t1.nii.gz", "targets": "t2,flair", "seed": "0", "eta": "0.5",
                             "skull_check": "false"}
    assert reads and all(isinstance(n, int) and 0 < n <= aldm.client.BLOCK for n in reads)  # never read()
    assert len(reads) >= 4  # 3 full blocks, the rest, then the empty read
    assert job["url"] == f"/v1/translations/{job['id']}"


def test_token_is_sent_as_bearer(server, src):
    server.token = "s3cret"
    with pytest.raises(ServerError) as exc:
        Client(server.url, "wrong").submit(src, targets="t2")
    assert exc.value.status == 401 and exc.value.exit_code == 2
    job = Client(server.url, "s3cret").submit(src, targets="t2")
    assert job["status"] == "queued"
    assert [p["headers"]["Authorization"] for p in server.posts()] == ["Bearer wrong", "Bearer s3cret"]


def test_download_is_atomic(server, src, tmp_path):
    server.cut_downloads = True
    c = Client(server.url, retries=2)
    job = c.submit(src, targets="t2")
    assert c.wait(job["id"], poll=0.01)["status"] == "done"
    dest_dir = tmp_path / "dl"
    dest_dir.mkdir()
    with pytest.raises(ServerUnreachable):
        c.download(job["id"], "t2", dest_dir / "case01_t1_t2.nii.gz")
    assert list(dest_dir.iterdir()) == []  # no final name, no temporary file left
    assert server.count("GET", f"/v1/translations/{job['id']}/t2") == 3  # tried, then retried twice
    server.cut_downloads = False
    out = c.download(job["id"], "t2", dest_dir / "case01_t1_t2.nii.gz")
    assert out.read_bytes() == server.nifti and [p.name for p in dest_dir.iterdir()] == [out.name]


def test_wait_reports_every_poll_and_cancel(server, src):
    c = Client(server.url)
    seen: list[str] = []
    job = c.submit(src, targets="t2")
    done = c.wait(job["id"], poll=0.01, on_progress=lambda j: seen.append(j["status"]))
    assert seen == ["queued", "running", "done"] and done["outputs"]["t2"]["file"] == "case01_t1_t2.nii.gz"
    job2 = c.submit(src, targets="t2")
    assert c.cancel(job2["id"])["status"] == "cancelled"
    assert c.wait(job2["id"], poll=0.01)["status"] == "cancelled"


def test_translate_writes_every_output_and_sidecar(server, src, tmp_path):
    job = Client(server.url).translate(src, tmp_path / "out", targets="t2,flair", seed=0, poll=0.01)
    for t in ("t2", "flair"):
        out = tmp_path / "out" / f"case01_t1_{t}.nii.gz"
        assert out.read_bytes() == server.nifti
        assert json.loads((tmp_path / "out" / f"case01_t1_{t}.json").read_text()) == job["outputs"][t]["sidecar"]
        assert job["written"][t] == {"file": str(out), "sidecar": str(out.with_name(f"case01_t1_{t}.json"))}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case01_t1_flair.json", "case01_t1_flair.nii.gz", "case01_t1_t2.json", "case01_t1_t2.nii.gz"]


def test_translate_raises_the_servers_reason_for_a_failed_job(server, src, tmp_path):
    server.failures[SRC_NAME] = f"{SRC_NAME}: every voxel is 0"
    with pytest.raises(JobFailed) as exc:
        Client(server.url).translate(src, tmp_path / "out", targets="t2", poll=0.01)
    assert str(exc.value) == f"{SRC_NAME}: every voxel is 0" and exc.value.job["status"] == "failed"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ["../escape.nii.gz", "/tmp/abs.nii.gz", ".hidden.nii.gz", "notes.txt"])
def test_translate_refuses_an_output_name_that_is_not_a_plain_file_name(server, src, tmp_path, name):
    server.output_name = name
    with pytest.raises(ServerError, match="unusable output file name"):
        Client(server.url).translate(src, tmp_path / "out", targets="t2", poll=0.01)
    assert not (tmp_path / "escape.nii.gz").exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


# ------------------------------------------------------------------------------ aldm-infer --server

def infer(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "aldm.cli.infer", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=cwd)


def test_cli_writes_the_servers_outputs_and_sidecars(server, src, tmp_path):
    server.token = "tok-123"
    (tmp_path / "token").write_text("  tok-123\n")
    out = tmp_path / "out"
    res = infer(src, "--server", server.url, "--token-file", tmp_path / "token", "--targets", "t2,flair",
                "--out", out, "--seed", 0, "--no-skull-check")
    assert res.returncode == 0, res.stderr
    for t in ("t2", "flair"):
        assert (out / f"case01_t1_{t}.nii.gz").read_bytes() == server.nifti
        side = json.loads((out / f"case01_t1_{t}.json").read_text())
        assert side["target"] == t and side["seed"] == 1234 and side["output"] == f"case01_t1_{t}.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == [
        "case01_t1_flair.json", "case01_t1_flair.nii.gz", "case01_t1_t2.json", "case01_t1_t2.nii.gz"]
    (post,) = server.posts()
    assert post["headers"]["Authorization"] == "Bearer tok-123"
    assert post["body"] == src.read_bytes()
    assert post["query"] == {"name": SRC_NAME, "targets": "t2,flair", "source_modality": "t1", "seed": "0",
                             "intensity": "unit", "naming": "stem", "skull_check": "false"}
    lines = res.stderr.splitlines()
    assert f"warning: {SRC_NAME}: a warning from the server" in lines
    done = [line for line in lines if line.startswith(f"{src} -> ")]
    assert len(done) == 1 and f"{out / 'case01_t1_t2.nii.gz'}" in done[0] and done[0].endswith(" s)")
    # the same command again refuses to overwrite, before uploading anything
    res = infer(src, "--server", server.url, "--token-file", tmp_path / "token", "--targets", "t2,flair",
                "--out", out, "--seed", 0, "--quiet")
    assert res.returncode == 1 and res.stderr.strip().endswith("exists; pass --overwrite to replace it")
    assert len(server.posts()) == 1


def test_cli_next_to_the_source_by_default_and_brasyn_names(server, tmp_path):
    src = write_nifti(tmp_path / "BraTS-GLI-00001-000-t1n.nii.gz", synthetic_volume())
    res = infer(src, "--server", server.url, "--targets", "t2", "--naming", "brasyn", "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" or res.stderr.startswith("warning:")
    # the fake names outputs <stem>_<target> whatever --naming says: the client writes what the server reports
    assert (tmp_path / "BraTS-GLI-00001-000-t1n_t2.nii.gz").read_bytes() == server.nifti
    assert server.posts()[0]["query"]["naming"] == "brasyn"


def test_cli_failed_job_is_one_error_line_exit_1(server, src, tmp_path):
    server.failures[SRC_NAME] = f"{SRC_NAME}: every voxel is 0"
    res = infer(src, "--server", server.url, "--targets", "t2", "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"error: {SRC_NAME}: every voxel is 0"]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_cli_one_failed_source_of_two(server, src, tmp_path):
    other = write_nifti(tmp_path / "case02_t1.nii.gz", synthetic_volume(seed=2))
    server.failures["case02_t1.nii.gz"] = "not a readable NIfTI file"  # a reason without the name
    res = infer(other, src, "--server", server.url, "--targets", "t2", "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 1
    assert [x for x in res.stderr.splitlines() if not x.startswith("warning: ")] == [
        f"error: {other}: not a readable NIfTI file", "error: 1 of 2 source(s) failed"]
    assert (tmp_path / "out" / "case01_t1_t2.nii.gz").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "folder"])
def test_cli_bad_token_file_exit_2(server, src, tmp_path, case):
    token = tmp_path / "token"
    if case == "empty":
        token.write_text(" \n")
    elif case == "folder":
        token.mkdir()
    res = infer(src, "--server", server.url, "--token-file", token, "--targets", "t2", "--out", tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: ") and "token file" in line and str(token) in line
    assert server.seen == []


def test_cli_wrong_token_exit_2_before_any_upload(server, src, tmp_path):
    server.token = "right"
    (tmp_path / "token").write_text("wrong")
    res = infer(src, "--server", server.url, "--token-file", tmp_path / "token", "--targets", "t2",
                "--out", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.splitlines() == ["error: missing or invalid token"]
    assert server.posts() == []


@pytest.mark.parametrize("args,flag", [(["--backend", "ort-cpu"], "--backend"), (["--threads", "2"], "--threads"),
                                       (["--decode-batch", "1"], "--decode-batch"), (["--model", "m"], "--model"),
                                       (["--preview"], "--preview")])
def test_cli_local_only_options_are_usage_errors(server, src, tmp_path, args, flag):
    res = infer(src, "--server", server.url, "--targets", "t2", "--out", tmp_path, *args)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: ") and flag in line and "local run" in line
    assert server.seen == []


def test_cli_options_are_checked_before_uploading(server, src, tmp_path):
    res = infer(src, "--server", server.url, "--targets", "t1,t2", "--out", tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["error: target t1 is the source modality; it is already there"]
    res = infer(src, "--token-file", tmp_path / "x", "--targets", "t2", "--out", tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == ["error: --token-file needs --server URL"]
    assert server.seen == []


def test_cli_unreachable_server_is_one_line_exit_1(src, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the CLI's client retries a refused connection 8 times (0.25 s doubling, 19.75 s in all):
    # shrink the backoff so the test is fast; the retry count itself is what runs
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", (
        "import aldm.client as c, sys; c.BACKOFF_S = c.BACKOFF_CAP_S = 0.001; "
        "from aldm.cli.infer import app; app()"),
        str(src), "--server", f"http://127.0.0.1:{port}", "--targets", "t2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 15
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"error: cannot reach the server at http://127.0.0.1:{port}: connection refused"]


def test_cli_batch_through_the_server(server, tmp_path):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    write_nifti(inp / "a_t1.nii.gz", synthetic_volume(seed=1))
    write_nifti(inp / "sub" / "b.nii.gz", synthetic_volume(seed=2))  # no _t1: a folder, not a BraTS layout
    write_nifti(inp / "c_t1.nii.gz", synthetic_volume(seed=3))
    server.failures["c_t1.nii.gz"] = "c_t1.nii.gz: every voxel is 0"
    out = tmp_path / "out"
    args = ("--batch", inp, "--server", server.url, "--targets", "t2", "--out", out, "--seed", 7, "--quiet")
    res = infer(*args)
    assert res.returncode == 3, res.stderr
    assert "failed: c_t1.nii.gz: c_t1.nii.gz: every voxel is 0" in res.stderr.splitlines()
    assert (out / "a_t1_t2.nii.gz").read_bytes() == server.nifti
    assert (out / "sub" / "b_t2.nii.gz").read_bytes() == server.nifti
    assert (out / "sub" / "b_t2.json").is_file() and not (out / "c_t1_t2.nii.gz").exists()
    report = json.loads((out / "aldm_report.json").read_text())
    status = {c["id"]: c["status"] for c in report["cases"]}
    assert status == {"a_t1.nii.gz": "done", "c_t1.nii.gz": "failed", "sub/b.nii.gz": "done"}
    assert report["summary"]["done"] == 2 and report["summary"]["failed"] == 1 and report["summary"]["finished"]
    assert {p["query"]["name"] for p in server.posts()} == {"a_t1.nii.gz", "b.nii.gz", "c_t1.nii.gz"}
    # a rerun skips the finished cases (outputs match their sidecars and this run's options) and retries c
    del server.failures["c_t1.nii.gz"]
    res = infer(*args)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "aldm_report.json").read_text())
    assert {c["id"]: c["status"] for c in report["cases"]} == {
        "a_t1.nii.gz": "skipped", "c_t1.nii.gz": "done", "sub/b.nii.gz": "skipped"}
    assert len(server.posts()) == 4


# ------------------------------------------------------------------------------ aldm bench-serve

class _FakeTranslator:
    """Stands in for aldm.translator.Translator in the bench: 0.05 s of 'work', a sidecar with a hash."""

    manifest_sha256 = "1" * 64
    calls: list = []

    def __init__(self, pipeline, options):
        self.options, self.pipeline = options, type("P", (), {"backend": "ort-cpu"})()
        _FakeTranslator.calls.clear()

    def run(self, source):
        import types

        _FakeTranslator.calls.append((time.monotonic(), Path(source).name, self.options.targets, self.options.seed))
        time.sleep(0.05)
        self.options.out_dir.mkdir(parents=True, exist_ok=True)
        side = self.options.out_dir / "x_t2.json"
        side.write_text(json.dumps({"output_sha256": "2" * 64}))
        return types.SimpleNamespace(sidecars={"t2": side})


def test_bench_serve_alternates_pairs_and_measures_each_concurrency(server, src, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import aldm.translator
    import aldm.runtime.pipeline
    from aldm.cli.bench_serve_cmd import bench_serve

    monkeypatch.setattr(aldm.translator, "Translator", _FakeTranslator)
    monkeypatch.setattr(aldm.runtime.pipeline.Pipeline, "load", staticmethod(lambda *a, **k: None))
    app = typer.Typer()
    app.command()(bench_serve)
    app.command(name="unused")(lambda: None)  # two commands: bench-serve is invoked by name
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench-serve", server.url, str(src), "--model", str(tmp_path), "--runs", "3",
                                   "--concurrency", "1,2", "--targets", "t2", "--steps", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert len(r["direct_s"]) == len(r["server_s"]) == 3 and r["runs"] == 3
    assert min(r["direct_s"]) >= 0.05  # the direct side is the Translator's run, timed
    assert r["direct_median_s"] == sorted(r["direct_s"])[1] and r["server_median_s"] == sorted(r["server_s"])[1]
    expected = 100 * (r["server_median_s"] - r["direct_median_s"]) / r["direct_median_s"]
    assert r["overhead_pct"] == pytest.approx(expected, rel=1e-2)  # from the unrounded medians
    assert [(c["concurrency"], c["jobs"], len(c["latency_s"])) for c in r["concurrency"]] == [(1, 3, 3), (2, 3, 3)]
    for c in r["concurrency"]:
        lat = sorted(c["latency_s"])
        assert lat[0] <= c["latency_p50_s"] <= c["latency_p95_s"] <= lat[-1]
        assert c["latency_p50_s"] == pytest.approx(lat[1], abs=1e-3)
        assert c["throughput_jobs_per_s"] == pytest.approx(3 / c["wall_s"], rel=1e-2)
    assert r["same_model"] is False  # the fake's sidecars carry another manifest hash: said, not hidden
    assert "different model" in res.output
    # warm-up + 3 pairs + 3 jobs per level, all with the same settings as the direct runs
    posts = server.posts()
    assert len(posts) == 1 + 3 + 2 * 3
    assert {(p["query"]["name"], p["query"]["targets"], p["query"]["seed"], p["query"]["steps"]) for p in posts} == {
        (SRC_NAME, "t2", "0", "2")}
    assert {c[1:] for c in _FakeTranslator.calls} == {(SRC_NAME, ("t2",), 0)} and len(_FakeTranslator.calls) == 4
    # alternating: each direct run (after the warm-up pair) follows a server job, not another direct run
    direct_times = [c[0] for c in _FakeTranslator.calls]
    post_times = sorted(p["t"] for p in posts)[:4]
    for k in range(1, 4):
        assert post_times[k - 1] < direct_times[k] < post_times[k]
    assert "overhead, median of 3 alternating pairs" in res.output
