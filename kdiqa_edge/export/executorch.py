"""The `executorch` target: a `.pte` program for ExecuTorch with the XNNPACK delegate (Android, iOS, Linux ARM).

Path: torch.export -> (INT8: PT2E prepare/calibrate/convert with XNNPACKQuantizer, symmetric per-channel
weights) -> to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]) -> to_executorch().

- Batch 1, static shapes: a phone scores one frame at a time, and a dynamic batch axis keeps shape ops
  (view, slice, sym_size) outside the delegate: mobilevit_s went from 51 to 109 XNNPACK subgraphs with one.
  The runtime splits larger batches.
- The kdiqa_edge.* metadata travels INSIDE the program, as a constant method `kdiqa_edge_meta` that returns
  the JSON of the same string dict ONNX metadata_props carry, as a uint8 tensor. One file to copy; any
  ExecuTorch runtime reads it (`Module.execute("kdiqa_edge_meta")` on Android); `forward` is untouched.
- Operators XNNPACK does not take run on ExecuTorch's portable kernels (plain C++ loops): the lowered
  program's count of them goes in the manifest and the notes, with a warning beyond UNDELEGATED_WARN.
- INT8 keeps in float what the ONNX target keeps in float: the folded head, the input normalization, the
  projection feeding the head, and (`--int8-stem float`) the stem.

executorch is imported inside functions only; without it the target fails before any work, naming the
`[android]` extra.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.errors import CheckpointError, ConfigError, ExportError, MissingDependency, first_line
from kdiqa_edge.export.base import (
    Examples,
    ExportConfig,
    ExportResult,
    Supports,
    model_input,
    register_target,
)
from kdiqa_edge.runtime.executorch import quiet  # executorch's and torch's chatter, held back here too

EXTRA = "android"
# Beyond this fraction of the program's operators outside the XNNPACK delegate, the notes warn.
UNDELEGATED_WARN = 0.10
# Module scopes (ScoreModel attribute paths) that stay in float in INT8 programs.
FLOAT_SCOPES = ("head", "input_norm", "model.head")
# Graph nodes that are bookkeeping, not kernels: tuple access and symbolic sizes.
_BOOKKEEPING = ("getitem", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset")
_COMPUTE = ("conv2d", "linear", "matmul", "mm", "convolution")
# Ops that only rearrange a tensor: a conv/linear behind them still feeds what follows.
_SHAPE_ONLY = ("view", "reshape", "_unsafe_view", "flatten", "permute", "squeeze", "unsqueeze", "contiguous",
               "clone", "expand")
DEVICE_DIR = "/data/local/tmp/kdiqa"


def executorch_missing() -> str | None:
    """None when executorch's exporter imports, else why not."""
    try:
        with quiet():
            import executorch.exir  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def require_executorch() -> None:
    missing = executorch_missing()
    if missing is not None:
        raise MissingDependency(f"the executorch target needs executorch ({missing}); install it with: "
                                f"pip install 'kdiqa-edge[{EXTRA}]'")


# --- the delegation report ---------------------------------------------------------------------------


@dataclasses.dataclass
class Delegation:
    """What XNNPACK took, counted from the lowered program's graph."""

    subgraphs: int  # XNNPACK delegate calls
    delegated: int  # operators inside them
    undelegated: dict[str, int]  # operator -> count left to the portable kernels

    @property
    def outside(self) -> int:
        return sum(self.undelegated.values())

    @property
    def fraction(self) -> float:
        total = self.delegated + self.outside
        return self.outside / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"subgraphs": self.subgraphs, "delegated_ops": self.delegated, "undelegated_ops": self.outside,
                "undelegated_fraction": round(self.fraction, 4), "undelegated_by_op": self.undelegated,
                "warn_above": UNDELEGATED_WARN}


def _op_name(node) -> str:
    """aten.avg_pool2d.default, aten::sum.dim_IntList -> avg_pool2d, sum."""
    target = node.target
    name = str(getattr(target, "_name", None) or getattr(target, "__name__", None) or target)
    name = name.split("::")[-1]
    for namespace in ("aten.", "quantized_decomposed.", "dim_order_ops."):
        name = name.removeprefix(namespace)
    return name.split(".")[0]


