"""`--precision auto`: build every candidate a target offers, measure each on this machine, ship the fastest
one within the drift bound.

The candidate contract (docs/ARCHITECTURE.md): a target that supports auto has `auto_file` (the pick's
stable file name in `OUT/<target>-auto/`) and `candidates(model, examples, cfg, meta, work) -> list[Candidate]`.
Each candidate says how to build one artifact into a folder (with its companion files: an OpenVINO IR's .bin;
and, where candidates of several runtimes compete, the name it ships under); the artifact loads in the
torch-free runtime (`kdiqa_edge.runtime.QualityModel`, with the candidate's provider), which measures it:

- latency at batch 1 and 8 (capped at max_batch), rounds alternated across candidates so all see the same
  machine load, median per candidate; the timer is injectable (`timer(measured, model, x) -> seconds`);
- drift on the test split against the reference (FP32) candidate: |ΔSRCC|, mean and max |Δscore|.

A target may time its candidates its own way (its `rank`): the cpu target, of several runtimes, times every
turn in a fresh process (export/isolated.py, export/measure.py): runtimes' thread pools disturb each other in
one process.

The candidates within `RUNOFF` of the fastest (at the ranked batch, within the bound) are then re-timed head to
head: short turns of `RUNOFF_RUNS` runs after one untimed run, the order rotated every round, so a load that
drifts while the round-robin runs, and the cost of switching from one session to another, hit every contender
alike. Their runoff medians rank them. The fastest candidate within `max_drift` (|ΔSRCC|) ships; candidates
within `TIE` of it are a tie, which the smaller file wins. A reduced-precision pick must also be at least
`min_speedup` (default `MIN_SPEEDUP`) times as fast as the reference: INT8 that buys less speed than that is
not worth its drift, so the reference ships and the reason says so. (The reference joins the runoff when it is
close enough for that ratio to be in doubt.) The table of every candidate goes into the manifest and the
export notes.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdiqa_edge.errors import ConfigError, ExportError, first_line
from kdiqa_edge.export.base import Examples, ExportConfig, ExportResult

TIE = 0.03  # candidates within 3 % of the fastest are a tie: the smaller file wins
ROUNDS = 7  # latency rounds; every candidate runs in every round, the order reversed every other round
WARMUP = 3  # untimed runs per candidate and batch size before timing
LATENCY_BATCHES = (1, 8)
RUNOFF = 0.30  # candidates within 30 % of the fastest after the round-robin are re-timed head to head
RUNOFF_ROUNDS = 15  # runoff rounds; each contender runs one untimed run, then RUNOFF_RUNS timed ones, per round
RUNOFF_RUNS = 3
MIN_SPEEDUP = ExportConfig.min_speedup  # a pick other than the reference must be this many times as fast as it


@dataclasses.dataclass
class Candidate:
    """One artifact a target can ship, and how to build it."""

    name: str  # unique within the target: fp32, int8:qdq-all+stem-int8, fp16:cuda
    precision: str  # fp32 | fp16 | int8
    build: Callable[[Path], Path]  # writes the artifact into the (empty) folder given; returns its path
    provider: str = "cpu"  # the execution provider it is measured with, and meant to run on
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # the explicit choice, for the manifest
    reference: bool = False  # the FP32 candidate every other one's drift is measured against (exactly one)
    tolerance: float | None = None  # max |score - torch score| when shipped (None: reported only)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # target facts for the manifest (input spec)
    load: dict[str, Any] = dataclasses.field(default_factory=dict)  # QualityModel.load options while measured
    companions: tuple[str, ...] = ()  # suffixes of the files beside the artifact that belong to it (an IR's .bin)
    file: str | None = None  # its name in OUT/<target>-auto/ when picked (None: the target's auto_file)
    runtime: str = ""  # the export target whose runtime runs it (onnx, openvino, executorch); "": the target's
    # an FP32 candidate of another runtime (cross-runtime auto): the reference and these are lossless, and a
    # reduced-precision pick's speed is measured against the fastest of them (min_speedup)
    lossless: bool = False

    def files(self, path: Path) -> list[Path]:
        """The artifact at `path` and its companions."""
        return [path, *(path.with_suffix(suffix) for suffix in self.companions)]


class AutoTarget(Protocol):
    name: str
    auto_file: str | None  # e.g. model.onnx, model.pte, model.xml; None where every candidate names its `file`

    def candidates(self, model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any],
                   work: Path) -> list[Candidate]:
        """Every candidate for `model` on this machine; the reference first. May write into `work`."""

    # optional: tune(pick: Measured, final: Path, pixels, cfg, timer, log) -> dict | None, after the pick is
    # copied to `final`: a runtime setting measured for the pick and recorded in the file (onnx: spin-waiting)
    # optional: beside(pick: Measured, final: Path, cfg) -> (files, notes), after the copy: what the target's
    # named-precision export writes beside its artifact (executorch: benchmark_on_device.sh), for the pick too
    # optional: left_out(cfg) -> list[str]: candidates this machine cannot offer and why, one line each (onnx: an
    # accelerator provider onnxruntime lists that does not start), logged and kept in the notes
    # optional: rank(items, pixels, cfg, max_drift, work, log) -> Choice: a target's own timing, used without an
    # injected timer, after this process's models are released (cpu: `isolated.rank_isolated`, each candidate
    # in processes of its own: candidates of several runtimes, whose thread pools disturb each other in one)


def supports_auto(target) -> bool:
    """A target offers auto when it declares it (`"auto"` in supports.precisions) and implements the contract."""
    return ("auto" in target.supports.precisions and callable(getattr(target, "candidates", None))
            and hasattr(target, "auto_file"))


@dataclasses.dataclass
class Measured:
    """A candidate once built and measured: its row in the table."""

    candidate: Candidate
    path: Path | None = None
    status: str = "ok"  # ok | failed
    stage: str | None = None  # build | load | drift | latency
    reason: str | None = None  # one line
    bytes: int = 0
    latency: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # batch -> p50_ms, images_per_s
    runoff: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # batch -> p50_ms, runs (re-timed)
    drift: dict[str, float] = dataclasses.field(default_factory=dict)
    scores: np.ndarray | None = None
    within: bool | None = None  # within the drift bound

    @property
    def name(self) -> str:
        return self.candidate.name

    def fail(self, stage: str, exc: BaseException) -> None:
        self.status, self.stage, self.reason = "failed", stage, first_line(exc, limit=500, typed=True)

    def p50(self, batch: int) -> float:
        """The figure it is ranked by: the runoff's median where it ran one, else the round-robin's."""
        return self.runoff.get(batch, self.latency.get(batch, {})).get("p50_ms", math.inf)

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "runtime": self.candidate.runtime, "precision": self.candidate.precision,
                "provider": self.candidate.provider,
                "status": self.status, "stage": self.stage, "reason": self.reason, "bytes": self.bytes,
                "latency": {str(b): v for b, v in sorted(self.latency.items())},
                "runoff": {str(b): v for b, v in sorted(self.runoff.items())}, "drift": self.drift,
                "within_bound": self.within, "reference": self.candidate.reference,
                "lossless": self.candidate.reference or self.candidate.lossless, "recipe": self.candidate.recipe}


Timer = Callable[[Measured, Any, np.ndarray], float]


def wall_clock(measured: Measured, model, x: np.ndarray) -> float:
    """Seconds for one `model.run(x)`, device work included (the bench's `timed_run`)."""
    from kdiqa_edge.bench.latency import timed_run

    return timed_run(model, x)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def build_all(candidates: list[Candidate], work: Path, log: Callable[[str], None]) -> list[Measured]:
    """Build each candidate in its own folder; a failing one becomes a failed row (the reference may not fail)."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ExportError(f"duplicate candidate names: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    if sum(c.reference for c in candidates) != 1:
        raise ExportError("auto needs exactly one reference (FP32) candidate")
    measured = []
    for index, candidate in enumerate(candidates):
        item = Measured(candidate)
        folder = work / f"candidate-{index:02d}"
        folder.mkdir(parents=True)
        start = time.perf_counter()
        try:
            item.path = candidate.build(folder)
            item.bytes = sum(_size(path) for path in candidate.files(item.path))
        except Exception as exc:
            if candidate.reference:
                raise
            item.fail("build", exc)
        log(f"  {candidate.name}: built in {time.perf_counter() - start:.1f} s"
            + (f" ({item.reason})" if item.status != "ok" else ""))
        measured.append(item)
    return measured


def load_models(items: list[Measured], threads: int) -> dict[str, Any]:
    from kdiqa_edge.runtime import QualityModel

    models = {}
    for item in items:
        if item.status != "ok":
            continue
        try:
            models[item.name] = QualityModel.load(item.path, provider=item.candidate.provider, threads=threads,
                                                  **item.candidate.load)
        except Exception as exc:
            if item.candidate.reference:
                raise
            item.fail("load", exc)
    return models


def measure_drift(items: list[Measured], models: dict[str, Any], examples: Examples) -> None:
    """Score the test split with every candidate; drift against the reference's scores."""
    from kdiqa_edge.export import evaluate

    reference = next(i for i in items if i.candidate.reference)
    for item in [reference, *[i for i in items if i is not reference]]:
        if item.name not in models:
            continue
        try:
            item.scores = np.asarray(models[item.name].predict(examples.test, batch_size=16), np.float64)
        except Exception as exc:
            if item.candidate.reference:
                raise
            item.fail("drift", exc)
            models.pop(item.name)
            continue
        report = evaluate.drift(reference.scores, item.scores, examples.test_mos)
        item.drift = {key: float(report[key]) for key in ("delta_srcc", "delta_plcc", "mean_abs_diff_vs_fp32",
                                                           "max_abs_diff_vs_fp32", "srcc_vs_fp32")}
        item.drift["srcc"] = float(report["reduced"]["srcc"])
        item.drift["plcc"] = float(report["reduced"]["plcc"])
        item.drift["images"] = int(report["images"])


def latency_inputs(model, pixels: np.ndarray, batch: int) -> np.ndarray:
    """`batch` real test images (repeated when the split is smaller) in the artifact's input format."""
    take = np.resize(np.arange(len(pixels)), batch)
    return model.prepare(np.ascontiguousarray(pixels[take]))


def latency_batches(cfg: ExportConfig) -> tuple[int, ...]:
    """Batch 1 and 8 (capped at max_batch), and the batch the pick is ranked at (opt_batch)."""
    return tuple(sorted({min(b, cfg.max_batch) for b in LATENCY_BATCHES} | {cfg.opt_batch}))


def measure_latency(items: list[Measured], models: dict[str, Any], pixels: np.ndarray, cfg: ExportConfig,
                    timer: Timer = wall_clock, batches: tuple[int, ...] | None = None,
                    rounds: int = ROUNDS) -> None:
    """Median latency per candidate and batch size, rounds alternated so every candidate sees the same load.

    `cfg.latency_runs` runs at batch 1 and as many images at larger batches (latency_runs / batch runs), spread
    over the rounds: a shared machine's load drifts over minutes, and every candidate sees each stretch of it.
    Each turn starts with one untimed run per batch size: the switch from the previous session (its workers
    woken, its caches refilled) is not timed."""
    batches = batches or latency_batches(cfg)
    runs = {b: max(1, math.ceil(cfg.latency_runs / b / rounds)) for b in batches}
    live = [i for i in items if i.name in models]
    inputs = {}
    for item in list(live):
        try:
            inputs[item.name] = {b: latency_inputs(models[item.name], pixels, b) for b in batches}
            for b in batches:
                for _ in range(WARMUP):
                    models[item.name].run(inputs[item.name][b])
        except Exception as exc:
            if item.candidate.reference:
                raise
            item.fail("latency", exc)
            live.remove(item)
    times: dict[str, dict[int, list[float]]] = {i.name: {b: [] for b in batches} for i in live}
    for round_index in range(rounds):
        order = live if round_index % 2 == 0 else live[::-1]
        for item in order:
            for b in batches:
                models[item.name].run(inputs[item.name][b])
                for _ in range(runs[b]):
                    times[item.name][b].append(timer(item, models[item.name], inputs[item.name][b]))
    for item in live:
        for b in batches:
            p50 = float(np.median(times[item.name][b])) * 1e3
            item.latency[b] = {"p50_ms": round(p50, 3), "images_per_s": round(b * 1e3 / p50, 1) if p50 else math.inf,
                               "runs": len(times[item.name][b])}


@dataclasses.dataclass(frozen=True)
class Choice:
    pick: Measured
    why: str
    batch: int  # the batch size the latencies were ranked at
    declined: str | None = None  # the faster candidate that gave way to the reference under min_speedup
    # how the latencies were taken, for the manifest: protocol, rounds, runoff_rounds (+ turn_seconds,
    # ranked_by: timed in processes of their own, export/isolated.py); empty: side by side in this process
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)


