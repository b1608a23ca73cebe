"""The `onnx` target: ScoreModel -> ONNX (FP32, FP16, INT8 U8S8 Q/DQ for ONNX Runtime on CPUs), and its
candidates for `--precision auto` (export/auto.py): FP32, every INT8 recipe the graph calls for, FP16 where
an accelerator execution provider runs it.

Also the ONNX building blocks the `tensorrt` target reuses: the FP32 graph (dynamic batch, simplified,
checker-clean, IR <= 10), metadata, parity against PyTorch, and the per-precision conversion + drift report.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.errors import ExportError
from kdiqa_edge.export.base import (
    Examples,
    ExportConfig,
    ExportResult,
    Supports,
    model_input,
    register_target,
)

MAX_IR_VERSION = 10  # TensorRT 10.x's parser and older runtimes read IR <= 10
# Graph regions kept in float in FP16/INT8 models: the folded head (a per-tensor scale across 5 logits would
# round small differences away; an FP16 sum of squares can overflow) and the folded input normalization.
FLOAT_SCOPES = ("/head/", "/input_norm/", "/model/head/")
# ... and their second calls: the TorchScript exporter names a module's second call `/head_1/` (--with-map runs
# the head on the pooled features and again per position)
_FLOAT_SCOPE = re.compile(r"/(?:head|input_norm)(?:_\d+)?/")
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


def score_model(model, cfg: ExportConfig):
    from kdiqa_edge.models.score import ScoreModel

    return ScoreModel(model, input=cfg.input, layout=cfg.layout, with_probs=cfg.with_probs, with_map=cfg.with_map)


def export_fp32(scored, path: Path, opset: int) -> Path:
    """Trace to ONNX with a dynamic batch axis, simplify with onnxslim, pin IR <= 10, run the checker."""
    import onnx
    import onnxslim
    import torch

    names = scored.output_names
    dynamic = {name: {0: "batch"} for name in ["image", *names]}
    raw = path.with_suffix(".raw.onnx")
    from kdiqa_edge.export.layouts import traced

    # traced(): among others MobileViT's unfold as one transpose of whole channel rows, which ONNX Runtime
    # runs fast in uint8 as well (mobilevit_s INT8 1.16x -> 1.31x FP32 here; see export/layouts.py)
    with warnings.catch_warnings(), torch.no_grad(), traced():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: deterministic, fast, and it names nodes by module scope (/head/...),
        # which is how the head is kept in float when quantizing.
        torch.onnx.export(scored, (scored.example_input(2),), str(raw), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic,
                          do_constant_folding=True)
    graph = onnxslim.slim(onnx.load(str(raw)))
    raw.unlink()
    graph.ir_version = min(graph.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def set_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    from kdiqa_edge import artifact

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in sorted(artifact.encode(meta).items()):
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "kdiqa-edge"
    onnx.save(graph, str(path))


def float_nodes(path: Path, stem: bool = False) -> list[str]:
    """Names of the nodes that stay in float: the head, the input normalization, and the node that produces
    the head's input (the projection into CLIP's space), so the features reach the head unquantized; with
    `stem`, also the first Conv/MatMul/Gemm (the stem conv or patch embedding), so its input is not re-rounded.

    Why the stem: a per-tensor 8-bit grid over the normalized input (about 4 units wide) has a step of about
    one grey level that does not line up with the pixel grid, so quantizing the stem's input adds noise of
    about 0.3 grey levels RMS, which is the kind of signal an IQA model measures. Measured on 64 px test_resnet
    students trained on the synthetic set: INT8 score error / FP32 score spread 0.147 -> 0.049 and |delta SRCC|
    0.033 -> 0.004 with the stem in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    keep = [n for n in graph.node if _FLOAT_SCOPE.search(n.name)]
    if stem:  # graph.node is topologically sorted: the first compute node is the stem
        keep += [next(n for n in graph.node if n.op_type in COMPUTE_OPS and n not in keep)]
    names = {n.name for n in keep}
    producers = {output: n for n in graph.node for output in n.output}
    for node in keep:
        if "/input_norm" in node.name:
            continue
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and producer.name not in names and producer.op_type in ("Gemm", "MatMul"):
                names.add(producer.name)
    # a weight a kept conv/matmul reads stays float for every conv/matmul that reads it: Q/DQ quantizes an
    # initializer once, for all its readers (with --with-map the projection runs twice on one weight; had its
    # second call been quantized, the score's projection would have read the int8 weight too)
    # (the weight only: onnxslim shares equal initializers, and the zero biases of two convs are one tensor)
    initializers = {t.name for t in graph.initializer}
    kept_weights = {n.input[1] for n in graph.node if n.name in names and n.op_type in COMPUTE_OPS
                    and len(n.input) > 1 and n.input[1] in initializers}
    names |= {n.name for n in graph.node if n.op_type in COMPUTE_OPS and len(n.input) > 1
              and n.input[1] in kept_weights}
    return [n.name for n in graph.node if n.name in names]