def _is_bookkeeping(node) -> bool:
    return _op_name(node) in _BOOKKEEPING


def _is_qdq(node) -> bool:
    return _op_name(node).startswith(("quantize_per_", "dequantize_per_"))


def delegation_report(graph_module) -> Delegation:
    """Count the operators inside XNNPACK subgraphs and those outside (bookkeeping nodes excluded)."""
    delegated, undelegated, subgraphs = 0, {}, 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module"):
            subgraphs += 1
            lowered = getattr(graph_module, node.target)
            # Q/DQ pairs inside a subgraph are folded into XNNPACK's int8 kernels: not operators of their own
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and not _is_bookkeeping(n) and not _is_qdq(n))
        elif node.op == "call_function" and "executorch_call_delegate" not in str(node.target) \
                and not _is_bookkeeping(node):
            name = _op_name(node)
            undelegated[name] = undelegated.get(name, 0) + 1
    return Delegation(subgraphs, delegated, dict(sorted(undelegated.items(), key=lambda kv: (-kv[1], kv[0]))))


def delegation_notes(report: Delegation, name: str) -> list[str]:
    ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in report.undelegated.items())
    total = report.delegated + report.outside
    if not report.outside:
        return [f"{name}: XNNPACK runs all {total} operators ({report.subgraphs} delegate subgraph(s))"]
    line = (f"{name}: {report.outside} of {total} operators ({report.fraction:.0%}) run OUTSIDE the XNNPACK "
            f"delegate, on ExecuTorch's portable kernels: {ops}")
    if report.fraction > UNDELEGATED_WARN:
        return [(f"WARNING: {line}; beyond {UNDELEGATED_WARN:.0%} the portable kernels can dominate the latency "
                 "(details.delegation in the manifest)")]
    return [line]


# --- building a program --------------------------------------------------------------------------------


def _scope(node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _in_scopes(node, scopes) -> bool:
    return any(path == s or path.startswith(s + ".") for path in _scope(node) for s in scopes)


def _is_compute(node) -> bool:
    return node.op == "call_function" and _op_name(node) in _COMPUTE


def _feeding_compute(node):
    """The conv/linear whose output reaches `node`, through shape-only ops (the map's per-position features
    reach the head through a reshape), or None."""
    while node.op == "call_function" and _op_name(node) in _SHAPE_ONLY and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node if _is_compute(node) else None


def float_nodes(graph_module, stem: bool) -> set[str]:
    """Names of the nodes INT8 leaves in float: the head and input normalization scopes, the conv/linear that
    feeds the head (the projection into CLIP's space: with --with-map it runs twice, on the pooled features and
    per position, and both stay float, since one weight cannot be int8 for one and float for the other in
    XNNPACK), and with `stem` the first conv/linear (so the input pixels are not re-rounded, as
    `--int8-stem float` does for ONNX)."""
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    keep = {n.name for n in nodes if _in_scopes(n, FLOAT_SCOPES)}
    for node in nodes:
        if node.name in keep and _in_scopes(node, ("head", "model.head")):
            for source in node.all_input_nodes:
                feeding = _feeding_compute(source)
                if feeding is not None:
                    keep.add(feeding.name)
    # a weight a kept conv/linear reads stays float for every conv/linear that reads it
    kept_weights = {a for n in nodes if n.name in keep and _is_compute(n) for a in n.all_input_nodes[1:]}
    keep |= {n.name for n in nodes if _is_compute(n) and kept_weights.intersection(n.all_input_nodes[1:])}
    if stem:
        first = next((n for n in nodes if _is_compute(n) and n.name not in keep), None)
        if first is not None:
            keep.add(first.name)
    return keep


def _export(module, example):
    import torch

    from kdiqa_edge.export.layouts import traced

    with torch.no_grad(), traced(), quiet():
        return torch.export.export(module, (example,))


def quantize(scored, calib: np.ndarray, stem: str, batch: int = 8):
    """PT2E: XNNPACKQuantizer (int8 activations per tensor, int8 symmetric per-channel weights), observers
    calibrated on `calib` (the program's input format), float regions per `float_nodes`."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from kdiqa_edge.export.layouts import traced

    # a dynamic batch axis for calibration only: the observers see `batch` images per call
    dims = ({0: torch.export.Dim("batch", min=1, max=batch)},)
    with torch.no_grad(), traced(), quiet():
        graph = torch.export.export(scored, (scored.example_input(2),), dynamic_shapes=dims).module()
        keep = float_nodes(graph, stem=stem == "float")
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        quantizer.set_filter_function(lambda node: node.name not in keep)
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calib), batch):
            prepared(torch.from_numpy(np.ascontiguousarray(calib[start:start + batch])))
        return convert_pt2e(prepared), sorted(keep)


def lower(module, example, meta: dict[str, Any], label: str) -> tuple[bytes, Delegation]:
    """torch.export -> XNNPACK -> ExecuTorch program bytes, with the metadata as a constant method."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from kdiqa_edge import artifact

    stage = "torch.export"
    try:
        exported = _export(module, example)
        stage = "XNNPACK lowering"
        blob = json.dumps(artifact.encode(meta), sort_keys=True).encode("utf-8")
        constant = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
        with quiet():
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                               constant_methods={artifact.PTE_META_METHOD: constant})
            report = delegation_report(edge.exported_program().graph_module)
            stage = "to_executorch"
            program = edge.to_executorch()
    except Exception as exc:  # noqa: BLE001 - torch.export and exir raise many types for an op or shape
        raise ExportError(f"ExecuTorch cannot lower {label} ({stage}): "
                          f"{first_line(exc, limit=300, typed=True)}") from None
    if report.subgraphs == 0:
        raise ExportError(f"XNNPACK delegated none of {label}'s {report.outside} operators: every one would run "
                          "on ExecuTorch's portable kernels")
    return bytes(program.buffer), report


