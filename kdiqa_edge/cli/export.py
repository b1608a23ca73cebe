"""`kdiqa-edge export CHECKPOINT --target onnx|tensorrt|coreml|executorch|openvino|cpu|all
--precision fp32|fp16|bf16|int8|auto --out DIR`."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kdiqa_edge.cli.options import FailUnder, MaxLatencyMs, MaxSizeMb, MlflowUri, dataset_options
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.export.base import ExportConfig

EXPORT_PANEL = "Export"
DEFAULT_OUT = "exports/<run name>"  # export/pipeline.py:default_out
RUNNABLE = (".onnx", ".mlpackage", ".engine", ".plan", ".pte", ".xml")  # what `kdiqa-edge bench` takes
AUTO_TARGET = "cpu"  # --precision auto without --target (nor a profile's): every CPU runtime installed here


def _default(field: str) -> str:
    """ExportConfig's default, as `--help` shows it (typer's own [default: ...]: the options default to None
    so that a --profile's value is not overridden)."""
    return str(getattr(ExportConfig, field))


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir (model.json + model.safetensors) or run dir.")],
    data: DatasetSpec,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=DEFAULT_OUT,
        help="Output folder (one sub-folder per target-precision, manifest.json). It holds one checkpoint's "
             "exports: an OUT holding another checkpoint's is refused, unless --force.")] = None,
    target: Annotated[str | None, typer.Option(
        "--target", "-t", help=f"With --precision auto the default is {AUTO_TARGET}: auto across every CPU runtime "
                               "installed here (ONNX Runtime, OpenVINO, ExecuTorch). Targets: onnx, tensorrt, "
                               "coreml, executorch, openvino, cpu or all",
        show_default=_default("target"), rich_help_panel=EXPORT_PANEL)] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", "-p", help="fp32, fp16, bf16 (openvino), int8, or auto: build every candidate (FP32, each INT8 recipe the "
                                  "graph calls for, FP16 on an accelerator; with --target cpu, the default for auto, "
                                  "those of every CPU runtime), measure them here, ship the fastest within "
                                  "--max-drift to OUT/<target>-auto/",
        show_default=_default("precision"), rich_help_panel=EXPORT_PANEL)] = None,
    max_drift: Annotated[float | None, typer.Option(
        "--max-drift", min=0.0, help="The largest |ΔSRCC| vs FP32 on the test split: auto ships no candidate "
                                     "beyond it; an int8/fp16 export's drift check is judged against it",
        show_default=_default("max_drift"), rich_help_panel=EXPORT_PANEL)] = None,
    min_speedup: Annotated[float | None, typer.Option(
        "--min-speedup", help="auto: an INT8/FP16/BF16 pick must be at least this many times as fast as FP32 (with "
                              "--target cpu: the fastest FP32 of any runtime), else that FP32 ships (1: the "
                              "fastest within the bound ships)",
        show_default=_default("min_speedup"), rich_help_panel=EXPORT_PANEL)] = None,
    candidates: Annotated[str | None, typer.Option(
        "--candidates", help="auto: only these candidates, comma-separated (e.g. int8:qdq-all+stem-int8); FP32 is "
                             "always measured", show_default="all", rich_help_panel=EXPORT_PANEL)] = None,
    int8_recipe: Annotated[str | None, typer.Option(
        "--int8-recipe", help="int8, --target onnx: the ONNX Runtime INT8 recipe (qdq-all, attn-float, "
                              "dw-float, compute-only, compute-only-dw-float, dynamic-matmul); auto measures "
                              "every one that applies", show_default=_default("int8_recipe"),
        rich_help_panel=EXPORT_PANEL)] = None,
    input_kind: Annotated[str | None, typer.Option(
        "--input", help="float: normalized NCHW float32; uint8: raw pixels, normalization folded into the "
                        "graph (coreml: always Core ML's image input, ImageType)",
        show_default=_default("input"), rich_help_panel=EXPORT_PANEL)] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="NCHW or NHWC (uint8 input only)",
                                                  show_default=_default("layout"),
                                                  rich_help_panel=EXPORT_PANEL)] = None,
    probs: Annotated[bool | None, typer.Option("--probs/--no-probs", help="Add the `probs` [N, 5] output.",
                                                  rich_help_panel=EXPORT_PANEL)] = None,
    with_map: Annotated[bool | None, typer.Option(
        "--with-map/--no-map", help="Add the `score_map` [N, h, w] output: the quality head at every position of "
                                    "the student's final feature map (7x7 at 224 px), checked against torch like "
                                    "the score; the score output is unchanged. `kdiqa-edge score --map` draws it",
        rich_help_panel=EXPORT_PANEL)] = None,
    calib: Annotated[int | None, typer.Option("--calib", min=1, help="INT8 calibration images from the TRAIN split",
                                                 show_default=_default("calib"),
                                                 rich_help_panel=EXPORT_PANEL)] = None,
    calib_method: Annotated[str | None, typer.Option("--calib-method", help="minmax, entropy or percentile",
                                                        show_default=_default("calib_method"),
                                                        rich_help_panel=EXPORT_PANEL)] = None,
    int8_stem: Annotated[str | None, typer.Option(
        "--int8-stem", help="float: keep the first conv/patch embedding of INT8 models in float, so the input "
                            "pixels are not re-rounded (IQA models measure exactly that noise); int8: quantize it "
                            "too (faster, more drift); block (--target onnx): the stem and the convs after it at "
                            "its resolution, through the narrowest, in float",
        show_default=_default("int8_stem"), rich_help_panel=EXPORT_PANEL)] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Largest batch (TensorRT profile "
                                                     "max, CoreML range)", show_default=_default("max_batch"),
                                                     rich_help_panel=EXPORT_PANEL)] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset, 17..20", show_default=_default("opset"),
                                                 rich_help_panel=EXPORT_PANEL)] = None,
    tensorrt_version: Annotated[str | None, typer.Option(
        "--tensorrt-version", help="TensorRT the op check targets",
        show_default=f"{_default('tensorrt_version')}, JetPack 6", rich_help_panel=EXPORT_PANEL)] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for the parity, drift and "
                                                "latency checks here", show_default=_default("threads"),
                                                rich_help_panel=EXPORT_PANEL)] = None,
    fail_under: FailUnder = None,
    max_latency_ms: MaxLatencyMs = None,
    max_size_mb: MaxSizeMb = None,
    mlflow_register: Annotated[str | None, typer.Option(
        "--mlflow-register", metavar="NAME",
        help="Log the export (files, manifest.json, drift/latency figures) to MLflow and register the chosen one "
             "(auto's pick where auto ran) as a new version of model NAME: QualityModel.load('models:/NAME/VERSION')",
        rich_help_panel=EXPORT_PANEL)] = None,
    mlflow_uri: MlflowUri = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="A target profile (export/<name>.yaml); "
                                                    "flags override it.", rich_help_panel=EXPORT_PANEL)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Re-export even when the manifest says up to date; into an OUT holding another "
                        "checkpoint's exports, replace them.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Stream the converters' own output (coremltools, torch.onnx, onnxruntime...) "
                                "too; it always goes to each export's export.log.")] = False,
) -> None:
    """Export a checkpoint's score model (folded text anchors, no text tower) with parity and drift checks.

    Without --out, a run's exports go to exports/<run name>, one folder per run, as a trainer's exporter
    writes beside its weights. An OUT holding another checkpoint's exports is refused (--force replaces them).

    Examples:

      kdiqa-edge export runs/distill --target onnx --precision int8        # -> exports/distill/onnx-int8/

      kdiqa-edge export runs/distill --precision auto --out exports/   # every CPU runtime -> exports/cpu-auto/

      kdiqa-edge export runs/distill --target onnx --precision auto --max-drift 0.01   # -> exports/distill/onnx-auto/model.onnx

      kdiqa-edge export runs/distill --profile export/jetson-orin-tensorrt-int8.yaml --out exports/jetson

      kdiqa-edge export runs/distill --target all --precision fp16 --input uint8 --out exports/

      kdiqa-edge export runs/distill --profile export/android-executorch-int8.yaml --out exports/android

      kdiqa-edge export runs/distill --precision auto --fail-under srcc=0.85 --max-latency-ms 5 --max-size-mb 10   # CI: exit 1 if the pick breaks a bound
    """
    from kdiqa_edge.config import resolve
    from kdiqa_edge.errors import TensorRTUnavailable
    from kdiqa_edge.export import export_checkpoint
    from kdiqa_edge.export.pipeline import default_out

    cfg = resolve(ExportConfig, profile, target=target, precision=precision, input=input_kind, layout=layout,
                  with_probs=probs, with_map=with_map, calib=calib, calib_method=calib_method, int8_stem=int8_stem,
                  int8_recipe=int8_recipe, max_drift=max_drift, min_speedup=min_speedup, candidates=candidates,
                  max_batch=max_batch, opset=opset, threads=threads,
                  tensorrt_version=tensorrt_version, fail_under=fail_under, max_latency_ms=max_latency_ms,
                  max_size_mb=max_size_mb)
    if target is None and cfg.precision == "auto" and not _profile_names(profile, "target"):
        cfg = dataclasses.replace(cfg, target=AUTO_TARGET)
    _refuse_unread(cfg, given=lambda flag, field: flag is not None or _profile_names(profile, field),
                   input_kind=input_kind, max_batch=max_batch)
    out = out if out is not None else default_out(checkpoint)
    requested = [f"{name}-{cfg.precision}" for name in cfg.validate().targets()]
    gate = _gate(cfg)
    if mlflow_register:
        from kdiqa_edge.errors import require
        from kdiqa_edge.train.trackers.mlflow import check_store
        from kdiqa_edge.train.trackers.registry import EXTRA, chosen

        require("mlflow", EXTRA)
        chosen(requested)  # one model to register: refused before any export work
        check_store(mlflow_uri)  # and a store that cannot take it
    try:
        manifest = export_checkpoint(checkpoint, cfg, out, data=data, force=force, log=_log, verbose=verbose)
    except TensorRTUnavailable:
        _summary(out, checkpoint, requested)
        raise
    _summary(out, checkpoint, requested, manifest)
    if cfg.precision == "auto":  # the gate's verdict on the pick (or, without bounds, an earlier one dropped)
        from kdiqa_edge.export.pipeline import gate_exports

        verdict = gate_exports(out, requested, gate, _log)
        if verdict is not None:
            from kdiqa_edge.cli.bench import report_gate

            report_gate(verdict)
    if mlflow_register:  # after the gate: a pick that breaks a bound is not registered
        from kdiqa_edge.train.trackers.registry import register_export

        register_export(out, mlflow_register, requested, mlflow_uri, log=typer.echo)


