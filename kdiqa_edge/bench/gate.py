"""The release gate: bounds a model must hold to ship, for `bench` and for `export --precision auto`'s pick.

    --fail-under srcc=0.85,plcc=0.85   SRCC and PLCC on the eval split at least these
    --max-drift 0.01                   |ΔSRCC| against the reference at most this
    --max-latency-ms 5                 p50 latency at batch 1 at most this
    --max-size-mb 10                   the artifact's size (with its companion files) at most this

`Gate.check(rows)` judges each row's `Figures`: one `Violation` per bound a row breaks. A figure that was not
measured breaks its bound too (a CI cannot ship what it could not check), and a row that failed to load or run
breaks the gate once, with its reason. Torch-free, and free of the bench and export modules: both build
`Figures` from what they measured and call this.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from kdiqa_edge.errors import ConfigError

FLOORS = ("srcc", "plcc")  # the metrics --fail-under takes


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one model measured, as the gate reads it; None where it was not measured."""

    name: str  # the row
    srcc: float | None = None  # on the eval split, against the MOS
    plcc: float | None = None
    delta_srcc: float | None = None  # SRCC minus the reference's SRCC
    p50_ms: float | None = None  # at batch 1
    size_mb: float | None = None  # 1 MB = 1e6 bytes, the artifact with its companions
    failed: str | None = None  # why nothing could be measured ("failed at load: ...")


@dataclasses.dataclass(frozen=True)
class Violation:
    row: str
    bound: str  # srcc | plcc | max_drift | max_latency_ms | max_size_mb | status
    limit: float | None
    value: float | None  # the measured figure (None: not measured)
    message: str  # "SRCC 0.8123 < 0.85 (--fail-under srcc=0.85)"

    def line(self) -> str:
        return f"gate: {self.row}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GateResult:
    bounds: dict[str, float]
    rows: list[str]  # the rows judged
    violations: list[Violation]

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def broken(self) -> list[str]:
        """The rows that broke at least one bound, in table order."""
        return list(dict.fromkeys(v.row for v in self.violations))

    def summary(self) -> str:
        """The verdict in one line."""
        bounds = options_text(self.bounds)
        if self.passed:
            return f"gate: passed: {len(self.rows)} model(s) within {bounds}"
        return (f"gate: FAILED: {len(self.broken)} of {len(self.rows)} model(s) broke {len(self.violations)} "
                f"bound(s) ({bounds})")

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": self.bounds, "passed": self.passed, "rows": self.rows, "broken": self.broken,
                "violations": [v.to_dict() for v in self.violations]}


def options_text(bounds: dict[str, float]) -> str:
    """The bounds as the options that set them: '--fail-under srcc=0.85,plcc=0.8 --max-size-mb 10'."""
    floors = ",".join(f"{name}={bounds[name]:g}" for name in FLOORS if name in bounds)
    return " ".join(([f"--fail-under {floors}"] if floors else [])
                    + [option_text(name, limit) for name, limit in bounds.items() if name not in FLOORS])


def option_text(bound: str, limit: float) -> str:
    """The option that set a bound, as the user writes it: --fail-under srcc=0.85, --max-size-mb 10."""
    return f"--fail-under {bound}={limit:g}" if bound in FLOORS else f"--{bound.replace('_', '-')} {limit:g}"


@dataclasses.dataclass(frozen=True)
class Gate:
    """The bounds given; None: not gated on that figure."""

    srcc: float | None = None  # floor
    plcc: float | None = None  # floor
    max_drift: float | None = None  # |ΔSRCC| ceiling
    max_latency_ms: float | None = None  # p50 at batch 1, ceiling
    max_size_mb: float | None = None  # ceiling

    @classmethod
    def parse(cls, fail_under: str | None = None, max_drift: float | None = None,
              max_latency_ms: float | None = None, max_size_mb: float | None = None) -> Gate:
        """From the command-line options; a malformed one is a one-line ConfigError."""
        floors = parse_floors(fail_under) if fail_under is not None else {}
        for option, value, low, high in (("--max-drift", max_drift, 0.0, 2.0),
                                         ("--max-latency-ms", max_latency_ms, 0.0, math.inf),
                                         ("--max-size-mb", max_size_mb, 0.0, math.inf)):
            if value is not None and not (low <= value <= high and not math.isnan(value)):
                raise ConfigError(f"{option} must be {'in 0..2 (a bound on |ΔSRCC|)' if high == 2 else 'at least 0'}, "
                                  f"got {value:g}")
        return cls(**floors, max_drift=max_drift, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb)

    @property
    def active(self) -> bool:
        return bool(self.bounds())

    def bounds(self) -> dict[str, float]:
        """The bounds set, by name: {"srcc": 0.85, "max_latency_ms": 5.0}."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_dict(self) -> dict[str, float]:
        return self.bounds()

    def check(self, rows: Sequence[Figures]) -> GateResult:
        violations = [v for row in rows for v in self._check_row(row)]
        return GateResult(self.bounds(), [row.name for row in rows], violations)

    def _check_row(self, row: Figures) -> list[Violation]:
        if row.failed is not None:
            return [Violation(row.name, "status", None, None, f"{row.failed}: nothing measured to gate")]
        found = []
        for name in FLOORS:
            limit, value = getattr(self, name), getattr(row, name)
            if limit is not None and not (value is not None and value >= limit):
                found.append(Violation(row.name, name, limit, value, _verdict(
                    name.upper(), value, "<", limit, ".4f", "", option_text(name, limit))))
        for name, value, label, fmt, unit in (
                ("max_drift", None if row.delta_srcc is None else abs(row.delta_srcc), "|ΔSRCC|", ".4f", ""),
                ("max_latency_ms", row.p50_ms, "p50 at batch 1", ".2f", " ms"),
                ("max_size_mb", row.size_mb, "size", ".2f", " MB")):
            limit = getattr(self, name)
            if limit is not None and not (value is not None and value <= limit):
                found.append(Violation(row.name, name, limit, value,
                                       _verdict(label, value, ">", limit, fmt, unit, option_text(name, limit))))
        return found


def _verdict(label: str, value: float | None, relation: str, limit: float, fmt: str, unit: str, option: str) -> str:
    if value is None:
        return f"no {label} measured, so {option} cannot hold"
    if math.isnan(value):
        return f"{label} not measurable (constant scores), so {option} cannot hold"
    return f"{label} {value:{fmt}}{unit} {relation} {limit:g}{unit} ({option})"


def parse_floors(text: str) -> dict[str, float]:
    """'srcc=0.85,plcc=0.85' -> {"srcc": 0.85, "plcc": 0.85}; anything else is a one-line ConfigError."""
    floors: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in FLOORS:
            raise ConfigError(f"--fail-under takes METRIC=VALUE pairs, comma-separated, METRIC one of "
                              f"{', '.join(FLOORS)} (e.g. srcc=0.85,plcc=0.85); got {part!r}")
        if name in floors:
            raise ConfigError(f"--fail-under names {name} twice: {text!r}")
        try:
            floors[name] = float(value)
        except ValueError:
            raise ConfigError(f"--fail-under {name}= needs a number, got {value.strip()!r}") from None
        if not -1.0 <= floors[name] <= 1.0:
            raise ConfigError(f"--fail-under {name} is a correlation, -1..1; got {floors[name]:g}")
    return floors