def model_facts(model) -> dict[str, Any]:
    """Parameter count (nn.Parameters, as the bench counts a checkpoint's) and MACs of one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = int(sum(p.numel() for p in model.parameters()))
    try:
        size = model.preprocess.size
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size))
        return {"params": params, "macs": int(counter.get_total_flops() // 2)}
    except Exception:  # noqa: BLE001 - MACs are best effort
        return {"params": params}


@dataclasses.dataclass
class Program:
    """One written .pte and what was measured on it here: for the target's report and for `--precision auto`."""

    path: Path
    precision: str
    stem: str  # float | int8 (INT8 only)
    delegation: Delegation
    parity: dict[str, Any]  # vs the torch model on the parity images
    latency: dict[str, Any]  # batch 1 through the runtime backend at cfg.threads
    test_scores: np.ndarray  # on examples.test, for drift
    meta: dict[str, Any]  # the kdiqa_edge.* metadata inside the program
    int8: dict[str, Any] = dataclasses.field(default_factory=dict)


def program_meta(model, scored, meta: dict[str, Any], precision: str) -> dict[str, Any]:
    source = {**(meta.get("source") or {}), **model_facts(model)}
    return {**meta, "target": "executorch", "precision": precision, "input": scored.input_spec(),
            "outputs": scored.output_names, "source": source, "batch": 1}


def write_program(model, examples: Examples, folder: Path, cfg: ExportConfig, meta: dict[str, Any],
                  precision: str, stem: str | None = None) -> tuple[Path, Delegation, dict[str, Any], dict[str, Any]]:
    """Write `folder/model.<precision>.pte` for (precision, stem): (path, delegation, int8 facts, metadata).
    What a `--precision auto` candidate builds (auto measures it itself)."""
    from kdiqa_edge.export.onnx import score_model
    from kdiqa_edge.io import write_bytes

    require_executorch()
    stem = stem or cfg.int8_stem
    scored = score_model(model, cfg)
    full_meta = program_meta(model, scored, meta, precision)
    label = str(full_meta["source"].get("arch") or "the model")
    int8: dict[str, Any] = {}
    module = scored
    if precision == "int8":
        calib = model_input(examples.calib, scored.input_spec(), scored.preprocess)
        if len(calib) == 0:
            raise ExportError("int8 needs calibration images, and the train split gave none")
        try:
            module, kept = quantize(scored, calib, stem)
        except Exception as exc:  # noqa: BLE001 - PT2E raises many types for a graph it cannot annotate
            raise ExportError(f"PT2E quantization of {label} failed: "
                              f"{first_line(exc, limit=300, typed=True)}") from None
        int8 = {"quantizer": "XNNPACKQuantizer", "weights": "int8 symmetric per-channel",
                "activations": "int8 per-tensor affine (HistogramObserver)", "calibration_images": len(calib),
                "head": "float", "input_norm": "float", "stem": stem, "float_nodes": len(kept)}
    program, report = lower(module, scored.example_input(1), full_meta, label)
    return write_bytes(Path(folder) / f"model.{precision}.pte", program), report, int8, full_meta


