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


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def require(module: str, extra: str):
    """Import an optional dependency or raise an AldmError naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AldmError(
            f"{module} is not installed; install it with `pip install 'aldm[{extra}]'` ({exc})"
        ) from None
