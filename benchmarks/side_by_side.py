"""Timing artifacts side by side in one process, for the benchmarks in this folder.

On a shared machine a load that drifts over the minutes of a run hits every artifact alike when each round
times all of them, the order reversed every other round; read the medians' ratios, not the milliseconds.
Open ONNX Runtime sessions with `stop_spinning=True` (kdiqa_edge.export.evaluate.session): an idle session's
workers would otherwise spin on into the next one's turn (benchmarks/results/spinning-*.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from pathlib import Path


def alternated(calls: dict[Hashable, Callable[[], object]], rounds: int, runs: int, warmup: int = 3,
               after_round: Callable[[int], None] | None = None) -> tuple[dict[Hashable, list[float]], list[float]]:
    """Every call `runs` times in each of `rounds` rounds, the order reversed every other round, after `warmup`
    calls of each: (seconds per call's key, the 1-minute load average after each round). Each turn starts with
    one untimed call: the switch from the previous call (workers woken, caches refilled) is not timed."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    loads = []
    for index in range(rounds):
        for key in (list(calls) if index % 2 == 0 else list(calls)[::-1]):
            calls[key]()
            for _ in range(runs):
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
        if after_round is not None:
            after_round(index)
    return times, loads


def emit(text: str, out: Path | None) -> None:
    """Print a results file's text, and write it to `out` when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