def build_program(model, examples: Examples, folder: Path, cfg: ExportConfig, meta: dict[str, Any],
                  precision: str, stem: str | None = None, tolerance: float | None = None) -> Program:
    """Write `folder/model.<precision>.pte` for (precision, stem), then measure it through the runtime backend:
    parity vs torch on the parity images (ExportError beyond `tolerance`), batch-1 latency at cfg.threads, and
    scores on the test images. The building block of the target."""
    from kdiqa_edge.export import evaluate
    from kdiqa_edge.export.evaluate import torch_reference

    stem = stem or cfg.int8_stem
    path, report, int8, full_meta = write_program(model, examples, folder, cfg, meta, precision, stem)
    quality_model = load_program(path, cfg.threads)
    reference = torch_reference(model, examples.parity)
    parity = evaluate.parity(reference, quality_model.predict(examples.parity).astype(np.float64), tolerance)
    if parity.get("passed") is False:
        raise ExportError(f"{path.name}: parity check failed, max |score - torch score| = "
                          f"{parity['max_abs_diff']:.2e} > {tolerance:.0e}")
    return Program(path=path, precision=precision, stem=stem if precision == "int8" else "float",
                   delegation=report, parity=parity, latency=latency_ms(quality_model, cfg.latency_runs),
                   test_scores=quality_model.predict(examples.test).astype(np.float64), meta=full_meta, int8=int8)


def load_program(path: Path, threads: int | None):
    """The program through the runtime backend (what `score` and `bench` run); a program that does not run
    here (a missing kernel, say) is an export failure."""
    from kdiqa_edge.runtime import QualityModel

    try:
        return QualityModel.load(path, threads=threads)
    except CheckpointError as exc:  # its message starts with the (staging) path: the name says enough
        raise ExportError(f"{path.name} does not run here: {str(exc).removeprefix(f'{path}: ')}") from None


def latency_ms(quality_model, runs: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 latency of a loaded program through the runtime backend: median and p90 in ms."""
    from kdiqa_edge.bench.latency import time_inference

    stats = time_inference(quality_model, batch_size=1, warmup=warmup, runs=max(runs, 1))
    return {"p50_ms": round(stats.p50_ms, 3), "p90_ms": round(stats.p90_ms, 3), "runs": stats.runs, "batch": 1}


# --- the on-device benchmark ---------------------------------------------------------------------------


def device_commands(pte_name: str, threads: int, runs: int = 50) -> list[str]:
    """Push the program to an Android phone and time it there with ExecuTorch's executor_runner (built for
    the phone with the XNNPACK backend linked: EXECUTORCH_BUILD_XNNPACK=ON)."""
    remote = f"{DEVICE_DIR}/{pte_name}"
    runner = [f"{DEVICE_DIR}/executor_runner", f"--model_path={remote}", "--method_name=forward",
              f"--num_executions={runs}", f"--cpu_threads={threads}"]
    return [f"adb shell mkdir -p {DEVICE_DIR}",
            f"adb push {shlex.quote(pte_name)} {remote}",
            "adb shell " + shlex.quote(" ".join(runner))]


def benchmark_app_commands(pte_name: str, runs: int = 50) -> list[str]:
    """The same through ExecuTorch's Android benchmark app (extension/benchmark/android, org.pytorch.minibench)."""
    folder = "/data/local/tmp/minibench"
    return [f"adb shell mkdir -p {folder}", f"adb push {shlex.quote(pte_name)} {folder}/",
            (f"adb shell am start -W -S -n org.pytorch.minibench/org.pytorch.minibench.BenchmarkActivity "
             f"--es model_dir {folder} --ei num_iter {runs} --ei num_warm_up_iter 10"),
            "adb shell run-as org.pytorch.minibench cat files/benchmark_results.json"]