def _lossless(item: Measured) -> bool:
    return item.candidate.reference or item.candidate.lossless


def baseline(items: list[Measured], batch: int) -> Measured | None:
    """What a reduced-precision pick must beat by min_speedup: the fastest lossless candidate measured (the
    reference; in cross-runtime auto, the fastest FP32 of any runtime)."""
    lossless = [i for i in items if _lossless(i) and i.within and batch in i.latency]
    return min(lossless, key=lambda i: i.p50(batch)) if lossless else None


def mark_within(items: list[Measured], max_drift: float) -> None:
    """`within` for every row: the reference always is; a candidate whose drift could not be measured never is."""
    for item in items:
        delta = item.drift.get("delta_srcc")
        item.within = item.status == "ok" and (item.candidate.reference or (
            delta is not None and not math.isnan(delta) and abs(delta) <= max_drift))


def contenders(items: list[Measured], max_drift: float, batch: int = 1, margin: float = RUNOFF,
               min_speedup: float = MIN_SPEEDUP) -> list[Measured]:
    """The candidates within the bound whose round-robin latency is within `margin` of the fastest one's, and
    the reference (and any lossless candidate) where it is within `margin` of `min_speedup` times the fastest
    (the ratio the choice tests)."""
    mark_within(items, max_drift)
    ok = [i for i in items if i.within and batch in i.latency]
    if not ok:
        return []
    best = min(i.latency[batch]["p50_ms"] for i in ok)
    return [i for i in ok if i.latency[batch]["p50_ms"] <= best * (1 + margin)
            or (_lossless(i) and i.latency[batch]["p50_ms"] <= best * max(min_speedup, 1) * (1 + margin))]