def _gate(cfg: ExportConfig):
    """The release gate on auto's pick (with --max-drift's bound), from the flags or the profile, or None
    without gate bounds; `cfg.validate()` refused them before any work for a precision that picks nothing."""
    from kdiqa_edge.bench.gate import Gate

    if not cfg.gated():
        return None
    return Gate.parse(cfg.fail_under, cfg.max_drift, cfg.max_latency_ms, cfg.max_size_mb)


def _refuse_unread(cfg: ExportConfig, given, input_kind: str | None, max_batch: int | None) -> None:
    """Options given (as a flag or in the profile) that the one target named would not read: one line, not
    an artifact that silently is not what was asked. (Their defaults stay accepted, as with --target all.)"""
    from kdiqa_edge.errors import ConfigError

    if cfg.target == "coreml" and cfg.input == "float" and given(input_kind, "input"):
        raise ConfigError("--target coreml takes an image (Core ML's ImageType: 8-bit RGB, CLIP's "
                          "normalization folded in), not --input float's normalized tensor; leave --input "
                          "out, or say uint8")
    if cfg.target == "executorch" and cfg.precision != "auto" and given(max_batch, "max_batch"):
        raise ConfigError("--max-batch: ExecuTorch programs are batch 1 with static shapes (a dynamic batch "
                          "keeps shape ops outside the XNNPACK delegate); leave --max-batch out")


