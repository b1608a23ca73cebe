"""What the user asked for: which dataset, where, and how to read a CSV. Plain data, no I/O."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str = "synthetic"  # reader name in the dataset registry
    root: Path | None = None  # dataset root as distributed; None = the built-in synthetic set
    csv: Path | None = None  # csv reader: score file (default <root>/scores.csv)
    image_dir: Path | None = None  # csv reader: images relative to this folder (default root)
    image_col: str = "image"  # csv reader: image column
    mos_col: str = "mos"  # csv reader: score column
    mos_range: tuple[float, float] | None = None  # csv reader: nominal range (default 1..5)
    lower_better: bool = False  # csv reader: DMOS-style scores
    ref_col: str | None = None  # csv reader: reference/content id column
    strict: bool = False  # any skipped file is an error

    @classmethod
    def from_cli(cls, dataset=None, root=None, csv=None, image_dir=None, image_col=None, mos_col=None,
                 mos_range=None, lower_better=False, ref_col=None, strict=False) -> DatasetSpec:
        values: dict[str, Any] = {
            "name": dataset, "root": Path(root) if root else None, "csv": Path(csv) if csv else None,
            "image_dir": Path(image_dir) if image_dir else None, "image_col": image_col, "mos_col": mos_col,
            "mos_range": parse_range(mos_range) if isinstance(mos_range, str) else mos_range,
            "lower_better": lower_better, "ref_col": ref_col, "strict": strict,
        }
        if values["name"] is None:
            values["name"] = "csv" if csv is not None else "synthetic"
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (paths as strings, the range as a list), so a saved spec read back
        compares equal to the one that was saved."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        data = dict(data)
        for key in ("root", "csv", "image_dir"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        if data.get("mos_range") is not None:
            data["mos_range"] = tuple(data["mos_range"])
        return cls(**data)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mos-range must be LO,HI (two numbers), got {text!r}") from None
    if not lo < hi:
        raise ConfigError(f"--mos-range LO must be below HI, got {text!r}")
    return lo, hi