def head_to_head(pairs: list[tuple[Measured, Any]], pixels: np.ndarray, batch: int, timer: Timer = wall_clock,
                 rounds: int = RUNOFF_ROUNDS, runs: int = RUNOFF_RUNS) -> list[list[float]]:
    """Time (candidate, loaded model) pairs against each other at `batch`: per round each runs once untimed
    (the switch from the previous session) and `runs` times timed, the order rotated every round. The seconds,
    per pair. Two pairs may share a candidate (the same file loaded two ways)."""
    inputs = [latency_inputs(model, pixels, batch) for _, model in pairs]
    times: list[list[float]] = [[] for _ in pairs]
    order = list(range(len(pairs)))
    for round_index in range(rounds):
        shift = round_index % len(order)
        for index in order[shift:] + order[:shift]:
            item, model = pairs[index]
            model.run(inputs[index])
            times[index] += [timer(item, model, inputs[index]) for _ in range(runs)]
    return times


def measure_runoff(items: list[Measured], models: dict[str, Any], pixels: np.ndarray, batch: int,
                   timer: Timer = wall_clock, rounds: int = RUNOFF_ROUNDS, runs: int = RUNOFF_RUNS) -> None:
    """Re-time close contenders head to head at `batch` (`head_to_head`); the median goes into `runoff`."""
    times = head_to_head([(item, models[item.name]) for item in items], pixels, batch, timer, rounds, runs)
    for item, seconds in zip(items, times):
        item.runoff[batch] = {"p50_ms": round(float(np.median(seconds)) * 1e3, 3), "runs": len(seconds)}