def _profile_names(profile: Path | None, field: str) -> bool:
    from kdiqa_edge.config import load_file

    return profile is not None and field in load_file(profile)


def _log(message: str) -> None:
    from kdiqa_edge.console import stream

    typer.secho(message, file=stream("stderr"))  # the user's stderr, also while converter output is captured


def _summary(out: Path, checkpoint: Path, requested: list[str], manifest: dict | None = None) -> None:
    """The machine once, then a block per export this run asked for (its files, whether it was reused, the
    parity check's verdict, its notes: drift, latency, the other INT8 stem, trtexec), the manifest and what to
    run next."""
    from kdiqa_edge.bench.environment import cpu_line
    from kdiqa_edge.console import plural
    from kdiqa_edge.export.pipeline import read_manifest

    manifest = manifest or read_manifest(out)
    exports, reused = manifest.get("exports", {}), (manifest.get("run") or {}).get("reused", [])
    machine = manifest.get("machine")
    threads = (manifest.get("config") or {}).get("threads")
    if machine:
        typer.echo(f"machine: {cpu_line(machine)}"
                   + (f"; checks and latencies at {plural(threads, 'thread')}" if threads else ""))
    if _not_pretrained(checkpoint):
        typer.secho(f"note: {checkpoint} is not pretrained (random init): its exports' drift and accuracy figures are "
                    "a smoke test of the pipeline, not image quality; the speed and size figures are real", fg="yellow")
    for label in [label for label in requested if label in exports]:
        entry = exports[label]
        files = ", ".join(str(out / f["path"]) for f in entry["files"])
        typer.echo(f"{label}: {files}" + (" (reused: up to date for this checkpoint, these options and data; "
                                          "--force rebuilds it)" if label in reused else ""))
        typer.echo(f"  {_parity_line(entry)}")
        measured_on = ((entry.get("drift") or {}).get("latency") or {}).get("cpu")
        if machine and measured_on and measured_on != machine:
            typer.echo(f"  measured on another machine: {cpu_line(measured_on)}")
        built_at = entry.get("threads")  # a reused export keeps the figures of the run that built it
        if label in reused and built_at and threads and built_at != threads:
            typer.echo(f"  its checks and latencies ran at {plural(built_at, 'thread')}, when it was built (--force measures "
                       f"again at {threads})")
        skipped = (entry.get("parity") or {}).get("skipped")
        for note in entry.get("notes", []):
            if not (skipped and note.endswith(skipped)):  # said on the parity line
                typer.echo(f"  {note}")
        if entry.get("unavailable"):
            typer.secho(f"  {entry['unavailable']}", fg="yellow")
    others = sorted(set(exports) - set(requested))
    typer.echo(f"manifest: {out / 'manifest.json'}" + (f" (also lists {', '.join(others)})" if others else ""))
    runnable = RUNNABLE if sys.platform == "darwin" else tuple(suffix for suffix in RUNNABLE if suffix != ".mlpackage")
    artifacts = [shlex.quote(str(out / f["path"])) for label in requested
                 for f in (exports.get(label) or {}).get("files", [])
                 if Path(f["path"]).suffix in runnable]  # what bench can run here (CoreML: macOS)
    if artifacts:
        typer.echo(f"next: kdiqa-edge bench {' '.join(artifacts)} --reference {shlex.quote(str(checkpoint))}")


