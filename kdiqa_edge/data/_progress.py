"""Progress for long data work (decoding, generating), on stderr so piped output (`data info --json | jq`)
stays clean. The display itself is kdiqa_edge.console.Progress (a rich bar in a terminal, plain lines in a log)."""

from __future__ import annotations

from kdiqa_edge.console import Progress as _Progress


def Progress(enabled: bool, total: int, label: str) -> _Progress:
    """`with Progress(on, total, label) as advance: advance(n)` (n images done)."""
    return _Progress(label, total, unit="images", enabled=enabled, stream="stderr", transient=True)