def _sizes(a: int, b: int) -> str:
    """'7.0 vs 7.4 MB', in kB where MB would print the two alike."""
    if f"{a / 1e6:.1f}" != f"{b / 1e6:.1f}":
        return f"{a / 1e6:.1f} vs {b / 1e6:.1f} MB"
    return f"{a / 1e3:,.0f} vs {b / 1e3:,.0f} kB"


def rank(items: list[Measured], models: dict[str, Any], pixels: np.ndarray, cfg: ExportConfig, max_drift: float,
         timer: Timer = wall_clock, log: Callable[[str], None] = print) -> Choice:
    """Round-robin latency of every candidate, the runoff of the close ones, then the choice."""
    measure_latency(items, models, pixels, cfg, timer)
    close = contenders(items, max_drift, cfg.opt_batch, min_speedup=cfg.min_speedup)
    if len(close) > 1:
        log(f"  runoff at batch {cfg.opt_batch}: {', '.join(i.name for i in close)} "
            f"(within {RUNOFF:.0%} of the fastest)")
        measure_runoff(close, models, pixels, cfg.opt_batch, timer)
    return choose(items, max_drift, batch=cfg.opt_batch, min_speedup=cfg.min_speedup)


def choose(items: list[Measured], max_drift: float, batch: int = 1, tie: float = TIE,
           min_speedup: float = MIN_SPEEDUP) -> Choice:
    """The fastest candidate within |ΔSRCC| <= max_drift at `batch`; a tie (within `tie`) goes to the smaller file;
    a reduced-precision pick that is not `min_speedup` times as fast as the `baseline` (the fastest lossless
    candidate: the reference, or in cross-runtime auto the fastest FP32 of any runtime) gives way to it.

    Why the fastest FP32 and not the reference: the question min_speedup answers is "is the lossy one worth its
    drift against the best lossless one here"; an INT8 model 1.3x ONNX Runtime's FP32 but 1.05x OpenVINO's FP32
    buys 5 %, which does not pay for the drift. (With one runtime the two are the same candidate.)

    The reference is always within the bound; a candidate whose drift could not be measured never is. Where a
    runoff ran, its contenders are ranked by its medians (`Measured.p50`).
    """
    mark_within(items, max_drift)
    ok = [i for i in items if i.within and batch in i.latency]
    if not ok:
        raise ExportError("no candidate could be measured (not even the reference)")
    ran_off = [i for i in ok if batch in i.runoff]
    if ran_off:  # the runoff's contenders were the close ones: the winner is one of them
        ok = ran_off
    base = baseline(items, batch)
    # a lossy candidate that does not buy min_speedup is out before the tie is settled: a smaller file within
    # TIE of a faster lossy one that does buy it must not hand the choice back to the baseline
    worth = [i for i in ok if _lossless(i) or min_speedup <= 1 or base is None
             or base.p50(batch) >= i.p50(batch) * min_speedup]
    eligible = worth or [base]  # the baseline, where the runoff left it out
    fastest = min(eligible, key=lambda i: i.p50(batch))
    tied = [i for i in eligible if i.p50(batch) <= fastest.p50(batch) * (1 + tie)]
    pick = min(tied, key=lambda i: (i.bytes, i.p50(batch)))
    declined = sorted((i for i in ok if i not in worth and i.p50(batch) < pick.p50(batch)),
                      key=lambda i: i.p50(batch))
    if declined:  # only a lossless pick has faster lossy candidates that gave way to it
        return Choice(pick, _declined(pick, declined[0], batch, min_speedup), batch, declined=declined[0].name)
    return Choice(pick, _why(pick, fastest, items, max_drift, batch, tie, base or pick), batch)