def write_device_script(out: Path, pte_name: str, threads: int) -> Path:
    from kdiqa_edge.io import write_script

    comments = [f"Time {pte_name} on an Android phone (adb, USB debugging on). executor_runner: ExecuTorch's",
                "examples/portable/executor_runner built for arm64-v8a with the XNNPACK backend linked",
                "(EXECUTORCH_BUILD_XNNPACK=ON), pushed to " + DEVICE_DIR + ". It feeds ones and prints the time",
                "of --num_executions runs; --cpu_threads -1 picks the phone's performance cores."]
    commands = [*device_commands(pte_name, threads),
                "# or ExecuTorch's Android benchmark app (extension/benchmark/android/benchmark, installed):",
                *(f"# {line}" for line in benchmark_app_commands(pte_name))]
    return write_script(out / "benchmark_on_device.sh", comments, commands)  # ./benchmark_on_device.sh, anywhere


def check_map(model, program: Program, examples: Examples, cfg: ExportConfig, meta: dict[str, Any],
              tolerance: dict[str, float]) -> dict[str, Any]:
    """The program's `score_map` vs torch through the runtime (export/evaluate.py:map_report); at fp32 also the
    same program without the map: the score output must be bit-identical to it, and the map's added latency."""
    from kdiqa_edge.export import evaluate

    with tempfile.TemporaryDirectory(prefix="kdiqa-executorch-") as scratch:
        twin = None
        if program.precision == "fp32":
            twin = write_program(model, examples, Path(scratch), dataclasses.replace(cfg, with_map=False), meta,
                                 "fp32")[0]
        return evaluate.map_report(model, program.path, examples.parity, tolerance.get(program.precision),
                                   cfg.threads, without_map=twin, runs=cfg.latency_runs)


def phone_note(script: Path, name: str, commands: list[str]) -> str:
    # the commands name the program by file name: they run beside it, as the script does from anywhere
    return f"on the phone: {script.name} (beside {name}; from any folder) runs {' && '.join(commands)}"


# --- the target ----------------------------------------------------------------------------------------


def drift_notes(report: dict[str, Any], name: str, threads: int, max_drift: float) -> list[str]:
    """The drift check with its verdict, and both latencies (the CPU is the export's one environment line)."""
    from kdiqa_edge.export.evaluate import drift_verdict

    fp32_ms, int8_ms = report["latency"]["fp32"]["p50_ms"], report["latency"]["int8"]["p50_ms"]
    notes = [f"{name}: drift vs FP32: SRCC {report['reduced']['srcc']:.4f} vs {report['fp32']['srcc']:.4f} "
             f"(ΔSRCC {report['delta_srcc']:+.4f}, ΔPLCC {report['delta_plcc']:+.4f}) on {report['images']} test "
             f"images, {drift_verdict(report['delta_srcc'], max_drift)}",
             f"{name}: latency at batch 1, ExecuTorch XNNPACK on this CPU, {threads} threads: INT8 {int8_ms:.2f} ms, "
             f"FP32 {fp32_ms:.2f} ms"]
    if int8_ms > fp32_ms:
        notes.append(f"{name}: INT8 is SLOWER than FP32 on this machine ({int8_ms:.2f} ms vs {fp32_ms:.2f} ms); "
                     "time both on the phone (benchmark_on_device.sh) before shipping")
    return notes


