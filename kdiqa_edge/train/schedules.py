"""The soft/hard mixing weight lambda(t) of the distillation loss, and the variants that fix it.

The paper anneals lambda(t) = 0.5 * (1 + cos(pi * t / T)) over all T optimizer steps: the student first
follows the teacher's features (soft term) and ends on the MOS labels (hard term). The ablations of its
Table II pin lambda instead: `soft` (1), `hard` (0), `fixed:X` (the "traditional" constant mix of eq. 8),
and `regression` (no teacher at all: a plain regression head trained on MSE).
"""

from __future__ import annotations

import dataclasses
import math

from kdiqa_edge.errors import ConfigError

VARIANTS = ("full", "soft", "hard", "fixed:X", "regression")


def cosine_lambda(step: int, total_steps: int) -> float:
    """lambda(t) = 0.5 * (1 + cos(pi * t / T)): 1 at t = 0, 0.5 at T/2, 0 at T (clamped beyond)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t / total_steps))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the ablation table: how lambda moves and whether a teacher is involved."""

    name: str  # full | soft | hard | fixed | regression
    fixed: float | None = None  # the constant lambda of `fixed:X`

    @property
    def spec(self) -> str:
        """The flag value that recreates this variant (`fixed:0.5`, `full`...)."""
        return f"fixed:{self.fixed:g}" if self.name == "fixed" else self.name

    @property
    def uses_teacher_features(self) -> bool:
        """Whether the loss can put weight on the soft (feature) term at all."""
        return self.name in ("full", "soft") or (self.name == "fixed" and self.fixed > 0.0)

    @property
    def uses_teacher_head(self) -> bool:
        """Every variant but `regression` scores through the teacher's frozen QualityHead."""
        return self.name != "regression"

    def lam(self, step: int, total_steps: int) -> float:
        """lambda at optimizer step `step` of `total_steps`."""
        if self.name == "full":
            return cosine_lambda(step, total_steps)
        if self.name == "soft":
            return 1.0
        if self.name == "fixed":
            return float(self.fixed)
        return 0.0  # hard, regression


def parse_variant(text: str | Variant) -> Variant:
    """`full`, `soft`, `hard`, `regression` or `fixed:X` with 0 <= X <= 1."""
    if isinstance(text, Variant):
        return text
    value = text.strip().lower()
    if value in ("full", "soft", "hard", "regression"):
        return Variant(value)
    if value.startswith("fixed:"):
        try:
            fixed = float(value.split(":", 1)[1])
        except ValueError:
            fixed = float("nan")
        if not 0.0 <= fixed <= 1.0:
            raise ConfigError(f"--variant fixed:X needs a number X in [0, 1], got {text!r}")
        return Variant("fixed", fixed)
    raise ConfigError(f"unknown --variant {text!r}; choose one of: {', '.join(VARIANTS)}")
