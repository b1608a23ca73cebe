"""Candidates of several runtimes timed with every turn in a fresh process of its own: the cpu target's `rank`
(the timing contract in export/auto.py; one turn is export/measure.py). ONNX Runtime's, OpenVINO's and
ExecuTorch's thread pools, loaded in one process, take the cores from each other, so timed side by side there
they rank by who ran last, not by speed (benchmarks/results/spinning-*.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.export.auto import RUNOFF, Choice, Measured, choose, contenders, latency_batches
from kdiqa_edge.export.base import ExportConfig

# each turn is one fresh process that loads one candidate and times it for TURN_SECONDS per batch size; rounds
# alternate the candidates
ISOLATED_ROUNDS = 3
ISOLATED_RUNOFF_ROUNDS = 3
TURN_SECONDS = 2.0


def rank_isolated(items: list[Measured], pixels: np.ndarray, cfg: ExportConfig, max_drift: float, work: Path,
                  log: Callable[[str], None] = print, rounds: int | None = None,
                  seconds: float | None = None) -> Choice:
    """`rank` with every turn in a fresh process (`export/measure.py`): round-robin over all candidates in
    `ISOLATED_ROUNDS` rounds (the order reversed every other round), then the close contenders
    (`contenders`) again at opt_batch in `ISOLATED_RUNOFF_ROUNDS` rounds, the order rotated. A process holds
    one runtime and one model, so no other runtime's thread pool (idle, spinning or resized) shares the cores
    with the one timed, and the alternation spreads the machine's load over every candidate alike. What it
    costs: a process start and a model load per turn, untimed.

    Each candidate is ranked by its least disturbed turn (`p50_ms`: the lowest of its turns' medians; the
    median of every timed run is kept beside it as `all_runs_p50_ms`). Other jobs on a shared machine only
    ever slow a turn down, and with a few turns each, one loaded turn moved a candidate's pooled median by
    15% on the 2-vCPU EPYC: ExecuTorch (5.28 ms) shipped over OpenVINO INT8, whose fastest round was 4.58 ms
    (benchmarks/results/openvino-amd-epyc-2c-avx-512-bf16-without-amx.md)."""
    from kdiqa_edge.console import plural
    from kdiqa_edge.export.measure import in_own_process

    rounds = rounds or ISOLATED_ROUNDS
    seconds = seconds or TURN_SECONDS
    work.mkdir(parents=True, exist_ok=True)
    batches = latency_batches(cfg)
    sample = work / "pixels.npy"
    np.save(sample, np.ascontiguousarray(pixels[np.resize(np.arange(len(pixels)), max(batches))]))

    def turns(live: list[Measured], batches: tuple[int, ...], rounds: int,
              rotate: bool) -> dict[str, dict[int, list[list[float]]]]:
        """name -> batch -> each turn's timed runs (seconds)."""
        times: dict[str, dict[int, list[list[float]]]] = {i.name: {b: [] for b in batches} for i in live}
        for round_index in range(rounds):
            shift = round_index % max(len(live), 1)
            order = live[shift:] + live[:shift] if rotate else (live if round_index % 2 == 0 else live[::-1])
            for item in order:
                if item.status != "ok":
                    continue
                try:
                    measured = in_own_process(item.path, sample, batches, seconds, cfg.threads,
                                              item.candidate.provider, item.candidate.load)
                except Exception as exc:
                    if item.candidate.reference:
                        raise
                    item.fail("latency", exc)
                    continue
                for b in batches:
                    times[item.name][b].append(measured[b])
        return {name: t for name, t in times.items() if all(t.values())}

    def figures(per_turn: list[list[float]], batch: int) -> dict[str, Any]:
        fastest = min(float(np.median(runs)) for runs in per_turn) * 1e3
        pooled = float(np.median([t for runs in per_turn for t in runs])) * 1e3
        return {"p50_ms": round(fastest, 3), "images_per_s": round(batch * 1e3 / fastest, 1) if fastest else math.inf,
                "all_runs_p50_ms": round(pooled, 3), "turns": len(per_turn),
                "runs": sum(len(runs) for runs in per_turn)}

    live = [i for i in items if i.status == "ok"]
    log(f"  timing {plural(len(live), 'candidate')}, each in processes of its own "
        f"({plural(rounds, 'alternated round')})")
    for name, by_batch in turns(live, batches, rounds, rotate=False).items():
        item = next(i for i in live if i.name == name)
        for b, per_turn in by_batch.items():
            item.latency[b] = figures(per_turn, b)
    close = contenders(items, max_drift, cfg.opt_batch, min_speedup=cfg.min_speedup)
    if len(close) > 1:
        log(f"  runoff at batch {cfg.opt_batch}: {', '.join(i.name for i in close)} "
            f"(within {RUNOFF:.0%} of the fastest), {ISOLATED_RUNOFF_ROUNDS} rotated rounds")
        for name, by_batch in turns(close, (cfg.opt_batch,), ISOLATED_RUNOFF_ROUNDS, rotate=True).items():
            next(i for i in close if i.name == name).runoff[cfg.opt_batch] = figures(by_batch[cfg.opt_batch],
                                                                                     cfg.opt_batch)
    timing = {"protocol": "each turn a fresh process (export/measure.py)", "turn_seconds": seconds,
              "ranked_by": "the fastest turn's median (p50_ms); all_runs_p50_ms: the median of every run",
              "rounds": rounds, "runoff_rounds": ISOLATED_RUNOFF_ROUNDS}
    return dataclasses.replace(choose(items, max_drift, batch=cfg.opt_batch, min_speedup=cfg.min_speedup),
                               timing=timing)
