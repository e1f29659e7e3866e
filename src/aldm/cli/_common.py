"""What every command shares: one-line errors with exit codes, stderr status, comma lists."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer

from aldm.errors import AldmError, exit_now
from aldm.export.torch_backend import register as _register_torch_backend

_register_torch_backend()  # --backend torch (PyTorch itself is imported only when it is chosen)


def say(msg: str) -> None:
    typer.echo(msg, err=True)


def fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Library errors become `error: <message>` on stderr and the error's exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AldmError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            exit_now(130)
        except MemoryError:
            fail("out of memory (try fewer targets, a smaller --decode-batch or another backend)")
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))

    return wrapper


def ignore_file_size_signal() -> None:
    """A write past a file-size limit (ulimit -f) then fails with EFBIG, which aldm reports as
    a one-line error with nothing partial left, instead of SIGXFSZ killing the process."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_triple(value: str, what: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in split_list(value))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise typer.BadParameter(f"{what} must be three integers like 144,192,144")
    return parts  # type: ignore[return-value]


def stdout_is_tty() -> bool:
    return sys.stderr.isatty()