def _declined(reference: Measured, declined: Measured, batch: int, min_speedup: float) -> str:
    speed = reference.p50(batch) / declined.p50(batch)
    return (f"{reference.name} ships: the fastest candidate within the bound, {declined.name}, is {speed:.2f}x "
            f"the speed of {reference.name} at batch {batch} ({declined.p50(batch):.2f} vs "
            f"{reference.p50(batch):.2f} ms), under --min-speedup {min_speedup:g}: too little speed for its drift "
            f"(ΔSRCC {declined.drift.get('delta_srcc', 0):+.4f}); --min-speedup 1 would ship it")


def _why(pick: Measured, fastest: Measured, items: list[Measured], max_drift: float, batch: int, tie: float,
         base: Measured) -> str:
    reference = next(i for i in items if i.candidate.reference)
    lines = []
    if pick is reference:
        lines.append(f"{pick.name} ships: no other candidate within |ΔSRCC| <= {max_drift:g} is faster at batch {batch}"
                     + (f" by more than {tie:.0%}" if len([i for i in items if i.within]) > 1 else ""))
    else:
        versus = reference if pick is base else base  # a lossless pick against the reference, else the baseline
        lines.append(f"{pick.name} ships: {versus.p50(batch) / pick.p50(batch):.2f}x the speed of {versus.name} at "
                     f"batch {batch} ({pick.p50(batch):.2f} vs {versus.p50(batch):.2f} ms), ΔSRCC "
                     f"{pick.drift.get('delta_srcc', 0):+.4f} within {max_drift:g}")
    if fastest is not pick:
        lines.append(f"{fastest.name} is {fastest.p50(batch):.2f} ms, within {tie:.0%}: a tie, and "
                     f"{pick.name} is the smaller file ({_sizes(pick.bytes, fastest.bytes)})")
    over = sorted((i for i in items if i.status == "ok" and not i.within and i.p50(batch) < pick.p50(batch)),
                  key=lambda i: i.p50(batch))
    for item in over:
        lines.append(f"{item.name} is faster ({item.p50(batch):.2f} ms) but over the bound: ΔSRCC "
                     f"{item.drift.get('delta_srcc', math.nan):+.4f}")
    return "; ".join(lines)


