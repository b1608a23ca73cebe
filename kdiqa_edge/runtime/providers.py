"""Which ONNX Runtime execution provider a session runs on: the names the CLI takes, the best available
one, the CUDA libraries loaded first, and sessions opened without onnxruntime's own output (its reason for a
provider that does not start comes back in one line). Imports anywhere numpy does; onnxruntime is imported
by the functions that need it."""

from __future__ import annotations

import re
import sys

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.runtime.native import captured_stderr

# Short names the CLI accepts for onnxruntime execution providers.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# "Best available" never picks the TensorRT provider on its own: it builds an engine on first run
# (minutes on a Jetson), which a user must ask for.
_AUTO_ORDER = ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")
BEST_AVAILABLE = (None, "", "auto")  # --provider values that ask for the best available one


# Providers that load the CUDA libraries (cuBLAS, cuDNN, ...) when a session starts.
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_preloaded = False


def preload_cuda_libraries(provider: str) -> None:
    """Before a session on `provider` (a full name) that needs CUDA, load the CUDA and cuDNN libraries of pip's
    nvidia-* wheels, as `onnxruntime.preload_dlls()` does (onnxruntime-gpu >= 1.21): without it the CUDA
    provider finds them only on LD_LIBRARY_PATH, or when torch was imported first. Once per process; what it
    prints about a library it cannot find is held back (a provider that then fails to start is reported on
    its own)."""
    global _preloaded
    if provider not in _CUDA_PROVIDERS or _preloaded or "torch" in sys.modules:
        return  # no CUDA session, done already, or importing torch has loaded its CUDA libraries
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):  # onnxruntime before 1.21
        return
    _preloaded = True
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()


# A line of onnxruntime's default logger, colour codes removed: "2026-12-01 18:14:29.31 [E:onnxruntime:Default,
# provider_bridge_ort.cc:2458 operator()] message"
_ORT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ \[([VIWEF]):onnxruntime:[^\]]*\] ?(.*)$")
_ANSI = re.compile(r"\x1b\[[\d;]*m")


def _split_ort_log(lines: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(level, message) of onnxruntime's log lines, and every other line as it was."""
    logged, other = [], []
    for line in lines:
        plain = _ANSI.sub("", line).strip()
        found = _ORT_LOG_LINE.match(plain)
        if found:
            logged.append((found.group(1), found.group(2)))
        elif plain:
            other.append(line)
    return logged, other


def provider_reason(logged: list[tuple[str, str]], warned: list[str], error: BaseException | None) -> str | None:
    """Why a provider did not start, in one line, from what onnxruntime logged ("Failed to load library
    libonnxruntime_providers_cuda.so with error: libcuda.so.1: cannot open shared object file: ..."), warned or
    raised; None when it said nothing."""
    said = [m for level, m in logged if level in "EF"] or [m for _, m in logged] or warned
    if not said and error is not None:
        said = [str(error)]
    if not said or not said[0].strip():
        return None
    text = said[0].strip().splitlines()[0].split("[ONNXRuntimeError] : ")[-1]
    text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text)  # onnxruntime's status code and name
    text = re.sub(r"(?:/[^\s/:]+)+/([^\s/:]+)", r"\1", text)  # paths to file names
    return text.split(" ; ")[0].strip()[:240]


def open_session(model, options, providers: list[str]):
    """An onnxruntime InferenceSession on `providers`, best first (CPU last), and why the first did not start
    (None when it did): `(session, reason)`. An accelerator provider that cannot start makes onnxruntime print
    its own lines, colour-coded to stderr, and with its fallback on also to stdout (into `score --csv`
    output); they are held back here and the reason taken from them. onnxruntime's fallback is off: where
    opening on `providers` raises, this opens on the ones after the first itself."""
    import warnings

    import onnxruntime as ort

    if providers[0] == "CPUExecutionProvider":
        return ort.InferenceSession(model, options, providers=providers, enable_fallback=0), None
    attempts = [providers, providers[1:]] if len(providers) > 1 else [providers]
    session, error = None, None
    with captured_stderr() as lines, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for attempt in attempts:
            try:
                session = ort.InferenceSession(model, options, providers=attempt, enable_fallback=0)
                break
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError, Fail, InvalidGraph...
                error = exc
    logged, other = _split_ort_log(lines)
    if other:  # not onnxruntime's: someone else's output, passed on
        sys.stderr.write("".join(other))
    about = []  # onnxruntime's warnings about the provider ("Specified provider 'X' is not..."); others passed on
    for w in warned:
        if providers[0] in str(w.message):
            about.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if session is None:
        raise error
    if session.get_providers()[0] == providers[0]:
        return session, None
    return session, provider_reason(logged, about, error) or "no reason given"


# The onnxruntime builds on PyPI: each installs the same `onnxruntime` package, so two of them overwrite
# each other's files (the CUDA provider vanishes when the CPU build is installed, or upgraded, after the GPU one)
_PROVIDER_BUILDS = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu",
                    "DmlExecutionProvider": "onnxruntime-directml", "OpenVINOExecutionProvider": "onnxruntime-openvino",
                    "ROCMExecutionProvider": "onnxruntime-rocm"}
_ORT_BUILDS = ("onnxruntime", *dict.fromkeys(_PROVIDER_BUILDS.values()))


def onnxruntime_builds() -> list[str]:
    """The onnxruntime distributions installed (more than one is a clash)."""
    from importlib import metadata

    found = []
    for name in _ORT_BUILDS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def build_clash(provider: str) -> str | None:
    """Why `provider` (a full name, missing from the onnxruntime imported) may be missing: the build that has
    it is installed beside another, and the other's files won. None when that is not the case."""
    builds, build = onnxruntime_builds(), _PROVIDER_BUILDS.get(provider)
    if build not in builds or len(builds) < 2:
        return None
    others = " and ".join(b for b in builds if b != build)
    return (f"{build} is installed, but so is {others}, and they share one Python package whose files are now "
            f"the other build's: keep one (pip uninstall -y {' '.join(builds)} && pip install {build})")


def resolve_providers(provider: str | None, available: list[str]) -> list[str]:
    """Explicit provider (short or full name) first with CPU as the fallback, else the best available."""
    if provider in BEST_AVAILABLE:
        return [p for p in _AUTO_ORDER if p in available] or available[:1]
    full = PROVIDERS.get(provider.lower(), provider)
    if full not in available:
        clash = build_clash(full)
        raise ConfigError(f"execution provider {provider!r} is not available in this onnxruntime "
                          f"(available: {', '.join(available)})" + (f"; {clash}" if clash else ""))
    # TensorRT falls back per node to CUDA where CUDA is there, then to the CPU
    fallback = [p for p in ("CUDAExecutionProvider",) if full == "TensorrtExecutionProvider" and p in available]
    return [full, *fallback] + (["CPUExecutionProvider"] if full != "CPUExecutionProvider" else [])


PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                     "CoreMLExecutionProvider": "coreml"}