def to_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and compute, FP32 inputs/outputs; the head stays in float."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from kdiqa_edge.export.fp16_graph import drop_round_trips, drop_twin_nodes, toposort

    kept = float_nodes(src)
    graph = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, node_block_list=kept)
    drop_round_trips(graph.graph, set(kept))
    drop_twin_nodes(graph.graph)
    toposort(graph.graph)  # the converter appends its input casts at the end of the node list
    graph.ir_version = min(graph.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(dst))
    return dst


def build(model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any], *, form: str,
          tolerance: dict[str, float], stem: str = "model") -> ExportResult:
    """FP32 ONNX -> the requested precision in `out`, checked against PyTorch; `form` is the INT8 Q/DQ form."""
    from kdiqa_edge.export import evaluate, quantize, recipes

    scored = score_model(model, cfg)
    meta = {**meta, "input": scored.input_spec(), "outputs": scored.output_names, "precision": cfg.precision}
    result = ExportResult(target=meta["target"], precision=cfg.precision, files=[],
                          extra={"input": meta["input"], "outputs": meta["outputs"], "opset": cfg.opset})
    with tempfile.TemporaryDirectory(prefix="kdiqa-onnx-") as scratch:
        fp32 = export_fp32(scored, Path(scratch) / "model.fp32.onnx", cfg.opset)
        final = out / f"{stem}.{cfg.precision}.onnx"
        if cfg.precision == "fp32":
            final.write_bytes(fp32.read_bytes())
        elif cfg.precision == "fp16":
            to_fp16(fp32, final)
        elif form == "u8s8":  # ONNX Runtime on CPUs: a recipe chosen by name, the stem per --int8-stem
            graph = int8_graph(fp32, scored, examples, cfg, Path(scratch))
            recipe = recipes.named(cfg.int8_recipe, graph.facts, stem=cfg.int8_stem)
            graph.build(recipe, final)
            meta["recipe"] = recipe.name
            result.extra["int8"] = {"form": form, "calibration_images": len(graph.calib),
                                    "calibration_method": cfg.calib_method, "head": "float", "stem": recipe.stem,
                                    "recipe": recipe.to_dict(), "graph": graph.facts.summary()}
        else:  # TensorRT's symmetric Q/DQ form: every op, per-channel (TensorRT picks its own kernels)
            calib = model_input(examples.calib, scored.input_spec(), scored.preprocess)
            quantize.int8(fp32, final, calib, form=form, method=cfg.calib_method,
                          keep_float=float_nodes(fp32, stem=cfg.int8_stem == "float"))
            result.extra["int8"] = {"form": form, "calibration_images": len(calib),
                                    "calibration_method": cfg.calib_method, "per_channel": True,
                                    "head": "float", "stem": cfg.int8_stem}
        set_metadata(final, meta)
        result.files.append(final)

        # parity: the artifact vs the source model in torch, on real images
        inputs = model_input(examples.parity, scored.input_spec(), scored.preprocess)
        reference = evaluate.torch_reference(model, examples.parity)
        sess = evaluate.session(final, cfg.threads, fp16=cfg.precision == "fp16")
        result.parity = evaluate.parity(reference, evaluate.predict(sess, inputs), tolerance.get(cfg.precision))
        if result.parity.get("passed") is False:
            raise ExportError(f"{final.name}: parity check failed, max |score - torch score| = "
                              f"{result.parity['max_abs_diff']:.2e} > {tolerance[cfg.precision]:.0e}")
        if cfg.with_map:
            result.extra["map"] = check_map(model, final, examples, cfg, meta, tolerance, Path(scratch))
            result.notes.extend(evaluate.map_notes(result.extra["map"], final.name))
        # a static ONNX Runtime INT8 is timed once, head to head with FP32 and the other stem choice (below)
        alternative = cfg.precision == "int8" and form == "u8s8" and recipe.mode == "static"
        if cfg.precision != "fp32":
            result.drift = drift_report(fp32, final, examples, scored, cfg, timed=not alternative)
        if alternative:
            measured = measure_alternative(graph, recipe, fp32, final, examples, cfg, meta, Path(scratch))
            result.drift["latency"] = {**measured.pop("latency"), **result.drift["latency"]}
            result.extra["int8"]["alternative"] = measured
        if cfg.precision != "fp32":
            result.notes.extend(drift_notes(result.drift, cfg.precision, final.name, form, cfg.max_drift))
        if alternative:
            result.notes.append(measured["note"])
    return result