def table(items: list[Measured], pick: Measured | None = None) -> list[str]:
    """The candidates as fixed-width lines (the pick marked with *), for the export notes and the console."""
    batches = sorted({b for i in items for b in i.latency})
    width = max([len("candidate"), *(len(i.name) for i in items)])
    runtimes = len({i.candidate.runtime for i in items}) > 1  # cross-runtime auto: a runtime column
    rt_width = max([len("runtime"), *(len(i.candidate.runtime) for i in items)])
    head = [f"{'candidate':{width}s}", *([f"{'runtime':{rt_width}s}"] if runtimes else []), f"{'prec':4s}", *[f"{f'p50 ms@{b}':>10s}" for b in batches[:1]],
            *[f"{f'img/s@{b}':>9s}" for b in batches], f"{'MB':>6s}", f"{'ΔSRCC':>8s}", f"{'mean|Δ|':>8s}",
            f"{'max|Δ|':>8s}", "bound"]
    lines = ["  " + " ".join(head)]
    for item in items:
        mark = "*" if item is pick else " "
        runtime = [f"{item.candidate.runtime:{rt_width}s}"] if runtimes else []
        if item.status != "ok":
            lines.append(f"{mark} " + " ".join([f"{item.name:{width}s}", *runtime, f"{item.candidate.precision:4s}",
                                                 f"failed at {item.stage}: {item.reason}"]))
            continue
        d = item.drift
        bound = "ref" if item.candidate.reference else {True: "ok", False: "over"}.get(item.within, "")
        bound += " (lossless)" if item.candidate.lossless else ""
        cells = [f"{item.name:{width}s}", *runtime, f"{item.candidate.precision:4s}", *[f"{item.p50(b):10.2f}" for b in batches[:1]],
                 *[f"{item.latency[b]['images_per_s']:9.1f}" if b in item.latency else f"{'-':>9s}" for b in batches],
                 f"{item.bytes / 1e6:6.1f}", f"{d.get('delta_srcc', 0):+8.4f}", f"{d.get('mean_abs_diff_vs_fp32', 0):8.4f}",
                 f"{d.get('max_abs_diff_vs_fp32', 0):8.4f}", bound]
        lines.append(f"{mark} " + " ".join(cells))
    return lines


