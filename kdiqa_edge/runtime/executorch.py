"""The ExecuTorch backend: a kdiqa-edge .pte (XNNPACK delegate) through ExecuTorch's Python runtime.

executorch and torch are imported when the backend is built (the pip wheel's runtime links libtorch), so
this module imports anywhere numpy does. It registers itself in `kdiqa_edge.runtime.base.BACKENDS`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge import artifact
from kdiqa_edge.errors import CheckpointError, ConfigError, MissingDependency, first_line
from kdiqa_edge.runtime.base import BACKENDS
from kdiqa_edge.runtime.info import ArtifactInfo
from kdiqa_edge.runtime.native import captured_stderr

# What ExecuTorch's C++ runtime prints to stderr on its own (CPU probing, thread pool resets).
_NATIVE_NOISE = ("[cpuinfo_utils.cpp", "[threadpool.cpp")


@contextlib.contextmanager
def _native_stderr():
    """Capture ExecuTorch's runtime log for the block into the yielded list, minus its chatter. Its C++ code
    logs to file descriptor 2 and, through the pybindings, to sys.stderr: both are captured. The lines are
    passed on when the block succeeds and left to the caller (its reason for a failure) when it raises."""
    kept: list[str] = []
    failed = False
    lines: list[str] = []
    try:
        with captured_stderr() as lines:
            try:
                yield kept
            except BaseException:
                failed = True
                raise
    finally:
        kept.extend(line for line in lines if not line.startswith(_NATIVE_NOISE))
        if kept and not failed:
            sys.stderr.write("".join(kept))


def _native_reason(lines: list[str], exc: BaseException) -> str:
    """What the C++ runtime said, in one line ("[XNNCompiler.cpp:1262] Failed to create ...; [method.cpp:128]
    Init failed ..." -> "Failed to create ...; Init failed ..."), else the exception's first line."""
    import re

    said = [re.sub(r"^\[[\w./-]+:\d+\]\s*", "", line.strip()) for line in lines if line.strip()]
    if said:
        return "; ".join(said)[:500]
    return first_line(exc, limit=500, typed=True)


@contextlib.contextmanager
def quiet():
    """executorch warns that its APIs are experimental and torch's pytree logs about enum registration on
    import and lowering: nothing a user can act on (the export side uses this too)."""
    import warnings

    from kdiqa_edge.console import quiet_logger

    with quiet_logger("torch.utils._pytree"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _executorch_runtime():
    """executorch.runtime, torch and the thread pool controls. The pip wheel's runtime links libtorch (its
    pybindings import torch first), so running a .pte from Python needs torch; the phone's runtime does not."""
    try:
        with quiet():
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
    except ImportError as exc:
        raise MissingDependency(f"running a .pte here needs executorch's Python runtime, which needs torch ({exc}); "
                                "install it with: pip install 'kdiqa-edge[android]'") from None
    return Runtime.get(), torch, portable_lib


def _check_program_header(path: Path) -> None:
    """A .pte is a flatbuffer whose file identifier (bytes 4..8) is "ET" and a 2-digit schema version. Check
    it before ExecuTorch does: its loader logs the identifier it found through the pybindings, and bytes that
    are not UTF-8 abort the process (executorch 1.5.1)."""
    import re

    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or not re.fullmatch(rb"ET[0-9]{2}", head[4:8]):
        raise CheckpointError(f"{path}: not an ExecuTorch program (no ETnn file identifier)")


@BACKENDS.register("executorch")
class ExecuTorchBackend:
    """A kdiqa-edge .pte through ExecuTorch's Python runtime: `forward` runs, `kdiqa_edge_meta` (a constant
    method: the kdiqa_edge.* keys as JSON bytes) describes it."""

    name = "executorch"
    device = "cpu"
    max_batch = None

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None):
        if (provider or "cpu").lower() not in ("cpu", "xnnpack", "auto"):
            raise ConfigError(f"a .pte runs on the CPU (XNNPACK) here; --provider {provider} does not apply")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        _check_program_header(path)
        runtime, self._torch, self._threadpool = _executorch_runtime()
        self.threads = int(threads) if threads else None
        native: list[str] = []
        try:
            with _native_stderr() as native:
                self.program = runtime.load_program(path)  # the methods live as long as their program
        except Exception as exc:  # noqa: BLE001 - the pybindings raise RuntimeError, ValueError...
            raise CheckpointError(f"{path}: ExecuTorch cannot load it ({_native_reason(native, exc)})") from None
        self.info = ArtifactInfo.from_meta(path, self._read_meta(path), "executorch")
        if "forward" not in self.program.method_names:
            raise CheckpointError(f"{path}: the program has no `forward` method")
        try:
            with _native_stderr() as native:  # the thread pool's first use probes the CPU, verbosely
                self._set_threads()
                self.forward = self.program.load_method("forward")
        except Exception as exc:  # noqa: BLE001 - a delegate or kernel this runtime lacks
            raise CheckpointError(f"{path}: ExecuTorch cannot load its forward method "
                                  f"({_native_reason(native, exc)})") from None
        self.fixed_batch = int(self.forward.metadata.input_tensor_meta(0).sizes()[0])

    def _read_meta(self, path: Path) -> dict[str, Any]:
        if artifact.PTE_META_METHOD not in self.program.method_names:
            raise CheckpointError(f"{path}: an ExecuTorch program without kdiqa_edge metadata (no "
                                  f"{artifact.PTE_META_METHOD} method): not a kdiqa-edge export; export it with "
                                  "`kdiqa-edge export --target executorch`")
        try:
            with _native_stderr():
                blob = self.program.load_method(artifact.PTE_META_METHOD).execute([])[0]
            props = json.loads(bytes(blob.numpy().astype(np.uint8)).decode("utf-8"))
        except Exception:  # noqa: BLE001 - anything but our JSON bytes is a foreign or corrupt program
            raise CheckpointError(f"{path}: corrupt {artifact.PTE_META_METHOD} metadata") from None
        return artifact.decode(props) if isinstance(props, dict) else {}

    def _set_threads(self) -> None:
        """ExecuTorch has one process-wide thread pool: size it for this model (a reset between runs only)."""
        if self.threads and self._threadpool._threadpool_get_thread_count() != self.threads:
            with _native_stderr():  # a reset logs itself
                self._threadpool._unsafe_reset_threadpool(self.threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        self._set_threads()
        # a writable array: torch.from_numpy warns of a read-only one (a decoded image, a memory map, a caller's)
        out = self.forward.execute([self._torch.from_numpy(np.require(x, requirements=("C", "W")))])
        return out[0].numpy().astype(np.float32).reshape(-1)

    def synchronize(self) -> None:
        pass  # execute returns host tensors
