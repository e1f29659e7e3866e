"""`aldm serve` as a real process on 127.0.0.1 (a free port), driven over HTTP with the stdlib.

The model is the tiny random-weight export (no ../shared needed): fast jobs, and slow ones on
demand (steps=500) when a test needs a job to be running while it acts."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import synthetic_volume, write_nifti

pytest.importorskip("fastapi", reason="aldm serve needs the serve extra: pip install -e '.[serve]'")

TOKEN = "s3cret-token-for-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, results: Path, *args: str):
        self.model, self.results, self.args = model, results, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = results.parent / f"serve-{self.port}-{uuid.uuid4().hex[:6]}.log"

    def start(self, timeout: float = 60) -> "Server":
        cmd = [sys.executable, "-m", "aldm.cli.main", "serve", "--model", str(self.model), "--port", str(self.port),
               "--results", str(self.results), "--min-free-mb", "1", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if request(self, "GET", "/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            token: str | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def submit(server, data: bytes, token=None, **fields) -> tuple[int, dict, dict]:
    q = "&".join(f"{k}={v}" for k, v in fields.items())
    code, headers, body = request(server, "POST", f"/v1/translations?{q}", data,
                                  {"Content-Type": "application/octet-stream"}, token)
    return code, headers, json.loads(body)


def wait(server, job_id: str, token=None, timeout: float = 120, until=("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _, body = request(server, "GET", f"/v1/translations/{job_id}", token=token)
        assert code == 200, body
        doc = json.loads(body)
        if doc["status"] in until:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {until} in {timeout} s: {doc}")


def wait_running(server, job_id, token=None, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = json.loads(request(server, "GET", f"/v1/translations/{job_id}", token=token)[2])
        if doc["status"] == "running" and doc["step"] >= 1:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran a step: {doc}")


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_nifti(tmp_path_factory.mktemp("src") / "case01_t1.nii.gz", synthetic_volume())


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    s = Server(tiny_export, tmp_path_factory.mktemp("results") / "res").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token_server(tiny_export, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "token").write_text(TOKEN + "\n")
    s = Server(tiny_export, d / "res", "--token-file", str(d / "token"), "--max-upload-mb", "1").start()
    yield s
    s.stop()


# ------------------------------------------------------------------------------ results

def test_a_translation_through_the_server_is_byte_identical_to_aldm_infer(server, source, tiny_export, tmp_path):
    code, headers, doc = submit(server, source.read_bytes(), name=source.name, targets="t2,flair", seed=7)
    assert code == 202 and headers["location"] == doc["url"] == f"/v1/translations/{doc['id']}"
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", doc["id"])
    done = wait(server, doc["id"])
    assert done["status"] == "done" and set(done["outputs"]) == {"t2", "flair"}
    assert done["timings"]["total"] > 0
    local = subprocess.run([sys.executable, "-m", "aldm.cli.infer", str(source), "--model", str(tiny_export),
                            "--targets", "t2,flair", "--seed", "7", "--out", str(tmp_path), "--quiet"],
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    for target in ("t2", "flair"):
        code, headers, data = request(server, "GET", f"/v1/translations/{doc['id']}/{target}")
        assert code == 200 and headers["content-type"] == "application/gzip"
        assert f"case01_t1_{target}.nii.gz" in headers["content-disposition"]
        assert data == (tmp_path / f"case01_t1_{target}.nii.gz").read_bytes()  # data and header, byte for byte
        side, local_side = done["outputs"][target]["sidecar"], json.loads((tmp_path / f"case01_t1_{target}.json").read_text())
        assert side["settings_digest"] == local_side["settings_digest"] and side["seed"] == local_side["seed"]
    # multipart: the file name comes from the part, the options from form fields; same bytes
    boundary = "aldmtestboundary"
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"targets\"\r\n\r\nt2,flair\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n7\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{source.name}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n".encode(), source.read_bytes(), f"\r\n--{boundary}--\r\n".encode()])
    code, _, raw = request(server, "POST", "/v1/translations", body,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert code == 202, raw
    job = json.loads(raw)["id"]
    assert wait(server, job)["status"] == "done"
    assert request(server, "GET", f"/v1/translations/{job}/t2")[2] == (tmp_path / "case01_t1_t2.nii.gz").read_bytes()
    # the client: aldm-infer --server writes the same files a local run writes
    remote = subprocess.run([sys.executable, "-m", "aldm.cli.infer", str(source), "--server", server.url,
                             "--targets", "t2,flair", "--seed", "7", "--out", str(tmp_path / "remote")],
                            capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    for target in ("t2", "flair"):
        name = f"case01_t1_{target}.nii.gz"
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / name).read_bytes()
        assert json.loads((tmp_path / "remote" / f"case01_t1_{target}.json").read_text())["seed"] == \
            json.loads((tmp_path / f"case01_t1_{target}.json").read_text())["seed"]
    # the upload is not kept once the job is done; the results are
    assert not (server.results / job / "input").exists() and (server.results / job / "out").is_dir()


def test_progress_is_reported_and_delete_cancels_a_running_job(server, source):
    code, _, doc = submit(server, source.read_bytes(), name=source.name, targets="t2", steps=500, seed=1)
    assert code == 202
    running = wait_running(server, doc["id"])
    assert running["stage"] == "sample" and running["steps"] == 500 and 1 <= running["step"] < 500
    code, _, body = request(server, "DELETE", f"/v1/translations/{doc['id']}")
    assert code == 200
    final = wait(server, doc["id"], timeout=30)
    assert final["status"] == "cancelled" and final["step"] < 500 and final["outputs"] == {}
    assert not list((server.results / doc["id"]).rglob("*.nii.gz"))
    assert request(server, "GET", f"/v1/translations/{doc['id']}/t2")[0] == 404
    # a finished job's DELETE removes its files
    assert request(server, "DELETE", f"/v1/translations/{doc['id']}")[0] == 200
    assert request(server, "GET", f"/v1/translations/{doc['id']}")[0] == 404
    assert not (server.results / doc["id"]).exists()


# ------------------------------------------------------------------------------ bad requests

def _one_line_error(code_body, code):
    got, _, body = code_body
    assert got == code, body
    doc = json.loads(body)
    assert set(doc) == {"error"} and "\n" not in doc["error"] and "Traceback" not in doc["error"]
    return doc["error"]


@pytest.mark.parametrize("kind,code,message", [
    ("not_nifti", 400, "not a readable NIfTI file"),
    ("truncated_gzip", 400, "corrupt or truncated gzip data"),
    ("unknown_target", 422, "unknown target 't5'"),
    ("target_is_source", 422, "target t1 is the source modality"),
    ("path_name", 400, "is not allowed"),
    ("no_name", 400, "needs a file name"),
    ("bad_steps", 422, "not a valid count"),
    ("bad_field", 422, "unknown field 'evil'"),
    ("not_skull_stripped", 400, "skull"),
])
def test_bad_uploads_get_a_4xx_with_the_reason_and_the_server_keeps_serving(server, source, tmp_path, kind, code, message):
    data, fields = source.read_bytes(), {"name": source.name, "targets": "t2"}
    if kind == "not_nifti":
        data = b"this is not a volume" * 10
    elif kind == "truncated_gzip":
        data = data[: len(data) // 2]
    elif kind == "unknown_target":
        fields["targets"] = "t5"
    elif kind == "target_is_source":
        fields["targets"] = "t1,t2"
    elif kind == "path_name":
        fields["name"] = "..%2F..%2Fetc%2Fcase.nii.gz"
    elif kind == "no_name":
        del fields["name"]
    elif kind == "bad_steps":
        fields["steps"] = 7
    elif kind == "bad_field":
        fields["evil"] = 1
    elif kind == "not_skull_stripped":
        head = synthetic_volume()
        head[head == 0] = 50  # a head with everything non-zero: no background
        data = write_nifti(tmp_path / "head.nii.gz", head).read_bytes()
    q = "&".join(f"{k}={v}" for k, v in fields.items())
    err = _one_line_error(request(server, "POST", f"/v1/translations?{q}", data), code)
    assert message in err
    assert str(server.results) not in err  # no server path leaks into the reason
    assert not list((server.results / ".incoming").iterdir())  # nothing of the upload left
    # still serving
    ok, _, doc = submit(server, source.read_bytes(), name=source.name, targets="t2", seed=0)
    assert ok == 202 and wait(server, doc["id"])["status"] == "done"


def test_job_ids_and_targets_are_validated(server, source):
    assert "not found" in _one_line_error(request(server, "GET", "/v1/translations/..%2F..%2Fetc%2Fpasswd"), 404)
    assert "not a job id" in _one_line_error(request(server, "GET", "/v1/translations/..~etc~passwd"), 400)
    assert "not a job id" in _one_line_error(request(server, "GET", "/v1/translations/abc"), 400)
    assert "no job" in _one_line_error(request(server, "GET", "/v1/translations/" + "A" * 24), 404)
    assert "no job" in _one_line_error(request(server, "DELETE", "/v1/translations/" + "A" * 24), 404)
    _, _, doc = submit(server, source.read_bytes(), name=source.name, targets="t2", seed=0)
    wait(server, doc["id"])
    assert "not found" in _one_line_error(request(server, "GET", f"/v1/translations/{doc['id']}/..%2Fjob.json"), 404)
    assert "unknown target" in _one_line_error(request(server, "GET", f"/v1/translations/{doc['id']}/job.json"), 400)
    assert "no flair output" in _one_line_error(request(server, "GET", f"/v1/translations/{doc['id']}/flair"), 404)
    _one_line_error(request(server, "GET", "/nothing/here"), 404)
    # no CORS: a page on another origin gets no access-control headers, a preflight is not allowed
    for method in ("GET", "OPTIONS"):
        code, headers, _ = request(server, method, "/v1/translations/" + doc["id"],
                                   headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"})
        assert not any(k.startswith("access-control-") for k in headers)
        assert code == (200 if method == "GET" else 405)


def test_token_upload_cap_and_open_probes(token_server, source):
    s = token_server
    assert request(s, "GET", "/healthz")[0] == 200 and request(s, "GET", "/readyz")[0] == 200  # probes: no token
    assert "token" in _one_line_error(request(s, "GET", "/metrics"), 401)
    assert "token" in _one_line_error(request(s, "GET", "/metrics", token="wrong" + TOKEN), 401)
    assert "token" in _one_line_error(request(s, "POST", f"/v1/translations?name={source.name}", source.read_bytes()), 401)
    assert "token" in _one_line_error(request(s, "GET", "/v1/translations/" + "A" * 24,
                                              headers={"Authorization": f"Basic {TOKEN}"}), 401)
    assert request(s, "GET", "/metrics", token=TOKEN)[0] == 200
    # a Content-Length over --max-upload-mb 1 is answered before any of the body is read: send the
    # headers alone (sending the 2 MB too would race the server closing the connection after its 413)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.putrequest("POST", "/v1/translations?name=big.nii.gz")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert "limit" in _one_line_error((r.status, dict(r.headers), r.read()), 413)
    conn.close()

    def chunks():  # no Content-Length: the cap holds while the body streams
        for _ in range(3):
            yield os.urandom(1 << 20)
    req = urllib.request.Request(s.url + "/v1/translations?name=big.nii.gz", data=chunks(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.URLError) as e:  # 413, or the connection closed on the sender
        urllib.request.urlopen(req, timeout=30)
    assert getattr(e.value, "code", 413) == 413
    assert not list((s.results / ".incoming").iterdir())  # what came in was dropped
    code, _, doc = submit(s, source.read_bytes(), token=TOKEN, name=source.name, targets="t2", seed=0)
    assert code == 202 and wait(s, doc["id"], token=TOKEN)["status"] == "done"
    assert request(s, "GET", f"/v1/translations/{doc['id']}/t2")[0] == 401


def test_a_non_loopback_bind_without_a_token_is_refused(tiny_export, tmp_path):
    for host in ("0.0.0.0", "10.1.2.3"):
        r = subprocess.run([sys.executable, "-m", "aldm.cli.main", "serve", "--model", str(tiny_export), "--host", host,
                            "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [f"error: --host {host} is reachable from other machines: "
                                                 "give --token-file (or bind 127.0.0.1)"]
    (tmp_path / "short").write_text("abc")
    r = subprocess.run([sys.executable, "-m", "aldm.cli.main", "serve", "--model", str(tiny_export),
                        "--token-file", str(tmp_path / "short"), "--results", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 16 characters" in r.stderr


# ------------------------------------------------------------------------------ load

def test_forty_submissions_from_eight_clients_against_a_queue_of_four(tiny_export, tmp_path, source):
    s = Server(tiny_export, tmp_path / "res", "--max-queue", "4").start()
    try:
        data = source.read_bytes()

        def client(k):
            seen = []
            for i in range(5):
                code, headers, doc = submit(s, data, name=f"c{k}_{i}_t1.nii.gz", targets="t2", seed=i)
                seen.append((code, headers.get("retry-after"), doc.get("id")))
            return seen

        with cf.ThreadPoolExecutor(8) as pool:
            seen = [x for part in pool.map(client, range(8)) for x in part]
        codes = [c for c, _, _ in seen]
        assert len(codes) == 40 and set(codes) <= {202, 429}, codes
        assert codes.count(429) > 0 and codes.count(202) >= 4
        assert all(ra is not None and int(ra) >= 1 for c, ra, _ in seen if c == 429)
        accepted = [j for c, _, j in seen if c == 202]
        finished = [wait(s, j) for j in accepted]
        assert all(d["status"] == "done" for d in finished)
        spans = sorted((d["started"], d["finished"]) for d in finished)  # one worker: one job at a time
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        text = request(s, "GET", "/metrics")[2].decode()
        route = "/v1/translations"
        assert metric(text, "aldm_http_requests_total", route=route, method="POST", code="202") == codes.count(202)
        assert metric(text, "aldm_http_requests_total", route=route, method="POST", code="429") == codes.count(429)
        assert metric(text, "aldm_jobs_finished_total", state="done") == len(accepted)
        assert metric(text, "aldm_jobs", state="done") == len(accepted)
        assert metric(text, "aldm_queue_depth") == 0
        assert metric(text, "aldm_stage_seconds_count", stage="sample") == len(accepted)
        from aldm.runtime.backends import auto_order
        from aldm.runtime.manifest import ModelDir

        backend = auto_order(ModelDir(tiny_export))[0]  # the server runs `auto`
        assert f'backend="{backend}"' in text and re.search(r'aldm_model_info\{[^}]*model_sha256="[0-9a-f]{64}"', text)
    finally:
        s.stop()


# ------------------------------------------------------------------------------ life cycle

def test_kill_9_mid_job_then_restart_serves_finished_results_and_fails_the_interrupted_job(tiny_export, tmp_path, source):
    s = Server(tiny_export, tmp_path / "res").start()
    data = source.read_bytes()
    _, _, first = submit(s, data, name=source.name, targets="t2", seed=0)
    wait(s, first["id"])
    before = request(s, "GET", f"/v1/translations/{first['id']}/t2")[2]
    _, _, slow = submit(s, data, name="slow_t1.nii.gz", targets="t2,flair", steps=500, seed=0)
    wait_running(s, slow["id"])
    s.stop(signal.SIGKILL)
    s2 = Server(tiny_export, tmp_path / "res").start()
    try:
        assert request(s2, "GET", f"/v1/translations/{first['id']}/t2")[2] == before
        doc = wait(s2, slow["id"])
        assert doc["status"] == "failed" and doc["error"] == "server restarted" and doc["outputs"] == {}
        assert not list((tmp_path / "res" / slow["id"]).rglob("*.nii*"))  # no partial output, no upload left
        assert not list((tmp_path / "res" / slow["id"]).rglob("*.part*"))
    finally:
        s2.stop()


def test_sigterm_finishes_the_running_job_refuses_new_ones_and_resumes_the_queue(tiny_export, tmp_path, source):
    s = Server(tiny_export, tmp_path / "res").start()
    data = source.read_bytes()
    _, _, running = submit(s, data, name="a_t1.nii.gz", targets="t2", steps=200, seed=0)
    _, _, queued = submit(s, data, name="b_t1.nii.gz", targets="t2", seed=0)
    wait_running(s, running["id"])
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code, headers, doc = submit(s, data, name="c_t1.nii.gz", targets="t2")
    if s.proc.poll() is None:  # still draining: new jobs are refused with 503 and Retry-After
        assert code == 503 and "shutting down" in doc["error"] and int(headers["retry-after"]) > 0
        assert request(s, "GET", "/readyz")[0] == 503
    assert s.proc.wait(120) == 0
    assert "aldm serve stopped" in s.log.read_text()
    s2 = Server(tiny_export, tmp_path / "res").start()
    try:
        done = wait(s2, running["id"])
        assert done["status"] == "done" and request(s2, "GET", f"/v1/translations/{running['id']}/t2")[0] == 200
        assert wait(s2, queued["id"])["status"] == "done"  # queued at SIGTERM: run after the restart
    finally:
        s2.stop()


def test_a_second_signal_stops_at_once_and_the_job_fails_on_restart(tiny_export, tmp_path, source):
    s = Server(tiny_export, tmp_path / "res").start()
    _, _, slow = submit(s, source.read_bytes(), name="slow_t1.nii.gz", targets="t2", steps=500, seed=0)
    wait_running(s, slow["id"])
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(30)  # does not wait for the 500 steps
    s2 = Server(tiny_export, tmp_path / "res").start()
    try:
        doc = wait(s2, slow["id"])
        assert doc["status"] == "failed" and doc["error"] == "server restarted" and doc["step"] < 500
    finally:
        s2.stop()


def test_uploads_stream_to_disk_not_into_memory(tiny_export, tmp_path):
    """A 256 MB upload raises the server's peak memory by far less than its size."""
    s = Server(tiny_export, tmp_path / "res").start()
    try:
        def peak_kb():
            status = Path(f"/proc/{s.proc.pid}/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

        before = peak_kb()
        size = 256 << 20

        def body():
            block = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                yield block
        req = urllib.request.Request(s.url + "/v1/translations?name=big.nii", data=body(), method="POST",
                                     headers={"Content-Length": str(size)})
        with pytest.raises(urllib.error.HTTPError) as e:  # zeros are not a NIfTI: 400, after streaming it all
            urllib.request.urlopen(req, timeout=120)
        assert e.value.code == 400
        assert peak_kb() - before < 64 * 1024
        assert not list((s.results / ".incoming").iterdir())
    finally:
        s.stop()


def test_readiness_waits_for_the_warm_model_and_free_disk(tiny_export, tmp_path):
    from aldm.serve.service import Service, Settings

    service = Service(Settings(model=tiny_export, results=tmp_path / "r", min_free_mb=1))
    assert service.ready() == (False, "loading and warming the model")
    service.start()
    assert service.warm.wait(60) and service.ready() == (True, "ready")
    greedy = Service(Settings(model=tiny_export, results=tmp_path / "g", min_free_mb=1 << 40))
    greedy.start()
    assert greedy.warm.wait(60)
    ok, why = greedy.ready()
    assert not ok and "MiB free" in why
    service.drain()
    greedy.drain()
    assert service.ready() == (False, "shutting down")


def test_eviction_keeps_running_and_queued_jobs(tmp_path):
    from aldm.serve.jobs import Job, JobStore, new_id

    store = JobStore(tmp_path, max_queue=8, ttl_s=100, max_bytes=2500)
    jobs = []
    for i, status in enumerate(["done", "done", "failed", "running", "queued", "done"]):
        job = Job(new_id(), f"c{i}.nii.gz", {"targets": ["t2"]}, status=status, created=1000 + i,
                  finished=1000 + i if status in ("done", "failed") else None)
        store.folder(job.id).mkdir()
        (store.folder(job.id) / "out.bin").write_bytes(b"x" * 1000)
        store.jobs[job.id] = job
        store.save(job)
        jobs.append(job)
    evicted = store.sweep(now=1050)  # nothing past the TTL; over 2500 bytes: oldest finished go first
    assert evicted == [jobs[i].id for i in (0, 1, 2, 5)]  # still over the cap, but the rest are unfinished
    assert set(store.jobs) == {jobs[3].id, jobs[4].id} and all(store.folder(j.id).is_dir() for j in jobs[3:5])
    assert not any(store.folder(jobs[i].id).exists() for i in (0, 1, 2, 5))
    late = Job(new_id(), "late.nii.gz", {"targets": ["t2"]}, status="done", created=2000, finished=2000)
    store.folder(late.id).mkdir()
    store.jobs[late.id] = late
    store.max_bytes = 10**9  # room to spare: only the TTL evicts
    assert store.sweep(now=2000 + 50) == [] and store.sweep(now=2000 + 101) == [late.id]


def test_a_batch_through_the_server_writes_what_a_local_batch_writes(server, tiny_export, tmp_path):
    """Two cases with the same file name in different folders: the per-case seed is keyed by the
    case's path inside the input (sent as case_id), not by its file name, on both sides."""
    src = tmp_path / "in"
    for rel in ["a/x_t1.nii.gz", "b/x_t1.nii.gz"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        write_nifti(src / rel, synthetic_volume(seed=0))  # same volume, same name: only the seed differs
    runs = {}
    for side, extra in (("local", ["--model", str(tiny_export)]), ("remote", ["--server", server.url])):
        r = subprocess.run([sys.executable, "-m", "aldm.cli.infer", "--batch", str(src), "--targets", "t2", "--seed", "3",
                            "--out", str(tmp_path / side), "--quiet", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        runs[side] = {p.relative_to(tmp_path / side): p.read_bytes() for p in (tmp_path / side).rglob("*.nii.gz")}
    assert len(runs["local"]) == 2 and runs["local"] == runs["remote"]
    assert runs["local"][Path("a/x_t1_t2.nii.gz")] != runs["local"][Path("b/x_t1_t2.nii.gz")]
