"""The HTTP API of `aldm serve` (FastAPI). Every error is JSON `{"error": "<one line>"}`."""

from __future__ import annotations

import hmac
import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aldm.errors import AldmError, InputError, UsageError
from aldm.nifti import sidecar_path
from aldm.serve.jobs import Job, check_name, new_id, reason, valid_id
from aldm.serve.service import Service, parse_options

OPEN_ROUTES = ("/healthz", "/readyz")  # probes answer without a token
CHUNK = 1 << 20


class BodyTooLarge(Exception):
    pass


def error(code: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def route_of(path: str) -> str:
    """The route template of a path (bounded label values for the request counter)."""
    if path in ("/healthz", "/readyz", "/metrics", "/v1/translations"):
        return path
    if path.startswith("/v1/translations/"):
        parts = path[len("/v1/translations/"):].split("/")
        return {1: "/v1/translations/{id}", 2: "/v1/translations/{id}/{target}"}.get(len(parts), "other")
    return "other"


class Guard:
    """Pure ASGI middleware: token check, upload cap (413 from Content-Length or while the body
    streams) and the request counter (route template, method, status code)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        token = service.settings.token
        self.token = token.encode() if token else None
        self.cap = service.settings.max_upload_mb << 20

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.token is not None and path not in OPEN_ROUTES and not self._authorised(scope):
                return await error(401, "missing or wrong token (send Authorization: Bearer <token>)")(
                    scope, receive, counting_send)
            if method == "POST":
                length = _header(scope, b"content-length")
                if length is not None and (not length.isdigit() or int(length) > self.cap):
                    return await error(413, f"upload over the {self.service.settings.max_upload_mb} MB "
                                            "limit (--max-upload-mb)")(scope, receive, counting_send)
                seen = {"n": 0}

                async def capped_receive():
                    message = await receive()
                    if message["type"] == "http.request":
                        seen["n"] += len(message.get("body", b""))
                        if seen["n"] > self.cap:
                            raise BodyTooLarge
                    return message

                return await self.app(scope, capped_receive, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            self.service.metrics.requests.labels(route_of(path), method, str(status["code"])).inc()

    def _authorised(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        # constant time in the token's content; a wrong scheme fails the same comparison
        return hmac.compare_digest(token.strip().encode() if scheme.lower() == "bearer" else b"\0", self.token)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="aldm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, service=service)  # no CORS middleware: browsers on other origins get nothing
    store = service.store

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        detail = str(exc.detail).splitlines()[0] if str(exc.detail) else "error"
        return error(exc.status_code, "not found" if exc.status_code == 404 else detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        return error(400, f"bad request: {first.get('msg', 'invalid input')}")

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error(500, f"internal error: {reason(exc)}")

    def view(job: Job) -> dict[str, Any]:
        doc = {"id": job.id, "status": job.status, "name": job.name, "targets": job.options["targets"],
               "options": job.options, "stage": job.stage if job.status == "running" else None,
               "step": job.step, "steps": job.steps,
               "queue_position": store.position(job.id) if job.status == "queued" else None,
               "created": job.created, "started": job.started, "finished": job.finished,
               "timings": job.timings, "warnings": job.warnings, "error": job.error,
               "url": f"/v1/translations/{job.id}", "outputs": {}}
        if job.cancel and job.status == "running":
            doc["cancel_requested"] = True  # it stops at its next sampling step
        if job.status == "done":
            out = store.out_dir(job)
            for target, fname in job.outputs.items():
                side = sidecar_path(out / fname)
                doc["outputs"][target] = {
                    "file": fname, "url": f"/v1/translations/{job.id}/{target}",
                    "sidecar": json.loads(side.read_text()) if side.is_file() else None}
        return doc

    def find(job_id: str) -> Job | JSONResponse:
        if not valid_id(job_id):
            return error(400, "not a job id")
        job = store.jobs.get(job_id)
        return job if job is not None else error(404, f"no job {job_id}")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        ok, why = service.ready()
        return {"status": "ready"} if ok else JSONResponse({"status": "not ready", "error": why}, 503)

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        service.update_gauges()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/translations", status_code=202)
    async def submit(request: Request):
        if service.draining:
            return error(503, "shutting down: not accepting jobs", retry_after=30)
        ok, why = service.ready()
        if not ok:
            return error(503, f"not ready: {why}", retry_after=5)
        if store.queue_full():
            return error(429, f"queue full ({store.max_queue} jobs waiting)", retry_after=service.retry_after())
        job_id = new_id()
        incoming = store.incoming / job_id
        incoming.mkdir(parents=True)
        try:
            return await _receive(request, job_id, incoming)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    async def _receive(request: Request, job_id: str, incoming: Path):
        upload = incoming / "upload"
        fields = dict(request.query_params)
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form(max_files=1, max_fields=20)
                part = form.get("file")
                if not isinstance(part, UploadFile):
                    return error(400, "a multipart upload needs a 'file' part holding the NIfTI")
                fields |= {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
                fields.setdefault("name", part.filename)
                await run_in_threadpool(_copy, part.file, upload)
                await part.close()
            else:
                with open(upload, "wb") as f:
                    async for chunk in request.stream():
                        f.write(chunk)
        except BodyTooLarge:
            return error(413, f"upload over the {service.settings.max_upload_mb} MB limit (--max-upload-mb)")
        except ClientDisconnect:
            return error(400, "the client disconnected during the upload")
        given = fields.pop("name", None)
        try:
            name = check_name(given)
            options = parse_options(fields)
            service.translator(options)  # the same checks aldm-infer makes before any compute
            source = incoming / name
            upload.rename(source)
            await run_in_threadpool(_validate, service, source, options)
        except AldmError as exc:  # options aldm-infer would refuse (exit 2): 422; a bad upload: 400
            return error(422 if isinstance(exc, UsageError) else 400,
                         reason(exc, (incoming / str(given), str(given)), (incoming, ".")))
        job = Job(job_id, name, options)
        folder = store.folder(job_id)
        (folder / "input").mkdir(parents=True)
        source.rename(store.input_path(job))
        position = store.add(job)
        if position is None:
            shutil.rmtree(folder, ignore_errors=True)
            return error(429, f"queue full ({store.max_queue} jobs waiting)", retry_after=service.retry_after())
        service.update_gauges()
        url = f"/v1/translations/{job_id}"
        return JSONResponse({"id": job_id, "status": "queued", "url": url, "queue_position": position},
                            status_code=202, headers={"Location": url})

    @app.get("/v1/translations/{job_id}")
    def status(job_id: str):
        job = find(job_id)
        return job if isinstance(job, JSONResponse) else view(job)

    @app.delete("/v1/translations/{job_id}")
    def cancel(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        store.cancel(job_id)
        doc = view(job)
        if job.status in ("done", "failed", "cancelled") and job_id not in store.jobs:
            doc["deleted"] = True
            doc["outputs"] = {}
        return doc

    @app.get("/v1/translations/{job_id}/{target}")
    def output(job_id: str, target: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        if target not in ("t1", "t1ce", "t2", "flair"):
            return error(400, f"unknown target {target[:20]!r}")
        if job.status != "done":
            return error(404, f"job {job_id} is {job.status}, not done")
        fname = job.outputs.get(target)
        if fname is None:
            return error(404, f"job {job_id} has no {target} output")
        path = store.out_dir(job) / fname
        if not path.is_file():
            return error(404, f"the {target} output of job {job_id} is gone")
        return FileResponse(path, media_type="application/gzip" if fname.endswith(".gz") else
                            "application/octet-stream", filename=fname)

    return app


def _copy(src, dst: Path) -> None:
    src.seek(0)
    with open(dst, "wb") as f:
        shutil.copyfileobj(src, f, CHUNK)


def _validate(service: Service, source: Path, options: dict[str, Any]) -> None:
    """Read the upload as aldm-infer reads a source (header, data, skull check): a bad file is a
    400 now, not a failed job later."""
    from aldm.nifti import load_volume
    from aldm.skullcheck import skull_reason

    kw = {"max_voxels": service.settings.max_voxels} if service.settings.max_voxels else {}
    vol = load_volume(source, **kw)
    if options["skull_check"]:
        why = skull_reason(vol.data)
        if why is not None:
            raise InputError(f"{source}: {why}")
