"""Configs are dataclasses; a saved run config is such an instance written out and read back.

CLI flags override fields, and None never overrides a default (as timm's factory drops None kwargs). Every
value is checked against its field's annotation as it is read, so a config file's wrong type is one
ConfigError line naming the file, the field and the value, not a TypeError deep in a run.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any, TypeVar

from kdiqa_edge.errors import ConfigError

C = TypeVar("C")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any], source: str | Path | None = None) -> C:
    """`cls(**data)` with every value checked against its field's annotation (an int is taken for a float, a
    list for a tuple, a mapping for a nested config); `source`, the file the values came from, leads any error."""
    try:
        return _build(cls, data, "")
    except _Mismatch as bad:
        raise ConfigError(bad.line(str(source) if source is not None else cls.__name__)) from None
    except _Unknown as bad:
        where = f"{source}: " if source is not None else ""
        raise ConfigError(f"{where}unknown {bad.cls.__name__} field(s): {', '.join(bad.names)}") from None


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
        mark = getattr(exc, "problem_mark", None)  # yaml's: where it broke
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())  # one line, not yaml's four
        raise ConfigError(f"cannot parse config file {path}{where}: {what}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return data


def resolve(cls: type[C], config_file: str | Path | None = None, **overrides: Any) -> C:
    """Defaults <- config file <- CLI overrides (None never overrides)."""
    cfg = cls()
    if config_file is not None:
        cfg = from_dict(cls, {**to_dict(cfg), **load_file(config_file)}, source=config_file)
    return override(cfg, **overrides)


def as_saved(value):
    """A config (or its dict) as its saved file reads back (tuples are lists, other values text): a saved and
    a live config compare."""
    return json.loads(json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else value, default=str))


def save(cfg, path: str | Path) -> Path:
    import yaml

    from kdiqa_edge.io import write_text

    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Type checks against the fields' annotations


class _Mismatch(Exception):
    """A value that its field's annotation does not admit, at `path` (`field`, `field[2]`, `field.sub`)."""

    def __init__(self, path: str, value: Any, hint: Any):
        super().__init__(path)
        self.path, self.value, self.hint = path, value, hint

    def line(self, where: str) -> str:
        expected = _describe(self.hint)
        return f"{where}: {self.path}: {_shown(self.value)} is {_kind(self.value)}, expected {expected}" + \
            _number_hint(self.value, expected)


class _Unknown(Exception):
    def __init__(self, cls: type, names: list[str]):
        super().__init__(cls.__name__)
        self.cls, self.names = cls, names


def _build(cls: type[C], data: dict[str, Any], prefix: str) -> C:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise _Unknown(cls, [f"{prefix}{name}" for name in unknown])
    hints = _field_hints(cls)
    return cls(**{name: _checked(value, hints.get(name, Any), f"{prefix}{name}") for name, value in data.items()})


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The fields' annotations as types (modules use `from __future__ import annotations`); one that does not
    resolve at run time (a TYPE_CHECKING import) admits anything."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - one unresolvable name: resolve the others field by field
        namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
        return {field.name: _resolved(field.type, namespace) for field in dataclasses.fields(cls)}


def _resolved(annotation: Any, namespace: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))
    except Exception:  # noqa: BLE001
        return Any


_SEQUENCES = (list, tuple, set, frozenset)
_UNIONS = (typing.Union, types.UnionType)


def _checked(value: Any, hint: Any, path: str) -> Any:
    """`value` as the field holds it (an int as a float, a list as a tuple, a mapping as a nested config), or a
    _Mismatch."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if hint is Any or isinstance(hint, (TypeVar, str)):
        return value
    if origin in _UNIONS:
        return _checked_union(value, hint, args, path)
    if hint is None or hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(origin, type) and issubclass(origin, _SEQUENCES):
        if isinstance(value, (list, tuple)):
            return _checked_items(value, hint, path)
    elif isinstance(origin, type) and issubclass(origin, dict):
        if isinstance(value, dict):
            key_hint, value_hint = args or (Any, Any)
            for key in value:
                _checked(key, key_hint, f"{path} key")
            return {key: _checked(item, value_hint, f"{path}.{key}") for key, item in value.items()}
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        for member in hint:
            if member.value == value and type(member.value) is type(value):
                return member
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return _build(hint, value, f"{path}.")
    elif isinstance(hint, type) and issubclass(hint, PurePath):
        if isinstance(value, (str, PurePath)):
            return hint(value)
    elif isinstance(origin, type):
        if isinstance(value, origin):
            return value
    else:  # a typing construct not checked here (Callable, Protocol...)
        return value
    raise _Mismatch(path, value, hint)


def _checked_union(value: Any, hint: Any, args: tuple, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:  # Optional[X]: X's own error, which names the item inside a list
        try:
            return _checked(value, arms[0], path)
        except _Mismatch as bad:
            raise _Mismatch(path, value, hint) if bad.path == path else bad from None
    exact = [a for a in arms if a is not float] + [a for a in arms if a is float]  # int | float keeps an int
    for arm in exact:
        try:
            return _checked(value, arm, path)
        except _Mismatch:
            continue
    raise _Mismatch(path, value, hint)


def _checked_items(value: list | tuple, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):  # tuple[int, int]: fixed
        if len(value) != len(args):
            raise _Mismatch(path, value, hint)
        items = [_checked(item, arg, f"{path}[{i}]") for i, (item, arg) in enumerate(zip(value, args))]
    else:
        item_hint = args[0] if args else Any
        items = [_checked(item, item_hint, f"{path}[{i}]") for i, item in enumerate(value)]
    return origin(items)


def _describe(hint: Any) -> str:
    """What a field takes, in a config file's words: 'a number or null', 'a list, each a string'."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin in _UNIONS:
        arms = [a for a in args if a is not type(None)]
        return " or ".join([_describe(a) for a in arms] + (["null"] if len(arms) < len(args) else []))
    if origin is typing.Literal:
        return "one of: " + ", ".join(_shown(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of: " + ", ".join(_shown(m.value) for m in hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return f"a mapping of {hint.__name__} fields"
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path (a string)"
    if isinstance(origin, type) and issubclass(origin, _SEQUENCES):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)}: " + ", ".join(_describe(a) for a in args)
        return f"a list, each {_describe(args[0])}" if args and args[0] is not Any else "a list"
    if isinstance(origin, type) and issubclass(origin, dict):
        return f"a mapping, each value {_describe(args[1])}" if args and args[1] is not Any else "a mapping"
    named = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in named:
        return named[hint]
    return f"a {getattr(hint, '__name__', str(hint))}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for cls, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                      ((list, tuple), "a list"), (dict, "a mapping")):
        if isinstance(value, cls):
            return name
    return f"a {type(value).__name__}"


def _shown(value: Any, limit: int = 60) -> str:
    """The value as a config file spells it (JSON/YAML flow style: "0.05", true, null), on one line."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number_hint(value: Any, expected: str) -> str:
    """Why a number came in as a string: PyYAML reads 1e-4 (no dot) as text, and quotes make any a string."""
    if not isinstance(value, str) or not re.search(r"\b(integer|number)\b", expected):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if re.fullmatch(r"\s*[-+]?\d+[eE][-+]?\d+\s*", value):
        mantissa, _, exponent = value.strip().lower().partition("e")
        return f" (YAML reads {value.strip()} as text: write {mantissa}.0e{exponent})"
    return " (write it without quotes)"
