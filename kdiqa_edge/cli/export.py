"""`kdiqa-edge export CHECKPOINT --target onnx|tensorrt|coreml|executorch|all
--precision fp32|fp16|int8|auto --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import dataset_options
from kdiqa_edge.data.spec import DatasetSpec

EXPORT_PANEL = "Export"


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir (model.json + model.safetensors) or run dir.")],
    data: DatasetSpec,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one sub-folder per target-precision, "
                                                          "manifest.json).")] = Path("exports"),
    target: Annotated[str | None, typer.Option("--target", "-t", help="onnx, tensorrt, coreml, executorch or all "
                                                  "[default: onnx]", rich_help_panel=EXPORT_PANEL)] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", "-p", help="fp32, fp16, int8, or auto: build every candidate (FP32, each INT8 recipe the "
                                  "graph calls for, FP16 on an accelerator), measure them here, ship the fastest "
                                  "within --max-drift to OUT/<target>-auto/ [default: fp32]",
        rich_help_panel=EXPORT_PANEL)] = None,
    max_drift: Annotated[float | None, typer.Option(
        "--max-drift", min=0.0, help="auto: the largest |ΔSRCC| vs FP32 on the test split the shipped candidate "
                                     "may have [default: 0.01]", rich_help_panel=EXPORT_PANEL)] = None,
    min_speedup: Annotated[float | None, typer.Option(
        "--min-speedup", help="auto: an INT8/FP16 pick must be at least this many times as fast as FP32, else FP32 "
                              "ships (1: the fastest within the bound ships) [default: 1.25]",
        rich_help_panel=EXPORT_PANEL)] = None,
    candidates: Annotated[str | None, typer.Option(
        "--candidates", help="auto: only these candidates, comma-separated (e.g. int8:qdq-all+stem-int8); FP32 is "
                             "always measured [default: all]", rich_help_panel=EXPORT_PANEL)] = None,
    int8_recipe: Annotated[str | None, typer.Option(
        "--int8-recipe", help="int8: the ONNX Runtime INT8 recipe (qdq-all, attn-float, dw-float, "
                              "compute-only, compute-only-dw-float, dynamic-matmul); auto measures every one "
                              "that applies [default: qdq-all]", rich_help_panel=EXPORT_PANEL)] = None,
    input_kind: Annotated[str | None, typer.Option(
        "--input", help="float: normalized NCHW float32; uint8: raw pixels, normalization folded into the graph "
                        "[default: float]", rich_help_panel=EXPORT_PANEL)] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="NCHW or NHWC (uint8 input only) "
                                                  "[default: NCHW]", rich_help_panel=EXPORT_PANEL)] = None,
    probs: Annotated[bool | None, typer.Option("--probs/--no-probs", help="Add the `probs` [N, 5] output.",
                                                  rich_help_panel=EXPORT_PANEL)] = None,
    calib: Annotated[int | None, typer.Option("--calib", min=1, help="INT8 calibration images from the TRAIN "
                                                 "split [default: 256]", rich_help_panel=EXPORT_PANEL)] = None,
    calib_method: Annotated[str | None, typer.Option("--calib-method", help="minmax, entropy or percentile "
                                                        "[default: minmax]", rich_help_panel=EXPORT_PANEL)] = None,
    int8_stem: Annotated[str | None, typer.Option(
        "--int8-stem", help="float: keep the first conv/patch embedding of INT8 models in float, so the input "
                            "pixels are not re-rounded (IQA models measure exactly that noise); int8: quantize it "
                            "too (faster, more drift); block (--target onnx): the stem and the convs after it at "
                            "its resolution, through the narrowest, in float [default: float]",
        rich_help_panel=EXPORT_PANEL)] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Largest batch (TensorRT profile "
                                                     "max, CoreML range) [default: 8]",
                                                     rich_help_panel=EXPORT_PANEL)] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset, 17..20 [default: 17]",
                                                 rich_help_panel=EXPORT_PANEL)] = None,
    tensorrt_version: Annotated[str | None, typer.Option(
        "--tensorrt-version", help="TensorRT the op check targets [default: 10.3, JetPack 6]",
        rich_help_panel=EXPORT_PANEL)] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for the parity, drift and "
                                                "latency checks here [default: 2]",
                                                rich_help_panel=EXPORT_PANEL)] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="A target profile (export/<name>.yaml); "
                                                    "flags override it.", rich_help_panel=EXPORT_PANEL)] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-export even when the manifest says up to date.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Stream the converters' own output (coremltools, torch.onnx, onnxruntime...) "
                                "too; it always goes to each export's export.log.")] = False,
) -> None:
    """Export a checkpoint's score model (folded text anchors, no text tower) with parity and drift checks.

    Examples:

      kdiqa-edge export runs/distill --target onnx --precision int8 --out exports/

      kdiqa-edge export runs/distill --precision auto --max-drift 0.01 --out exports/   # -> exports/onnx-auto/model.onnx

      kdiqa-edge export runs/distill --profile export/jetson-orin-tensorrt-int8.yaml --out exports/

      kdiqa-edge export runs/distill --target all --precision fp16 --input uint8 --out exports/

      kdiqa-edge export runs/distill --profile export/android-executorch-int8.yaml --out exports/android
    """
    from kdiqa_edge.config import resolve
    from kdiqa_edge.errors import TensorRTUnavailable
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    cfg = resolve(ExportConfig, profile, target=target, precision=precision, input=input_kind, layout=layout,
                  with_probs=probs, calib=calib, calib_method=calib_method, int8_stem=int8_stem,
                  int8_recipe=int8_recipe, max_drift=max_drift, min_speedup=min_speedup, candidates=candidates,
                  max_batch=max_batch, opset=opset, threads=threads,
                  tensorrt_version=tensorrt_version)
    try:
        manifest = export_checkpoint(checkpoint, cfg, out, data=data, force=force, log=_log, verbose=verbose)
    except TensorRTUnavailable:
        _summary(out)
        raise
    _summary(out, manifest)


def _log(message: str) -> None:
    from kdiqa_edge.console import stream

    typer.secho(message, file=stream("stderr"))  # the user's stderr, also while converter output is captured


def _summary(out: Path, manifest: dict | None = None) -> None:
    """One line per export of this run's manifest, then its notes (drift, latency, slower INT8, trtexec)."""
    from kdiqa_edge.export.pipeline import read_manifest

    manifest = manifest or read_manifest(out)
    for label, entry in manifest.get("exports", {}).items():
        parity = entry.get("parity") or {}
        check = ("parity skipped" if parity.get("skipped") else
                 f"max |diff| vs torch {parity['max_abs_diff']:.1e}" if "max_abs_diff" in parity else "")
        files = ", ".join(f["path"] for f in entry["files"])
        typer.echo(f"{label:16s} {check:32s} {files}")
        for note in entry.get("notes", []):
            typer.echo(f"  {note}")
        if entry.get("unavailable"):
            typer.secho(f"  {entry['unavailable']}", fg="yellow")
    typer.echo(f"manifest: {out / 'manifest.json'}")


def register(app: typer.Typer) -> None:
    app.command("export", no_args_is_help=True)(dataset_options(export_command))