def check_map(model, final: Path, examples: Examples, cfg: ExportConfig, meta: dict[str, Any],
              tolerance: dict[str, float], work: Path) -> dict[str, Any]:
    """The exported `score_map` vs torch (export/evaluate.py:map_report); at fp32 also the same export without
    the map, built in `work`: the score output must be bit-identical to it, and the map's added latency."""
    import dataclasses

    from kdiqa_edge.export import evaluate

    twin = None
    if cfg.precision == "fp32":
        plain = score_model(model, dataclasses.replace(cfg, with_map=False))
        twin = export_fp32(plain, work / "without-map.onnx", cfg.opset)
        set_metadata(twin, {**meta, "outputs": plain.output_names})
    return evaluate.map_report(model, final, examples.parity, tolerance.get(cfg.precision), cfg.threads,
                               without_map=twin, runs=cfg.latency_runs)


class Int8Graph:
    """One FP32 graph ready for INT8 recipes: its facts, head nodes and calibration inputs, one calibration
    per set of quantized op types (the ranges of a tensor do not depend on the recipe)."""

    def __init__(self, fp32: Path, calib: np.ndarray, method: str, work: Path):
        import onnx

        from kdiqa_edge.export import recipes

        self.fp32, self.calib, self.method, self.work = fp32, calib, method, work
        self.head = float_nodes(fp32)
        self.facts = recipes.graph_facts(onnx.load(str(fp32), load_external_data=False), ignore=self.head)

    def build(self, recipe, path: Path) -> Path:
        from kdiqa_edge.export import quantize

        key = "-".join(recipe.op_types) or "all"
        cache = self.work / f"calibration-{self.method}-{key}-{recipe.optimizer or 'plain'}.json"
        return quantize.int8(self.fp32, path, self.calib, form="u8s8", method=self.method, recipe=recipe,
                             keep_float=self.head + recipe.nodes_to_exclude(self.facts), calibration_cache=cache)


def int8_graph(fp32: Path, scored, examples: Examples, cfg: ExportConfig, work: Path) -> Int8Graph:
    calib = model_input(examples.calib, scored.input_spec(), scored.preprocess)
    return Int8Graph(fp32, calib, cfg.calib_method, work)


