"""Configs are dataclasses; a saved run config is such an instance written out and read back.

CLI flags override fields, and None never overrides a default (as timm's factory drops None kwargs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from kdiqa_edge.errors import ConfigError

C = TypeVar("C")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


def override(cfg: C, **overrides: Any) -> C:
    """A copy of `cfg` with the given fields replaced; None values are ignored."""
    return from_dict(type(cfg), {**to_dict(cfg), **{k: v for k, v in overrides.items() if v is not None}})


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (one clear error if it is missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return data


def resolve(cls: type[C], config_file: str | Path | None = None, **overrides: Any) -> C:
    """Defaults <- config file <- CLI overrides (None never overrides)."""
    cfg = cls()
    if config_file is not None:
        cfg = from_dict(cls, {**to_dict(cfg), **load_file(config_file)})
    return override(cfg, **overrides)


def save(cfg, path: str | Path) -> Path:
    import yaml

    from kdiqa_edge.io import write_text

    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