def export_auto(target: AutoTarget, model, examples: Examples, out: Path, cfg: ExportConfig,
                meta: dict[str, Any], timer: Timer | None = None, log: Callable[[str], None] = print) -> ExportResult:
    """Candidates -> built, measured, the pick (and its companions) copied to `out/<file>`, checked against torch.

    Latency: with an injected `timer`, or for a target without a `rank` of its own, in this process (`rank`);
    else by the target's `rank` (the cpu target: each candidate in processes of its own). Drift is measured
    in this process either way: scores do not depend on what else runs."""
    from kdiqa_edge.export import evaluate
    from kdiqa_edge.runtime import QualityModel

    if not supports_auto(target):
        raise ConfigError(f"target {target.name} has no --precision auto (it offers no candidates)")
    with tempfile.TemporaryDirectory(prefix=f"kdiqa-auto-{target.name}-") as scratch:
        work = Path(scratch)
        found = target.candidates(model, examples, cfg, meta, work / "shared")
        candidates = [c if c.runtime else dataclasses.replace(c, runtime=target.name)
                      for c in selected(found, cfg, target.name)]
        log(f"{target.name}-auto: {len(candidates)} candidates: {', '.join(c.name for c in candidates)}")
        left_out = target.left_out(cfg) if callable(getattr(target, "left_out", None)) else []
        for line in left_out:
            log(f"  {line}")
        items = build_all(candidates, work, log)
        models = load_models(items, cfg.threads)
        measure_drift(items, models, examples)
        own_rank = getattr(target, "rank", None)
        if timer is None and callable(own_rank):
            models.clear()  # its timing (processes of their own) gets the cores, no idle thread pool beside it
            choice = own_rank(items, examples.test, cfg, cfg.max_drift, work / "timing", log)
        else:
            choice = rank(items, models, examples.test, cfg, cfg.max_drift, timer or wall_clock, log)
        pick = choice.pick
        final = out / (pick.candidate.file or target.auto_file)
        for source, dest in zip(pick.candidate.files(pick.path), pick.candidate.files(final)):
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, dest)
        tune = getattr(target, "tune", None)
        tuned = tune(pick, final, examples.test, cfg, timer or wall_clock, log) if callable(tune) else None
        beside = getattr(target, "beside", None)
        beside_files, beside_notes = beside(pick, final, cfg) if callable(beside) else ([], [])
        shipped = models.get(pick.name) or QualityModel.load(final, provider=pick.candidate.provider,
                                                             threads=cfg.threads)
        parity = evaluate.parity(evaluate.torch_reference(model, examples.parity),
                                 shipped.predict(examples.parity, batch_size=16), pick.candidate.tolerance)
        del shipped
        models.clear()
    if parity.get("passed") is False:
        raise ExportError(f"{final.name} ({pick.name}): parity check failed, max |score - torch score| = "
                          f"{parity['max_abs_diff']:.2e} > {pick.candidate.tolerance:.0e}")
    result = _result(target.name, items, choice, [*pick.candidate.files(final), *beside_files], parity,
                     len(examples.test), cfg, tuned, left_out)
    result.notes.extend(beside_notes)
    return result


