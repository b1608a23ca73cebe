"""Errors a user can act on. The CLI prints them as one line and exits non-zero.

Anything else is a bug and keeps its traceback (and `KDIQA_DEBUG=1` shows the traceback of these too).
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