def measure_alternative(graph: Int8Graph, recipe, fp32: Path, final: Path, examples: Examples, cfg: ExportConfig,
                        meta: dict[str, Any], work: Path) -> dict[str, Any]:
    """The same recipe with the other stem choice, timed head to head with FP32 and the shipped INT8 (rotated
    rounds, same test images; these are the export's latency figures for FP32 and the shipped INT8 too: one
    measurement per artifact), so the note can say what the other choice would cost or gain here."""
    from kdiqa_edge.export import auto

    other = recipe.with_stem("int8" if recipe.stem == "float" else "float")
    folder = work / "alternative"
    folder.mkdir()
    path = graph.build(other, folder / "model.int8.onnx")
    set_metadata(path, {**meta, "recipe": other.name})
    # the scratch FP32 graph gets its metadata too, so the runtime can load it
    set_metadata(fp32, {**{k: v for k, v in meta.items() if k != "recipe"}, "precision": "fp32"})
    quiet = {"stop_spinning": True}  # three sessions in one process: see candidates()
    items = [auto.Measured(auto.Candidate("fp32", "fp32", build=None, reference=True, load=quiet), path=fp32),
             auto.Measured(auto.Candidate(recipe.name, "int8", build=None, load=quiet), path=final),
             auto.Measured(auto.Candidate(other.name, "int8", build=None, load=quiet), path=path)]
    models = auto.load_models(items, cfg.threads)
    auto.measure_drift(items, models, examples)
    auto.measure_runoff(items, models, examples.test, 1)
    models.clear()
    reference, shipped, alt = items
    speed = shipped.p50(1) / alt.p50(1)
    change = "faster" if speed >= 1 else "slower"
    note = (f"{final.name}: with the stem in {other.stem} instead (the alternative) it would be "
            f"{max(speed, 1 / speed):.2f}x {change} ({alt.p50(1):.2f} vs {shipped.p50(1):.2f} ms at batch 1) at "
            f"ΔSRCC {alt.drift['delta_srcc']:+.4f} (this export {shipped.drift['delta_srcc']:+.4f}), mean |Δscore| "
            f"{alt.drift['mean_abs_diff_vs_fp32']:.4f} (this export {shipped.drift['mean_abs_diff_vs_fp32']:.4f}); "
            f"pass --int8-stem {other.stem} to ship it instead")
    timed = {"runs": auto.RUNOFF_ROUNDS * auto.RUNOFF_RUNS, "batch": 1, "protocol": "head to head, rotated rounds"}
    return {"recipe": other.name, "note": note, "speed_vs_shipped": round(speed, 3),
            "latency": {"fp32": {"p50_ms": reference.p50(1), **timed}, "int8": {"p50_ms": shipped.p50(1), **timed},
                        "alternative": {"p50_ms": alt.p50(1), **timed}},
            "drift": alt.drift, "shipped_drift": shipped.drift}


def drift_report(fp32: Path, reduced: Path, examples: Examples, scored, cfg: ExportConfig,
                 timed: bool = True) -> dict[str, Any]:
    """SRCC/PLCC of the reduced-precision model vs the FP32 one on the test split, and (`timed`) both
    latencies here (with the CPU they ran on: INT8 speed depends on its instruction set)."""
    from kdiqa_edge.bench.environment import cpu_info
    from kdiqa_edge.export import evaluate

    inputs = model_input(examples.test, scored.input_spec(), scored.preprocess)
    ref_session = evaluate.session(fp32, cfg.threads)
    low_session = evaluate.session(reduced, cfg.threads, fp16=cfg.precision == "fp16")
    report = evaluate.drift(evaluate.predict(ref_session, inputs), evaluate.predict(low_session, inputs),
                            examples.test_mos)
    report["latency"] = {"runtime": "onnxruntime CPUExecutionProvider", "threads": cfg.threads, "cpu": cpu_info()}
    if timed:
        report["latency"].update({"fp32": evaluate.latency_ms(ref_session, inputs, cfg.latency_runs),
                                  cfg.precision: evaluate.latency_ms(low_session, inputs, cfg.latency_runs)})
    return report


def drift_notes(report: dict[str, Any], precision: str, name: str, form: str, max_drift: float) -> list[str]:
    """The drift check with its verdict, and both latencies (the CPU is the export's one environment line)."""
    from kdiqa_edge.export import evaluate

    fp32_ms = report["latency"]["fp32"]["p50_ms"]
    low_ms = report["latency"][precision]["p50_ms"]
    notes = [f"{name}: drift vs FP32: SRCC {report['reduced']['srcc']:.4f} vs {report['fp32']['srcc']:.4f} "
             f"(ΔSRCC {report['delta_srcc']:+.4f}, ΔPLCC {report['delta_plcc']:+.4f}) on {report['images']} test "
             f"images, {evaluate.drift_verdict(report['delta_srcc'], max_drift)}",
             f"{name}: latency at batch 1, ONNX Runtime CPU: {precision.upper()} {low_ms:.2f} ms, FP32 {fp32_ms:.2f} ms"]
    if form == "s8s8":  # the TensorRT target's ONNX (its FP16 too): its speed is the engine's, on the GPU
        emulated = " (FP16 is emulated on CPUs)" if precision == "fp16" else ""
        notes.append(f"{name}: these latencies are the TensorRT-ready {precision.upper()} ONNX under ONNX Runtime "
                     f"on this CPU{emulated}, not the engine's speed: bench the engine on the device")
    elif low_ms > fp32_ms:
        notes.append(f"{name}: {precision.upper()} is SLOWER than FP32 on this machine "
                     f"({low_ms:.2f} ms vs {fp32_ms:.2f} ms): ship the FP32 model for ONNX Runtime here")
    return notes