def _not_pretrained(checkpoint: Path) -> bool:
    """Does the checkpoint say it holds random-init weights (a student or teacher trained from scratch)?"""
    from kdiqa_edge.errors import KdiqaError
    from kdiqa_edge.models.checkpoint import read_meta

    try:
        return read_meta(checkpoint).get("pretrained") is False
    except KdiqaError:
        return False


def _parity_line(entry: dict[str, Any]) -> str:
    """The parity check against torch with its verdict: within the target's declared tolerance (ok), over it
    (FAILED), skipped (why), or reported only where the target declares none for the precision (INT8: its
    drift check judges it)."""
    parity = entry.get("parity") or {}
    if parity.get("skipped"):
        return f"parity vs torch: skipped ({parity['skipped']})"
    if "max_abs_diff" not in parity:
        return "parity vs torch: not checked"
    line = f"parity vs torch: max |diff| {parity['max_abs_diff']:.1e} on {parity.get('images', '?')} images"
    tolerance = parity.get("tolerance")
    if tolerance is None:
        judged = ", its drift check judges it" if (entry.get("drift") or {}).get("delta_srcc") is not None else ""
        return f"{line}, no tolerance for {entry.get('precision', '?').upper()} (reported only{judged})"
    verdict = "within" if parity.get("passed") else "over"
    return f"{line}, {verdict} the {tolerance:.0e} tolerance: {'ok' if parity.get('passed') else 'FAILED'}"


def register(app: typer.Typer) -> None:
    app.command("export", no_args_is_help=True)(dataset_options(export_command))
