"""Errors a user can act on. The CLI prints them as one line and exits non-zero.

An OSError that names a path (a folder not writable, a file where a folder must be) or a full disk is the
machine's answer, also one line (`cli.main`). Anything else is a bug and keeps its traceback (and
`KDIQA_DEBUG=1` shows the traceback of these too).
"""


class KdiqaError(Exception):
    """A known, user-facing error: its message is the whole story."""

    exit_code = 2


class DataError(KdiqaError):
    """A dataset that cannot be used as given (missing root, score file, no usable image...)."""


class ConfigError(KdiqaError):
    """A bad option, config file or combination of options."""


class CheckpointError(KdiqaError):
    """A missing, foreign or corrupt checkpoint / run dir / artifact."""


class WeightsUnavailable(KdiqaError):
    """Pretrained weights are neither cached locally nor downloadable (offline machine)."""


class ExportError(KdiqaError):
    """An export that cannot be produced or failed its parity check."""


class MissingDependency(KdiqaError):
    """An optional package needed for this path is not installed."""

    exit_code = 3


class TensorRTUnavailable(MissingDependency):
    """tensorrt does not import here: the TensorRT-ready ONNX and the trtexec line were written instead."""

    exit_code = 4


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-line error naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(
            f"{module} is not installed ({exc}); install it with: pip install 'kdiqa-edge[{extra}]'"
        ) from exc


def first_line(exc: BaseException, limit: int = 200, typed: bool = False) -> str:
    """An exception as one line for a report: the first non-blank line of its message, cut at `limit`
    characters, led by its type's name when `typed` ('OSError: ...'); its type's name alone when it says
    nothing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0][:limit]}" if typed else lines[0][:limit]
