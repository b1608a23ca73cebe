"""Where kdiqa-edge keeps its caches (synthetic set, image and feature caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$KDIQA_CACHE`, else `$XDG_CACHE_HOME/kdiqa-edge`, else `~/.cache/kdiqa-edge`."""
    if env := os.environ.get("KDIQA_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kdiqa-edge"
