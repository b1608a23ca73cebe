"""The one small protocol every inference backend follows, and the backend registry.

A backend takes the model's input array (already in the artifact's dtype and layout) and returns the scores
[N] as float32 numpy. One module per runtime (`backends.py`: ONNX Runtime, TensorRT, CoreML, torch;
`executorch.py`; `openvino.py`) registers its backend here under the artifact kind `backend_kind` names, and
imports no sibling; `kdiqa_edge.runtime` imports them all, so whoever imports anything under
`kdiqa_edge.runtime` finds every backend registered. Runtimes are imported when their backend is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from kdiqa_edge.errors import CheckpointError, ConfigError
from kdiqa_edge.registry import Registry
from kdiqa_edge.runtime.info import ArtifactInfo


class Backend(Protocol):
    name: str  # onnxruntime | tensorrt | coreml | executorch | openvino | torch
    device: str  # cpu | cuda | ane/gpu (coreml)
    info: ArtifactInfo
    fixed_batch: int | None  # the only batch size the artifact accepts, None when dynamic
    max_batch: int | None  # the largest batch a dynamic artifact accepts (TensorRT profile), None: any

    def run(self, x: np.ndarray) -> np.ndarray:
        """Model input [N, ...] -> scores float32 [N]."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op for backends whose run() already returns host arrays)."""


BACKENDS: Registry[Callable[..., Backend]] = Registry("runtime backend")

# What a backend runs, by suffix: an export's other files (an OpenVINO .bin, a timing cache, logs) are not models.
ARTIFACT_SUFFIXES = (".onnx", ".engine", ".plan", ".trt", ".mlpackage", ".mlmodel", ".pte", ".xml")


def export_artifacts(out: Path) -> list[Path]:
    """The runnable artifacts of an export OUT folder: the files its manifest.json lists for its exports (they
    live in OUT/<target>-<precision>/), else (a manifest unreadable or listing none) those in OUT's subfolders."""
    try:
        exports = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("exports") or {}
        listed = [out / file["path"] for entry in exports.values() for file in (entry or {}).get("files") or []]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # a manifest torn or not ours
        listed = []
    found = {p for p in listed if p.suffix.lower() in ARTIFACT_SUFFIXES and p.exists()}
    if not found:
        folders = [out, *(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))]
        found = {p for folder in folders for p in folder.iterdir()
                 if p.suffix.lower() in ARTIFACT_SUFFIXES}
    return sorted(found)


def backend_kind(path: str | Path) -> str:
    """Which backend reads this path: by suffix for files, by content for directories."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    if suffix in (".mlpackage", ".mlmodel"):
        return "coreml"
    if suffix == ".pte":
        return "executorch"
    if suffix == ".xml":
        return "openvino"
    if path.is_dir():
        if (path / "model.json").is_file() or (path / "checkpoints").is_dir():
            return "torch"
        if (path / "manifest.json").is_file():
            found = export_artifacts(path)
            if not found:
                raise ConfigError(f"{path} is an export directory without an artifact (no export in it "
                                  "succeeded); pass an artifact, a checkpoint dir or a run dir")
            raise ConfigError(f"{path} is an export directory; pass one of its artifacts: "
                              f"{', '.join(str(p) for p in found)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: not a model (expected .onnx, .engine/.plan, .mlpackage, .pte, .xml, a checkpoint dir or a run dir)")


def load_backend(path: str | Path, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None, stop_spinning: bool = False) -> Backend:
    if not Path(path).exists():  # before any runtime sees it: theirs say "[ONNXRuntimeError] : 3 : NO_SUCHFILE"
        raise CheckpointError(f"no such file: {path}")
    kind = backend_kind(path)
    options = {"spinning": spinning, "stop_spinning": stop_spinning} if kind == "onnx" else {}
    return BACKENDS.get(kind)(Path(path), provider=provider, threads=threads, **options)
