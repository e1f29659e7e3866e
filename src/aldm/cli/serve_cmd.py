"""`aldm serve`: the warm translation service."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import fail, say


def serve(
    model: Annotated[Optional[Path], typer.Option(help="Exported model folder. Default: the model bundled with aldm.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Default loopback only; any other address needs --token-file.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    backend: Annotated[str, typer.Option(help="auto (TensorRT > ONNX Runtime CUDA > OpenVINO CPU > ONNX Runtime CPU), ort-cpu, ort-cuda, ov-cpu, trt.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for ONNX Runtime or OpenVINO. Default: all cores.")] = None,
    token_file: Annotated[Optional[Path], typer.Option(help="File holding the bearer token every route but /healthz and /readyz then requires. Default: no token (loopback only).")] = None,
    max_queue: Annotated[int, typer.Option(help="Jobs that may wait; more get 429 with Retry-After.")] = 16,
    max_upload_mb: Annotated[int, typer.Option(help="Largest upload accepted (413 above).")] = 512,
    results: Annotated[Path, typer.Option(help="Folder of jobs and results (created; they outlive the process).")] = Path("aldm-results"),
    results_ttl: Annotated[float, typer.Option(help="Seconds a finished job's results are kept.")] = 86400.0,
    max_results_gb: Annotated[float, typer.Option(help="Disk the results may use; the oldest finished jobs are evicted first, never a queued or running one.")] = 20.0,
    min_free_mb: Annotated[int, typer.Option(help="/readyz reports not ready when the results disk has less free space.")] = 1024,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve translations over HTTP: POST /v1/translations (a NIfTI), GET its status and outputs,
    /healthz, /readyz, /metrics (Prometheus). Loads and warms the model once; one worker runs
    jobs one at a time. SIGTERM: new jobs get 503, the running job finishes, then it exits
    (queued jobs are queued again at the next start)."""
    from aldm.errors import require

    try:
        require("fastapi", "serve")
        require("uvicorn", "serve")
        require("prometheus_client", "serve")
    except Exception as exc:  # noqa: BLE001 - an AldmError with the install line
        fail(str(exc), 2)
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file {token_file}: {exc.strerror or exc}", 2)
        if len(token) < 16:
            fail(f"--token-file {token_file}: the token must be at least 16 characters", 2)
    if token is None and not _loopback(host):
        fail(f"--host {host} is reachable from other machines: give --token-file (or bind 127.0.0.1)", 2)
    if min(max_queue, max_upload_mb, port) < 1 or max_results_gb <= 0 or results_ttl <= 0:
        fail("--port, --max-queue, --max-upload-mb, --max-results-gb and --results-ttl must be positive", 2)
    if model is not None and not (model / "manifest.json").is_file():
        fail(f"{model}: not an exported model folder (no manifest.json)", 2)

    import uvicorn

    from aldm.serve.app import create_app
    from aldm.serve.service import Service, Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(model=model, backend=backend, threads=threads, results=results, max_queue=max_queue,
                        max_upload_mb=max_upload_mb, results_ttl_s=results_ttl, max_results_gb=max_results_gb,
                        min_free_mb=min_free_mb, token=token)
    try:
        service = Service(settings)
        recovered = service.start()
    except OSError as exc:
        fail(f"--results {results}: {exc.strerror or exc}", 2)
    if recovered:
        say(f"results {results}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(recovered.items())))
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=30)
    server = DrainingServer(config, service)
    say(f"aldm serve on http://{host}:{port} (results in {results}); /readyz answers 200 once the model is warm")
    server.run()
    say("aldm serve stopped")


class DrainingServer:
    """uvicorn's Server with a drain on the first SIGTERM/SIGINT: new jobs get 503, the running job
    finishes, then the server stops. A second signal stops it at once (the running job is then
    failed at the next start: "server restarted")."""

    def __new__(cls, config, service):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if service.draining:  # second signal: stop now
                    self.should_exit = True
                    self.force_exit = True
                    return
                service.drain()
                if service.running():
                    logging.getLogger("aldm.serve").warning(
                        "stopping: finishing the running job first (signal again to stop now)")
                threading.Thread(target=self._exit_when_idle, daemon=True).start()

            def _exit_when_idle(self):
                while service.running():
                    time.sleep(0.1)
                self.should_exit = True

        return _Server(config)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