# Execution providers that run FP16 on an accelerator (short names as the runtime takes them). FP16 on the
# CPU provider is emulated and slow, so FP16 is a candidate only where one of these is available.
ACCELERATORS = {"cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider", "dml": "DmlExecutionProvider"}


def _listed_accelerators(available: list[str] | None) -> dict[str, str]:
    """short name -> full name of the accelerator providers this onnxruntime lists (started or not)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return {short: full for short, full in ACCELERATORS.items() if full in available}


def accelerator_providers(available: list[str] | None = None, starts: Callable[[str], bool] | None = None) -> list[str]:
    """The accelerator providers this onnxruntime offers and that start on this machine, by short name (cuda,
    rocm, dml). onnxruntime-gpu lists CUDA on machines with no GPU, or without the CUDA libraries, too."""
    starts = starts or provider_starts
    return [short for short, full in _listed_accelerators(available).items() if starts(full)]


def accelerators_left_out(available: list[str] | None = None) -> list[str]:
    """One line per accelerator provider onnxruntime lists that does not start here (so it has no candidates),
    with onnxruntime's reason."""
    started = accelerator_providers(available)
    return [f"{full} is in this onnxruntime but does not start here ({provider_problem(full)}): "
            f"no fp16:{short} / fp32:{short} candidates"
            for short, full in _listed_accelerators(available).items() if short not in started]


def provider_starts(provider: str) -> bool:
    """Whether an onnxruntime session on `provider` (a full name) starts here."""
    return provider_problem(provider) is None


@functools.cache
def provider_problem(provider: str) -> str | None:
    """Why an onnxruntime session on `provider` (a full name) does not start here, None when it does: a
    one-node graph opened on it, once per process."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from kdiqa_edge.runtime.providers import open_session, preload_cuda_libraries, provider_reason

    preload_cuda_libraries(provider)
    tensor = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", tensor[:1], tensor[1:])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=MAX_IR_VERSION)
    onnx.checker.check_model(probe)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    fallback = ["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else []
    try:
        _, reason = open_session(probe.SerializeToString(), options, [provider, *fallback])
    except Exception as exc:  # noqa: BLE001 - any failure to start means: not a candidate here
        return provider_reason([], [], exc) or type(exc).__name__
    return reason


def tune_spinning(pick, final: Path, pixels: np.ndarray, cfg: ExportConfig, timer, log) -> dict[str, Any] | None:
    """ONNX Runtime's intra-op spin-waiting on and off for the pick alone, head to head on this machine (where
    other processes compete for the cores, spinning workers can cost more than they save). Off is recorded in
    the shipped file only when it is more than auto.TIE faster; `ort_spinning` in its metadata is what the
    runtime then applies. The on-session stops spinning when each run returns (as the candidates were timed),
    so it does not spin into the off-session's turn; within a run it spins as a served session does."""
    import onnx

    from kdiqa_edge import artifact
    from kdiqa_edge.export import auto
    from kdiqa_edge.runtime import QualityModel

    if pick.candidate.provider != "cpu":
        return None
    states = {"on": True, "off": False}
    batch = cfg.opt_batch
    pairs = [(pick, QualityModel.load(final, threads=cfg.threads, spinning=spin, stop_spinning=spin))
             for spin in states.values()]
    times = dict(zip(states, auto.head_to_head(pairs, pixels, batch, timer)))
    pairs.clear()
    p50 = {state: float(np.median(t)) * 1e3 for state, t in times.items()}
    choice = "off" if p50["on"] > p50["off"] * (1 + auto.TIE) else "on"
    meta = artifact.decode({p.key: p.value for p in onnx.load(str(final), load_external_data=False).metadata_props})
    set_metadata(final, {**meta, "ort_spinning": choice})
    other = "on" if choice == "off" else "off"
    ratio = p50[other] / p50[choice] if p50[choice] else 1.0
    # a ratio, not a second latency figure for the pick (the table has its one)
    note = (f"{final.name}: ONNX Runtime spin-waiting {choice} (recorded in the file; the runtime applies it): "
            f"with it {other} the pick took {ratio:.2f}x as long at batch {batch} here")
    return {"setting": "ort_spinning", "value": choice, "p50_ms": {k: round(v, 3) for k, v in p50.items()},
            "batch": batch, "runs": len(times["on"]), "note": note}