@register_target
class ExecuTorchTarget:
    """Android / ARM phones (and x86): ExecuTorch .pte with the XNNPACK delegate, FP32 or PT2E INT8."""

    name = "executorch"
    supports = Supports(precisions=("fp32", "int8", "auto"), dynamic_batch=False, tolerance={"fp32": 1e-4})
    auto_file = "model.pte"  # --precision auto: the pick, in OUT/executorch-auto/

    def preflight(self, cfg: ExportConfig) -> None:
        """Fail before any work when executorch is missing, or a calibration it cannot honour is asked."""
        if cfg.precision in ("int8", "auto") and cfg.calib_method != "minmax":
            raise ConfigError(f"--calib-method {cfg.calib_method}: ExecuTorch's XNNPACKQuantizer calibrates "
                              "with its own observers (a histogram for activations); leave --calib-method "
                              "out")
        require_executorch()

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        from kdiqa_edge.export import evaluate

        program = build_program(model, examples, out, cfg, meta, cfg.precision,
                                tolerance=self.supports.tolerance.get(cfg.precision))
        name = program.path.name
        map_report = check_map(model, program, examples, cfg, meta, self.supports.tolerance) if cfg.with_map else None
        script = write_device_script(out, name, cfg.threads)
        commands = device_commands(name, cfg.threads)
        result = ExportResult(target=self.name, precision=cfg.precision, files=[program.path, script],
                              parity=program.parity, notes=delegation_notes(program.delegation, name))
        result.extra = {"input": program.meta["input"], "outputs": program.meta["outputs"],
                        "runtime": "executorch", "delegate": "XNNPACK", "batch": 1,
                        "metadata": "constant method kdiqa_edge_meta (JSON of the kdiqa_edge.* keys, uint8)",
                        "delegation": program.delegation.to_dict(), "device_command": " && ".join(commands),
                        "benchmark_app": benchmark_app_commands(name)}
        if map_report is not None:
            result.extra["map"] = map_report
            result.notes.extend(evaluate.map_notes(map_report, name))
        if cfg.precision == "fp32":
            result.extra["latency"] = {"fp32": program.latency, "runtime": "executorch xnnpack",
                                       "threads": cfg.threads}
        else:
            result.extra["int8"] = program.int8
            with tempfile.TemporaryDirectory(prefix="kdiqa-executorch-") as scratch:
                reference = build_program(model, examples, Path(scratch), cfg, meta, "fp32",
                                          tolerance=self.supports.tolerance["fp32"])
            result.drift = evaluate.drift(reference.test_scores, program.test_scores, examples.test_mos)
            result.drift["latency"] = {"fp32": reference.latency, "int8": program.latency,
                                       "runtime": "executorch xnnpack", "threads": cfg.threads}
            result.notes.extend(drift_notes(result.drift, name, cfg.threads, cfg.max_drift))
        result.notes.append(phone_note(script, name, commands))
        return result

    def beside(self, pick, final: Path, cfg: ExportConfig) -> tuple[list[Path], list[str]]:
        """--precision auto: the pick's benchmark_on_device.sh, as a named precision writes it."""
        script = write_device_script(final.parent, final.name, cfg.threads)
        return [script], [phone_note(script, final.name, device_commands(final.name, cfg.threads))]

    def candidates(self, model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any], work: Path) -> list:
        """--precision auto: the FP32 program (the reference) and PT2E INT8 with the stem in float and in int8,
        each measured on this CPU through the runtime (XNNPACK), at cfg.threads."""
        from kdiqa_edge.export.auto import Candidate
        from kdiqa_edge.export.onnx import score_model

        require_executorch()
        scored = score_model(model, cfg)
        extra = {"input": scored.input_spec(), "outputs": scored.output_names, "runtime": "executorch",
                 "delegate": "XNNPACK", "batch": 1}
        meta = {**meta, "target": self.name}

        def build(precision: str, stem: str):
            return lambda folder: write_program(model, examples, folder, cfg, meta, precision, stem)[0]

        int8 = {"quantizer": "XNNPACKQuantizer", "weights": "int8 symmetric per-channel", "head": "float",
                "input_norm": "float"}
        return [Candidate("fp32", "fp32", build("fp32", "float"), reference=True,
                          tolerance=self.supports.tolerance["fp32"], recipe={"name": "fp32"}, extra=extra),
                *[Candidate(f"int8:stem-{stem}", "int8", build("int8", stem),
                            recipe={"name": f"xnnpack-int8+stem-{stem}", "stem": stem, **int8},
                            extra={**extra, "int8": {**int8, "stem": stem}})
                  for stem in ("float", "int8")]]

