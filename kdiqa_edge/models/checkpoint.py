"""Checkpoints: a directory with `model.safetensors` (weights + head buffers) and `model.json`.

The format is shared by every IQA model (teacher, student). Each kind registers a builder that turns
(model.json, state dict) back into a module, so `load_checkpoint` never unpickles code: weights come
from safetensors only, and the metadata is plain JSON.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import CheckpointError
from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json
from kdiqa_edge.registry import Registry

FORMAT = "kdiqa-edge/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"

# kind -> builder(meta, state_dict) -> nn.Module. A kind's module registers its builder on import.
CHECKPOINT_BUILDERS: Registry[Callable[[dict, dict], Any]] = Registry("checkpoint kind")
# Where each known kind's builder lives, imported on demand so this module stays light.
_KIND_MODULES = {"teacher": "kdiqa_edge.models.teacher", "student": "kdiqa_edge.models.student"}


def register_checkpoint_kind(kind: str):
    """Decorator: `@register_checkpoint_kind("student") def build(meta, state_dict) -> nn.Module`."""
    return CHECKPOINT_BUILDERS.register(kind)


def content_hash(state_dict) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes (independent of the file container)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return digest.hexdigest()


def _weights(model) -> dict:
    # Shared storage is not allowed by safetensors; every saved tensor is its own contiguous copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def model_meta(model) -> dict:
    """model.json fields common to every kind, from the model's interface."""
    head_meta = model.head.meta() if hasattr(model.head, "meta") else {"head": "regression"}
    return {
        "format": FORMAT,
        "kind": model.kind,
        **model.checkpoint_meta(),
        **head_meta,
        "preprocess": model.preprocess.to_dict(),
    }


def save_checkpoint(model, directory: str | Path, extra_meta: dict | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `directory/{model.safetensors, model.json}` atomically; returns the directory.

    The model provides `kind`, `checkpoint_meta()` (arch, embed_dim, pretrained, how to rebuild it),
    `head` and `preprocess`. `extra_meta` (epoch, metrics, dataset...) is stored alongside, and
    `extra_files` (name -> bytes, e.g. the trainer's resume state) in the same directory, so that all of
    it appears at once. The same weights and metadata give the same bytes.
    """
    weights = _weights(model)
    meta = {**model_meta(model), **(extra_meta or {}), "content_hash": content_hash(weights)}
    directory = Path(directory)
    sweep_temporaries(directory.parent)  # what a write killed mid-way left (never a live writer's)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        save_safetensors(weights, tmp / WEIGHTS_FILE, {"format": FORMAT, "kind": meta["kind"]})
        write_json(tmp / META_FILE, meta)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return directory


def save_safetensors(weights: dict, path: Path, metadata: dict[str, str]) -> Path:
    """safetensors' save_file, then its metadata sorted (`sort_safetensors_metadata`)."""
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata=metadata)
    return sort_safetensors_metadata(path)


def sort_safetensors_metadata(path: Path) -> Path:
    """Rewrite a .safetensors header in place with its metadata in sorted key order.

    safetensors (0.8) keeps the metadata in a Rust HashMap, whose order is seeded per process: the same
    tensors and metadata came out in different bytes from two processes (a killed-and-resumed run and an
    uninterrupted one). The tensors' entries are already in a fixed order; the sorted header has the same
    length, so the file becomes a function of its content.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        metadata = dict(sorted(header.pop("__metadata__", {}).items()))
        canonical = json.dumps({"__metadata__": metadata, **header} if metadata else header,
                               separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:  # safetensors writes compact JSON: a reorder never grows it
            raise CheckpointError(f"{path}: unexpected safetensors header ({len(canonical)} > {length} bytes)")
        handle.seek(8)
        handle.write(canonical.ljust(length, b" "))  # the format pads its header with spaces
    return path


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file (its header is JSON; no framework needed)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)).get("__metadata__", {})


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir as given, or a run dir's `checkpoints/best` (else `checkpoints/last`)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for candidate in (path / "checkpoints" / "best", path / "checkpoints" / "last"):
        if (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is neither a checkpoint dir (no {META_FILE}) nor a run dir (no checkpoints/best)")


def read_meta(path: str | Path) -> dict:
    directory = resolve_checkpoint_dir(path)
    try:
        meta = read_json(directory / META_FILE)
    except ValueError as exc:
        raise CheckpointError(f"corrupt {directory / META_FILE}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a kdiqa-edge checkpoint (format {meta.get('format')!r})")
    return meta


def load_state_dict(directory: Path, verify: bool = True) -> dict:
    """The weights of a checkpoint dir, safetensors only (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {weights_path}: {exc}") from None
    if verify:
        expected = read_json(directory / META_FILE).get("content_hash")
        if expected and content_hash(state_dict) != expected:
            raise CheckpointError(f"{weights_path} does not match the content hash in {META_FILE} (corrupt or edited)")
    return state_dict


def load_checkpoint(path: str | Path, device: str = "cpu", verify: bool = True):
    """Rebuild a model (eval mode) from a checkpoint dir or a run dir. `model.meta` holds its model.json."""
    directory = resolve_checkpoint_dir(path)
    meta = read_meta(directory)
    kind = meta.get("kind")
    if kind not in CHECKPOINT_BUILDERS and kind in _KIND_MODULES:
        try:
            importlib.import_module(_KIND_MODULES[kind])
        except ModuleNotFoundError as exc:
            raise CheckpointError(f"cannot load a {kind!r} checkpoint: {exc}") from None
    if kind not in CHECKPOINT_BUILDERS:
        raise CheckpointError(f"{directory}: unknown checkpoint kind {kind!r}")
    model = CHECKPOINT_BUILDERS.get(kind)(meta, load_state_dict(directory, verify=verify))
    model.meta = meta
    model.checkpoint_dir = directory
    return model.to(device).eval()
