"""Benchmark several artifacts of one model: latency, facts, accuracy and drift vs a reference (torch-free).

Every model is loaded first (facts, warm-up, accuracy, one at a time), then timed side by side: `rounds`
rounds, each model's turn one untimed run (the switch from the previous model) and its share of the runs,
the order rotated every round, so a load that drifts while the bench runs hits every model alike and their
ratios hold on a shared machine. All the models are in memory together while they are timed.

A model that fails to load or run gets a row with its status and reason; the others still run. A path that
does not exist is refused before any work; a model that may have trained on the run's test split bench scores
is refused right after its load (accuracy.LeakCheck).

With `teacher`, the teacher is benched in every runtime here (bench/teacher.py) and the fastest of its rows is the
one the speed-ups are against (`BenchReport.teacher`). With a gate (`BenchConfig.gate`, bench/gate.py), every
model row (not the reference, not the teacher's) is judged against its bounds (`BenchReport.gate`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kdiqa_edge.bench import facts
from kdiqa_edge.bench.accuracy import (
    SYNTHETIC,
    Drift,
    EvalData,
    EvalSource,
    LeakCheck,
    drift,
    eval_source,
    score_eval_set,
)
from kdiqa_edge.bench.environment import environment
from kdiqa_edge.bench.gate import Figures, Gate, GateResult
from kdiqa_edge.bench.latency import (
    LatencyStats,
    PreprocessStats,
    latency_input,
    time_preprocessing,
    timed_run,
)
from kdiqa_edge.errors import ConfigError, KdiqaError
from kdiqa_edge.metrics import IQAMetrics

FORMAT_NAMES = {"onnx": "ONNX", "tensorrt": "TensorRT", "coreml": "CoreML", "executorch": "ExecuTorch",
                "openvino": "OpenVINO", "torch": "PyTorch"}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # latency is measured at each
    threads: int | None = None  # CPU threads for inference (None: the runtime's default)
    warmup: int = 10  # untimed runs before timing, per batch size
    runs: int = 50  # timed runs per batch size
    rounds: int = 5  # the runs are spread over this many rounds, every model timed in each (side by side)
    provider: str | None = None  # onnxruntime execution provider / torch device / CoreML compute units
    split_seed: int | None = None  # the eval split is the test part of this split; None: the reference run's
    # own split (its split.json), else seed 0
    max_images: int | None = None  # cap on eval images (None: the whole test split)
    accuracy: bool = True  # score the eval split (off: latency and facts only)
    eval_batch_size: int = 32  # batch size for scoring the eval split
    preprocess_images: int = 32  # files timed for preprocessing (decode to model input)
    gate: Gate = dataclasses.field(default_factory=Gate)  # the release gate's bounds (none set: no gate)

    @property
    def timing_rounds(self) -> int:
        """The rounds the runs are spread over (at least one run per round)."""
        return max(1, min(self.rounds, self.runs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchResult:
    model: str  # the path as given
    name: str  # the row label: the export folder (onnx-int8), else the file name; parents added where they clash
    format: str  # ONNX, TensorRT, CoreML, ExecuTorch, PyTorch
    precision: str  # fp32 | fp16 | int8 | ?
    status: str = "ok"  # ok | failed
    stage: str | None = None  # where it failed: load, latency, accuracy
    reason: str | None = None  # one line
    reference: bool = False
    teacher: str | None = None  # a form of the teacher (torch, onnx-fp32, openvino-bf16...); None: not the teacher
    pretrained: bool | None = None  # as the artifact records; False: random init, its accuracy a smoke test
    backend: str | None = None  # onnxruntime, tensorrt, coreml, executorch, torch
    device: str | None = None
    input: str | None = None  # e.g. "uint8 NHWC 224"
    size_mb: float | None = None
    params: int | None = None
    macs: int | None = None  # one image
    load_s: float | None = None
    latency: list[LatencyStats] = dataclasses.field(default_factory=list)
    preprocessing: PreprocessStats | None = None
    metrics: IQAMetrics | None = None
    drift: Drift | None = None
    rss_delta_mb: float | None = None  # resident memory added by loading it, warming up and scoring the eval split
    peak_rss_mb: float | None = None  # the process's high-water mark after this model
    map_added_ms: float | None = None  # an export --with-map: what its score_map output adds at batch 1 (export's figure)

    def latency_at(self, batch_size: int) -> LatencyStats | None:
        return next((s for s in self.latency if s.batch_size == batch_size), None)

    @property
    def best_throughput(self) -> LatencyStats | None:
        return max(self.latency, key=lambda s: s.images_per_s) if self.latency else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        return out


@dataclasses.dataclass
class BenchReport:
    environment: dict
    config: BenchConfig
    dataset: dict | None  # name, origin, split, n, split_seed, split_file (None when accuracy is off or failed)
    results: list[BenchResult]
    notes: list[str] = dataclasses.field(default_factory=list)
    headline: str | None = None  # said before anything else: accuracy on the built-in set, not the user's data
    gate: GateResult | None = None  # the release gate's verdict, where bounds were given
    teacher: dict | None = None  # the teacher's fastest form and every model against it (bench/teacher.py)

    def to_dict(self) -> dict:
        return {"headline": self.headline, "environment": self.environment, "config": self.config.to_dict(),
                "dataset": self.dataset, "results": [r.to_dict() for r in self.results], "notes": self.notes,
                "gate": self.gate.to_dict() if self.gate is not None else None, "teacher": self.teacher}


def guess_precision(path: str | Path) -> str:
    """From the file name when the artifact cannot be opened: student.int8.onnx -> int8."""
    match = re.search(r"(fp32|bf16|fp16|int8|float32|float16)", Path(path).name.lower())
    return {"float32": "fp32", "float16": "fp16"}.get(match.group(1), match.group(1)) if match else "?"


def _format_of(path: str | Path) -> str:
    from kdiqa_edge.runtime.backends import backend_kind

    try:
        return FORMAT_NAMES.get(backend_kind(path), "?")
    except KdiqaError:
        return "?"


def _reason(exc: BaseException, path: str) -> str:
    """One line; the model's own path prefix is dropped (the row already names it)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if text.startswith(f"{path}: "):
        text = text[len(path) + 2:]
    if not isinstance(exc, KdiqaError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def _model_facts(result: BenchResult, model) -> None:
    path = Path(result.model)
    if model.backend.name == "torch" and not (path / "model.json").is_file():
        path = path / "checkpoints" / "best"  # a run dir: the weights, not the logs and exports beside them
    result.size_mb = facts.size_bytes(path) / 1e6
    if model.backend.name == "onnxruntime":
        result.params = facts.onnx_param_count(path)
        result.macs = facts.onnx_macs(path)
    elif model.backend.name == "torch":
        result.params, result.macs = _torch_facts(model)
    else:  # the exporter records them where the artifact cannot be read without its runtime (.pte)
        source = model.info.meta.get("source") or {}
        result.params = source.get("params") if isinstance(source, dict) else None
        result.macs = source.get("macs") if isinstance(source, dict) else None


def _torch_facts(model) -> tuple[int | None, int | None]:
    """Parameters (the usual count: nn.Parameters, frozen or not) and MACs via torch's flop counter.

    An ONNX graph's count differs slightly: batch norms are folded into convolutions there, and the
    head's anchors are constants.
    """
    torch = model.backend._torch
    module = model.backend.model
    params = sum(p.numel() for p in module.parameters())
    try:
        from torch.utils.flop_counter import FlopCounterMode

        size = model.preprocess.size
        x = torch.from_numpy(model.prepare(np.zeros((1, size, size, 3), np.uint8))).to(model.backend.device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(x)
        return int(params), int(counter.get_total_flops() // 2)
    except Exception:  # noqa: BLE001 - MACs are best effort
        return int(params), None


@dataclasses.dataclass
class Loaded:
    """A model between the two phases: loaded (facts, warm-up and accuracy done), waiting to be timed."""

    result: BenchResult
    model: object | None
    scores: np.ndarray | None = None
    eval_set: object | None = None
    inputs: dict[int, object] = dataclasses.field(default_factory=dict)  # batch size -> prepared batch
    times: dict[int, list[float]] = dataclasses.field(default_factory=dict)


def load_one(path: str, cfg: BenchConfig, eval_data: EvalData | None, progress=None,
             reference: bool = False, stop_spinning: bool = False, leak_check: LeakCheck | None = None) -> Loaded:
    """Load, facts, warm-up at every batch size, accuracy. Never raises for a model's own fault.
    stop_spinning: ONNX Runtime's workers stop spinning when each run returns (models timed side by side);
    spin-waiting itself is what the file records, else ORT's default (on).
    leak_check: judges the model's recorded source right after the load, before any timing or scoring; its
    refusal (a model that may have trained on the eval images) is raised, not a row."""
    import time

    from kdiqa_edge.runtime import QualityModel

    result = BenchResult(model=str(path), name=Path(path).name, format=_format_of(path),
                         precision=guess_precision(path), reference=reference)
    loaded = Loaded(result, None)
    rss_before = facts.current_rss_mb()
    stage = "load"
    try:
        start = time.perf_counter()
        model = loaded.model = QualityModel.load(path, provider=cfg.provider, threads=cfg.threads,
                                                 stop_spinning=stop_spinning)
        result.load_s = time.perf_counter() - start
        info = model.info
        result.precision, result.backend, result.device = info.precision, model.backend.name, model.backend.device
        result.pretrained = info.pretrained
        result.format = FORMAT_NAMES.get(model.backend.name if model.backend.name != "onnxruntime" else "onnx",
                                         result.format)
        result.input = f"{info.input.dtype} {info.input.layout} {info.input.size}"
        if leak_check is not None and eval_data is not None:
            stage = "source"
            leak_check.check(path, info.source)
        stage = "facts"
        _model_facts(result, model)
        stage = "latency"
        for batch_size in cfg.batch_sizes:
            if progress:
                progress(f"{result.name}: warm-up @ batch {batch_size}")
            x = loaded.inputs[batch_size] = latency_input(model, batch_size)
            for _ in range(cfg.warmup):
                model.run(x)
            model.backend.synchronize()
        if eval_data is not None:
            stage = "data"
            if progress:
                progress(f"{result.name}: accuracy")
            loaded.eval_set = eval_data.get(model.preprocess)
            stage = "accuracy"
            loaded.scores, result.metrics = score_eval_set(model, loaded.eval_set, cfg.eval_batch_size)
            stage = "preprocessing"
            result.preprocessing = time_preprocessing(loaded.eval_set.files[:cfg.preprocess_images],
                                                      model.preprocess, model)
    except Exception as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        if stage in ("data", "source"):
            raise  # the dataset is unusable for every model, or this model's figures on it: say so once
        _fail(loaded, stage, exc)
    rss_after = facts.current_rss_mb()
    result.rss_delta_mb = rss_after - rss_before if rss_after is not None and rss_before is not None else None
    result.peak_rss_mb = facts.peak_rss_mb()
    return loaded


def _fail(loaded: Loaded, stage: str, exc: BaseException) -> None:
    result = loaded.result
    result.status, result.stage, result.reason = "failed", stage, _reason(exc, result.model)
    loaded.model = None  # frees it; a failed model is not timed


def time_side_by_side(items: list[Loaded], cfg: BenchConfig, bar=None) -> None:
    """Latency of every loaded model at each batch size, in rounds: each turn one untimed run and the round's
    share of `runs` timed ones (runs // rounds, one more in the first runs % rounds rounds: `runs` in all, as
    the report says), the order rotated every round (a model that fails is dropped).
    `bar`: a console.Progress advanced once per round."""
    rounds = cfg.timing_rounds
    for batch_size in cfg.batch_sizes:
        live = [item for item in items if item.model is not None]
        for item in live:
            item.times[batch_size] = []
        for round_index in range(rounds):
            if bar is not None:
                bar.update(f"batch {batch_size}, round {round_index + 1}/{rounds}")
            shift = round_index % max(len(live), 1)
            per_turn = cfg.runs // rounds + (1 if round_index < cfg.runs % rounds else 0)
            for item in live[shift:] + live[:shift]:
                if item.model is None:
                    continue
                x = item.inputs[batch_size]
                try:
                    item.model.run(x)
                    item.times[batch_size] += [timed_run(item.model, x) for _ in range(per_turn)]
                except Exception as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    _fail(item, "latency", exc)
            if bar is not None:
                bar.advance()
        for item in live:
            if item.model is not None:
                item.result.latency.append(LatencyStats.from_times(batch_size, item.times[batch_size]))


def bench_one(path: str, cfg: BenchConfig, eval_data: EvalData | None, progress=None,
              reference: bool = False) -> tuple[BenchResult, np.ndarray | None, object | None]:
    """One model alone: its row, with the eval scores and eval set (for drift)."""
    loaded = load_one(path, cfg, eval_data, progress, reference)
    time_side_by_side([loaded], cfg)
    return loaded.result, loaded.scores, loaded.eval_set


def check_gate(cfg: BenchConfig, reference: str | Path | None) -> None:
    """A gate whose figures this bench would not measure is refused before any work."""
    gate = cfg.gate
    if (gate.srcc is not None or gate.plcc is not None or gate.max_drift is not None) and not cfg.accuracy:
        raise ConfigError("--fail-under and --max-drift need the accuracy figures: drop --no-accuracy")
    if gate.max_drift is not None and reference is None:
        raise ConfigError("--max-drift bounds |ΔSRCC| against the reference: give --reference")
    if gate.max_latency_ms is not None and 1 not in cfg.batch_sizes:
        raise ConfigError("--max-latency-ms bounds the p50 latency at batch 1: --batch-sizes must include 1")


def check_floors(cfg: BenchConfig, source: EvalSource | None) -> None:
    """SRCC/PLCC floors hold a model to its accuracy on the user's data: on the built-in synthetic set, which
    bench falls back to when nothing names a dataset, a pass or a failure would say nothing of it."""
    gate = cfg.gate
    if source is not None and source.origin == SYNTHETIC and (gate.srcc is not None or gate.plcc is not None):
        raise ConfigError(f"--fail-under bounds SRCC/PLCC on your data, but bench would score the built-in "
                          f"synthetic set ({source.reason}): pass --reference RUN_DIR or the dataset options "
                          "(--dataset NAME --root DIR)")


def check_paths(models: Sequence[str | Path], reference: str | Path | None,
                teacher: Sequence[str | Path] = ()) -> None:
    """A path that does not exist is refused before any work: a missing --reference would otherwise leave the
    eval data to the built-in set, and a missing model only a failed row."""
    from kdiqa_edge.runtime.registry_uri import is_registry_uri

    def missing(path) -> bool:
        return not is_registry_uri(path) and not Path(path).exists()  # a registry URI is no path

    if reference is not None and missing(reference):
        raise ConfigError(f"--reference {reference}: no such file or directory")
    absent = [str(path) for path in models if missing(path)]
    if absent:
        raise ConfigError(f"no such model: {', '.join(absent)}")
    absent = [str(path) for path in teacher if missing(path)]
    if absent:
        raise ConfigError(f"--teacher {', '.join(absent)}: no such file or directory")


def gate_figures(result: BenchResult) -> Figures:
    """A row's figures, as the gate reads them."""
    if result.status != "ok":
        return Figures(result.name, failed=f"failed at {result.stage}: {result.reason}")
    at1 = result.latency_at(1)
    return Figures(result.name, srcc=result.metrics.srcc if result.metrics else None,
                   plcc=result.metrics.plcc if result.metrics else None,
                   delta_srcc=result.drift.delta_srcc if result.drift else None,
                   p50_ms=at1.p50_ms if at1 else None, size_mb=result.size_mb)


def run_bench(models: Sequence[str | Path], reference: str | Path | None = None, data=None,
              cfg: BenchConfig = BenchConfig(), progress: bool = True,
              log: Callable[[str], None] | None = None, teacher: Sequence[str | Path] = (),
              teacher_runtimes: Sequence[str] | None = None) -> BenchReport:
    """Bench every model (the reference first, as its own row); the FP32 reference anchors the drift.

    Accuracy is measured on the reference run's dataset and split unless dataset options (`data`) are
    given (accuracy.eval_source); `log` gets, before any work, the line saying where the accuracy comes from
    when it is the built-in synthetic set, and the notes about the data and split.

    `teacher`: checkpoints, run dirs or artifacts of the teacher; a checkpoint is benched in every runtime of
    `teacher_runtimes` here (bench/teacher.py: all installed by default), its exports made first."""
    from kdiqa_edge.bench.teacher import no_teacher_note, same_path, teacher_forms, versus_teacher
    from kdiqa_edge.console import Progress

    check_paths(models, reference, teacher)
    check_gate(cfg, reference)
    source = eval_source(reference, data, cfg.split_seed, [*models, *teacher]) if cfg.accuracy else None
    check_floors(cfg, source)
    leak_check = LeakCheck(source) if source is not None else None
    if log is not None and source is not None:
        for line in ([source.headline] if source.headline else []) + list(source.notes):
            log(line)
    forms, teacher_notes = teacher_forms(teacher, teacher_runtimes, data, cfg.threads, progress, log) \
        if teacher else ([], [])
    eval_data = EvalData(source, max_images=cfg.max_images, progress=progress) if source is not None else None
    ref_form = next((f.label for f in forms if reference and same_path(f.path, reference)), None)
    paths = ([(str(reference), True, ref_form)] if reference else []) + [
        (form.path, False, form.label) for form in forms if form.label != ref_form or not reference] + [
        (str(m), False, None) for m in models]
    results: list[BenchResult] = []
    notes: list[str] = (list(source.notes) if source is not None else []) + teacher_notes
    ref_scores = ref_set = None

    loaded: list[Loaded] = []
    # side by side, ONNX Runtime's workers stop spinning when a run returns: an idle session's workers would
    # otherwise spin on into the next model's turn and take the cores (on a 2-vCPU VM that doubled latencies)
    side_by_side = len(paths) > 1
    with Progress("bench", len(paths), unit="models", enabled=progress, transient=True) as bar:
        for path, is_reference, form in paths:
            bar.update(f"{Path(path).name}: load")
            # the teacher's forms are the yardstick, judged by neither the gate nor the leak check
            item = load_one(path, cfg, eval_data, progress=bar.update, reference=is_reference,
                            stop_spinning=side_by_side, leak_check=leak_check if form is None else None)
            item.result.teacher = form
            loaded.append(item)
            notes.extend(item.model.notes if item.model is not None else ())
            result, scores, eval_set = item.result, item.scores, item.eval_set
            if is_reference:
                ref_scores, ref_set = scores, eval_set
                if result.status != "ok":
                    notes.append(f"reference {path} failed ({result.reason}): no drift figures")
                elif ref_scores is not None and float(np.std(ref_scores)) < 1e-3:
                    notes.append(f"the reference's scores are nearly constant (std {float(np.std(ref_scores)):.1e}, an "
                                 "untrained model?): rank metrics and their deltas then follow 1e-7 float noise; "
                                 "read the |score difference| columns for drift")
            elif scores is not None and ref_scores is not None and result.metrics is not None:
                ref_metrics = results[0].metrics
                aligned = _align(ref_set.names, ref_scores, eval_set.names)
                if aligned is None:
                    notes.append(f"{result.name}: its eval images differ from the reference's: no drift figures")
                else:
                    result.drift = drift(result.metrics, scores, ref_metrics, aligned)
            results.append(result)
            bar.advance()
    sessions = sum(1 for item in loaded if item.model is not None and item.result.backend == "onnxruntime")
    if side_by_side and sessions:
        notes.append(f"the {sessions} ONNX Runtime session(s) timed side by side stopped spinning when each run "
                     "returned (session.force_spinning_stop; idle sessions' spinning workers would take the cores "
                     "between turns); spin-waiting within a run was as each file records, else ORT's default (on)")
    with Progress("latency", cfg.timing_rounds * len(cfg.batch_sizes), unit="rounds", enabled=progress, transient=True) as bar:
        time_side_by_side(loaded, cfg, bar)
    loaded.clear()
    notes.extend(leak_check.notes if leak_check is not None else ())
    _distinct_names(results)
    for result in results:
        if result.teacher is not None:
            result.name = f"teacher:{result.teacher}"
    for result in results:
        notes.extend(map_note(result))
    untrained = list(dict.fromkeys(r.name for r in results if r.pretrained is False))
    if untrained:  # first among the notes: it says what every accuracy figure in the table is worth
        one = len(untrained) == 1
        notes.insert(0, f"{', '.join(untrained)} {'is' if one else 'are'} not pretrained (random init): "
                        f"{'its' if one else 'their'} SRCC, PLCC and drift are a smoke test of the pipeline, "
                        "not image quality")
    dataset = None
    if eval_data is not None and eval_data._sets:
        notes.extend(eval_data.notes)
        first = next(iter(eval_data._sets.values()))
        dataset = {"name": first.dataset, "origin": source.origin, "source": source.describe(),
                   "split": first.split, "n": len(first.names), "split_seed": source.split_seed,
                   "split_file": None if eval_data.notes or source.split_file is None else str(source.split_file),
                   "spec": source.dataset.to_dict()}
    gated = [r for r in results if not r.reference and r.teacher is None]
    batch = 1 if 1 in cfg.batch_sizes else min(cfg.batch_sizes)
    versus = versus_teacher(results, batch) if forms else None
    if forms and versus is None:  # said, not left to a missing line
        notes.append(no_teacher_note(results, batch))
    return BenchReport(environment=environment(cfg.threads), config=cfg, dataset=dataset, results=results,
                       notes=notes, headline=source.headline if source is not None else None,
                       gate=cfg.gate.check([gate_figures(r) for r in gated]) if cfg.gate.active else None,
                       teacher=versus)


def export_entry(path: str | Path) -> tuple[str, dict] | None:
    """(the folder an export wrote this file into: onnx-auto, onnx-int8, its manifest entry) where
    OUT/<target>-<precision>/FILE has OUT/manifest.json listing it, else None."""
    folder = Path(os.path.abspath(path)).parent  # abspath: a symlink keeps its own place
    manifest = folder.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        exports = json.loads(manifest.read_text(encoding="utf-8")).get("exports")
    except (OSError, ValueError, AttributeError):
        return None
    entry = exports.get(folder.name) if isinstance(exports, dict) else None
    return (folder.name, entry) if isinstance(entry, dict) else None


def export_folder(path: str | Path) -> str | None:
    """The folder an export wrote this file into (onnx-auto, onnx-int8), else None. The file name alone cannot
    tell auto's pick from the rest."""
    found = export_entry(path)
    return found[0] if found else None


def map_note(result: BenchResult) -> list[str]:
    """An export --with-map times its score_map output with the score (one graph): the latency the map adds,
    as its export measured it (the same model without the map, alternate runs), in the row and one note."""
    found = export_entry(result.model)
    latency = ((found[1].get("details") or {}).get("map") or {}).get("latency") if found else None
    if not isinstance(latency, dict) or latency.get("added_ms") is None:
        return []
    result.map_added_ms = float(latency["added_ms"])
    return [f"{result.name}: has the score_map output (export --with-map), which adds {result.map_added_ms:.2f} ms "
            f"at batch 1 ({latency.get('with_map_p50_ms')} vs {latency.get('without_map_p50_ms')} ms without, "
            "measured by its export)"]


def _distinct_names(results: list[BenchResult]) -> None:
    """Rows are named by their export folder (onnx-auto, onnx-int8) where an export wrote them, else by file
    name; two files in one export folder add their file name (model.onnx and its .engine), and names that
    still clash (every run's exports have an onnx-fp32) get as many parent folders as it takes to tell them
    apart. The same path given twice keeps one name."""
    paths = [os.path.abspath(r.model) for r in results]  # abspath: a symlink keeps its own name
    folders = [export_folder(r.model) for r in results]
    chains: list[tuple[str, ...]] = []
    for path, folder in zip(paths, folders):
        parts = Path(path).parts
        shared = folder is not None and any(Path(p).parent == Path(path).parent for p in paths if p != path)
        chains.append(parts[:-1] + ((parts[-1],) if shared else ()) if folder else parts)
    tail = [2 if folders[i] and chains[i][-1] != folders[i] else 1 for i in range(len(results))]
    while True:
        names = ["/".join(chain[-d:]) for chain, d in zip(chains, tail)]
        clash = [i for i, name in enumerate(names)
                 if any(n == name and paths[j] != paths[i] for j, n in enumerate(names)) and tail[i] < len(chains[i])]
        if not clash:
            break
        for i in clash:
            tail[i] += 1
    for result, name in zip(results, names):
        result.name = name


def _align(ref_names: list[str], ref_scores: np.ndarray, names: list[str]) -> np.ndarray | None:
    if ref_names == names:
        return ref_scores
    lookup = dict(zip(ref_names, ref_scores))
    if not all(name in lookup for name in names):
        return None
    return np.asarray([lookup[name] for name in names], np.float32)

