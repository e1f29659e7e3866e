"""Errors the library raises; the CLI prints their message on one line and exits non-zero."""


class AldmError(Exception):
    """Base class of every error aldm raises on purpose."""

    exit_code = 1


class UsageError(AldmError):
    """The caller asked for something that cannot work (bad option, unknown target)."""

    exit_code = 2


class CheckpointError(AldmError):
    """A checkpoint file cannot be read or does not fit the model."""


class InputError(AldmError):
    """An input volume or array is unusable (wrong shape, dtype, NaN, not NIfTI...)."""


class ModelError(AldmError):
    """An exported model folder is missing, corrupted or inconsistent with its manifest."""


class BackendError(AldmError):
    """A runtime backend is unavailable or failed."""


class ServerError(AldmError):
    """An aldm server refused a request, could not be reached, or failed a job. The message is the
    server's one-line `error`; `status` is the HTTP status (None: no HTTP answer, or a job that
    failed after it was accepted). A refused token (401/403) and options the server rejects (422)
    are usage errors: exit 2, as aldm-infer gives for the same options locally."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        if status in (401, 403, 422):
            self.exit_code = 2


class ServerUnreachable(ServerError):
    """No HTTP answer after every retry: connection refused or reset, timeout, DNS."""


class JobFailed(ServerError):
    """A job the server accepted ended failed or cancelled; `job` is its last status document."""

    def __init__(self, message: str, job: dict | None = None):
        super().__init__(message, None)
        self.job = job or {}


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def describe(exc: BaseException) -> str:
    """A failure on one line: aldm's own message, else the exception type and its first line."""
    return one_line(exc) if isinstance(exc, AldmError) else f"{type(exc).__name__}: {one_line(exc)}"


def require(module: str, extra: str, *more: str):
    """Import an optional dependency or raise an AldmError naming the extra(s) that provide it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = " or ".join(f"`pip install 'aldm[{e}]'`" for e in (extra, *more))
        raise AldmError(f"{module} is not installed; install it with {how} ({exc})") from None


def exit_now(code: int) -> None:
    """Leave at once with `code`, flushing stdout/stderr but not unwinding: used after an interrupt,
    where the half-unwound stack still holds the engines and their teardown is not needed.
    Outputs are only ever renamed into place whole, so nothing half-written is left under a
    final name."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass
    os._exit(code)