def selected(candidates: list[Candidate], cfg: ExportConfig, target: str) -> list[Candidate]:
    """The candidates `--candidates` names (every one without it); the reference is always kept."""
    if not cfg.candidates:
        return candidates
    wanted = {name.strip() for name in cfg.candidates.split(",")}
    unknown = sorted(wanted - {c.name for c in candidates})
    if unknown:
        raise ConfigError(f"unknown candidate(s) {', '.join(unknown)} for this {target} model; "
                          f"choose from: {', '.join(c.name for c in candidates)}")
    return [c for c in candidates if c.reference or c.name in wanted]


def _result(target: str, items: list[Measured], choice: Choice, files: list[Path], parity: dict[str, Any],
            images: int, cfg: ExportConfig, tuned: dict[str, Any] | None = None, left_out: list[str] = ()) -> ExportResult:
    """The pick as an export: the table and why in the notes, every candidate's row in the details."""
    from kdiqa_edge.bench.environment import cpu_info, gpus

    pick, machine = choice.pick, cpu_info()
    reference = next(i for i in items if i.candidate.reference)
    ran_off = [i.name for i in items if choice.batch in i.runoff]
    accelerators = sorted({i.candidate.provider for i in items} - {"cpu"})
    gpu = gpus() if accelerators else []  # nvidia-smi's "name, driver, memory" lines
    on_gpu = f" and {gpu[0].split(',')[0]} ({', '.join(accelerators)})" if gpu else ""
    timing = choice.timing or {"protocol": "side by side in one process", "rounds": ROUNDS,
                               "runoff_rounds": RUNOFF_ROUNDS}
    isolated = "turn_seconds" in timing
    rounds, runoff_rounds = timing["rounds"], timing["runoff_rounds"]
    # how each is ranked: isolated.rank_isolated keeps a candidate's fastest turn's median, side by side its
    # median over every round
    how = (f"each in processes of its own, the fastest of {rounds} alternated turns' medians" if isolated
           else f"median of {rounds} alternated rounds")
    # "here": the CPU and threads are the export's one environment line (and details.auto.cpu)
    summary = (f"{target}-auto: {len(items)} candidates measured here{on_gpu} ({how}"
               + (f"; {', '.join(ran_off)} re-timed head to head, {runoff_rounds} rotated rounds"
                           if ran_off else "")
               + f"); drift on {images} test images vs {reference.name}")
    drift = {**pick.drift, "latency": {**{str(b): v for b, v in pick.latency.items()}, "cpu": machine,
                                       "threads": cfg.threads, "provider": pick.candidate.provider}}
    auto = {"pick": pick.name, "why": choice.why, "max_drift": cfg.max_drift, "min_speedup": cfg.min_speedup,
            "declined": choice.declined,
            "ranked_at_batch": choice.batch, "tie": TIE, "rounds": rounds,
            "runoff": {"margin": RUNOFF, "rounds": runoff_rounds, "contenders": ran_off,
                       **({"turn_seconds": timing["turn_seconds"]} if isolated else {"runs": RUNOFF_RUNS})},
            "timing": {k: v for k, v in timing.items() if k not in ("rounds", "runoff_rounds")},
            **({"runtime": pick.candidate.runtime} if pick.candidate.runtime != target else {}),
            "threads": cfg.threads, "cpu": machine, **({"gpus": gpu} if accelerators else {}),
            "candidates": [i.row() for i in items], **({"left_out": list(left_out)} if left_out else {}),
            **({"tuned": tuned} if tuned else {})}
    return ExportResult(target=target, precision=pick.candidate.precision, files=files, parity=parity, drift=drift,
                        notes=[summary, *table(items, pick), choice.why, *left_out,
                               *([tuned["note"]] if tuned else [])],
                        extra={**pick.candidate.extra, "auto": auto, "recipe": pick.candidate.recipe})


class Auto:
    """A target's `--precision auto`, with the Target protocol's `export` (what the pipeline calls)."""

    def __init__(self, target: AutoTarget, log: Callable[[str], None] = print, timer: Timer | None = None):
        self.target, self.log, self.timer = target, log, timer
        self.name = target.name

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        return export_auto(self.target, model, examples, out, cfg, meta, timer=self.timer, log=self.log)