def candidates(model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any], work: Path,
               tolerance: dict[str, float]) -> list:
    """The `onnx` target's candidates for --precision auto: FP32 (the reference), every INT8 recipe the graph
    calls for (each static one with the stem in int8 and in float, and the whole-graph integer ones with the
    stem block in float where the graph has one), and FP16 and FP32 on each accelerator execution provider
    onnxruntime offers here."""
    from kdiqa_edge.export import recipes
    from kdiqa_edge.export.auto import Candidate

    work.mkdir(parents=True, exist_ok=True)
    scored = score_model(model, cfg)
    meta = {**meta, "input": scored.input_spec(), "outputs": scored.output_names}
    extra = {"input": meta["input"], "outputs": meta["outputs"], "opset": cfg.opset}
    fp32 = export_fp32(scored, work / "model.fp32.onnx", cfg.opset)
    graph = int8_graph(fp32, scored, examples, cfg, work)

    def artifact(precision: str, write, recipe: str | None = None):
        def build(folder: Path) -> Path:
            path = write(folder / f"model.{precision}.onnx")
            set_metadata(path, {**meta, "precision": precision, **({"recipe": recipe} if recipe else {})})
            return path
        return build

    def copy(path: Path) -> Path:
        return Path(shutil.copyfile(fp32, path))

    # measured with ONNX Runtime's spin-waiting on (its default, what ships) but stopped when each run returns:
    # an idle session's workers would otherwise spin on into the next candidate's turn and take the cores
    # (benchmarks/results/spinning-*.md); tune_spinning then measures spinning off for the pick
    quiet = {"stop_spinning": True}
    found = [Candidate("fp32", "fp32", artifact("fp32", copy), reference=True, tolerance=tolerance["fp32"],
                       recipe={"name": "fp32"}, extra=extra, load=quiet)]
    for recipe in recipes.applicable(graph.facts, recipes.Isa.here()):
        found.append(Candidate(
            f"int8:{recipe.name}", "int8", artifact("int8", functools.partial(graph.build, recipe), recipe.name),
            recipe=recipe.to_dict(), extra={**extra, "int8": {"form": "u8s8", "calibration_images": len(graph.calib),
                                                               "calibration_method": cfg.calib_method, "head": "float",
                                                               "stem": recipe.stem, "graph": graph.facts.summary()}},
            load=quiet))
    for provider in accelerator_providers():
        found.append(Candidate(f"fp16:{provider}", "fp16", artifact("fp16", functools.partial(to_fp16, fp32)),
                               provider=provider, tolerance=tolerance["fp16"], recipe={"name": "fp16"}, extra=extra))
        found.append(Candidate(f"fp32:{provider}", "fp32", artifact("fp32", copy), provider=provider,
                               tolerance=tolerance["fp32"], recipe={"name": "fp32"}, extra=extra))
    return found


@register_target
class OnnxTarget:
    """ONNX Runtime on CPUs: INT8 uses uint8 activations, int8 per-channel weights (U8S8), the fast form there."""

    name = "onnx"
    supports = Supports(precisions=("fp32", "fp16", "int8", "auto"), dynamic_batch=True,
                        tolerance={"fp32": 1e-4, "fp16": 5e-2})
    auto_file = "model.onnx"  # --precision auto ships its pick as OUT/onnx-auto/model.onnx

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        return build(model, examples, out, cfg, {**meta, "target": self.name}, form="u8s8",
                     tolerance=self.supports.tolerance)

    def candidates(self, model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any], work: Path) -> list:
        return candidates(model, examples, cfg, {**meta, "target": self.name}, work, self.supports.tolerance)

    def tune(self, pick, final: Path, pixels: np.ndarray, cfg: ExportConfig, timer, log) -> dict[str, Any] | None:
        return tune_spinning(pick, final, pixels, cfg, timer, log)

    def left_out(self, cfg: ExportConfig | None = None) -> list[str]:
        return accelerators_left_out()
