"""Quiet exports: the converters' output goes to OUT/<target>-<precision>/export.log, not the terminal."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from kdiqa_edge.errors import ExportError
from kdiqa_edge.export import TARGETS, ExportConfig, export_checkpoint


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A random-init test_resnet: timm zero-inits each block's last norm, so some fused conv channels are 0."""
    import torch

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    model = create_student("test_resnet", teacher.head, teacher.preprocess, pretrained=False)
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoint") / "student")


def _noisy(monkeypatch, fail: Exception | None = None) -> None:
    """The onnx target, first doing what converters do: warn, print, write to fd 2 from C."""
    target = TARGETS.get("onnx")
    original = target.export

    def export(model, examples, out, cfg, meta):
        warnings.warn("a UserWarning raised inside the target", UserWarning, stacklevel=1)
        print("Running MIL default pipeline: 100%")
        os.write(2, b"a C library writing to fd 2\n")
        if fail is not None:
            raise fail
        return original(model, examples, out, cfg, meta)

    monkeypatch.setattr(target, "export", export)


NOISE = ("UserWarning: a UserWarning raised inside the target", "Running MIL default pipeline",
         "a C library writing to fd 2")


def test_a_warning_raised_inside_a_target_ends_up_in_its_export_log(student, small_synthetic, tmp_path, monkeypatch,
                                                                      capfd):
    _noisy(monkeypatch)
    out = tmp_path / "exports"
    manifest = export_checkpoint(student, ExportConfig(parity_images=8), out, data=small_synthetic, progress=False,
                                 log=print)
    console = "".join(capfd.readouterr())
    log = (out / "onnx-fp32" / "export.log").read_text()
    for line in NOISE:
        assert line in log and line not in console, line
    assert "onnx-fp32: exporting..." in console  # our own progress stays
    assert manifest["exports"]["onnx-fp32"]["log"] == "onnx-fp32/export.log"
    assert (out / "onnx-fp32" / "model.fp32.onnx").is_file()


def test_a_failed_export_keeps_its_log_and_names_it(student, small_synthetic, tmp_path, monkeypatch, capfd):
    out = tmp_path / "exports"
    _noisy(monkeypatch, fail=ExportError("parity failed: max |score - torch score| = 1e-1"))
    with pytest.raises(ExportError, match="parity failed") as failure:
        export_checkpoint(student, ExportConfig(parity_images=8), out, data=small_synthetic, progress=False,
                          log=lambda _: None)
    kept = out / "onnx-fp32.failed.log"
    assert str(kept) in str(failure.value)
    assert all(line in kept.read_text() for line in NOISE)
    assert not (out / "onnx-fp32").exists() and not list(out.glob(".onnx-fp32.*"))  # nothing partial
    assert not any(line in "".join(capfd.readouterr()) for line in NOISE)

    # a crash that is not one of ours keeps its type and traceback, with the log named under it
    _noisy(monkeypatch, fail=RuntimeError("converter crashed"))
    with pytest.raises(RuntimeError, match="converter crashed") as crash:
        export_checkpoint(student, ExportConfig(parity_images=8), out, data=small_synthetic, progress=False,
                          log=lambda _: None)
    if hasattr(crash.value, "__notes__"):
        assert str(kept) in crash.value.__notes__[0]

    monkeypatch.undo()  # the real target: a success makes the earlier failure's log stale
    export_checkpoint(student, ExportConfig(parity_images=8), out, data=small_synthetic, progress=False,
                      log=lambda _: None)
    assert (out / "onnx-fp32" / "export.log").is_file() and not kept.exists()


def test_verbose_streams_the_converters_output_too(student, small_synthetic, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    _noisy(monkeypatch)
    args = ["export", str(student), "--dataset", "synthetic", "--root", str(small_synthetic.root)]
    quiet = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "quiet")])
    verbose = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "verbose"), "--verbose"])
    assert quiet.exit_code == 0 and verbose.exit_code == 0, quiet.output + verbose.output
    assert not any(line in quiet.output for line in NOISE)
    assert all(line in verbose.output for line in NOISE)
    for result in (quiet, verbose):  # one line per artifact either way (then the `next:` line that benches it)
        assert [line.split()[0] for line in result.output.splitlines()
                if "model.fp32.onnx" in line] == ["onnx-fp32:", "next:"]
    assert all(line in (tmp_path / "verbose" / "onnx-fp32" / "export.log").read_text() for line in NOISE)


def _mil_weights(mlpackage: Path) -> dict[str, tuple]:
    """name -> ("float", w) for each const weight, ("int8", dequantized, scale, axis) for each 8-bit one, as
    read back from the saved .mlpackage (the spec and weight.bin; no CoreML runtime needed)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(mlpackage), skip_model_load=True)
    spec = model.get_spec()
    program = load(spec, spec.specificationVersion, model.weights_dir)
    weights = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_affine_dequantize":
                q = op.quantized_data.val.astype(np.float64)
                axis = int(op.axis.val)
                shape = [1] * q.ndim
                shape[axis] = -1
                scale = op.scale.val.astype(np.float64).reshape(shape)
                dequantized = (q - op.zero_point.val.astype(np.float64).reshape(shape)) * scale
                weights[op.name.removesuffix("_quantized")] = ("int8", dequantized, scale, axis)
            elif op.op_type == "const" and getattr(op.val.val, "ndim", 0) >= 2:
                weights[op.name] = ("float", np.asarray(op.val.val, np.float64))
    return weights


def test_coreml_int8_warnings_go_to_the_log_and_its_weights_match_the_float_ones(student, small_synthetic,
                                                                                 tmp_path, capfd):
    """The coremltools 'divide by zero' / 'invalid value encountered in cast' RuntimeWarnings come from weight
    channels whose scale is 0 (all-zero channels, or below FP16's resolution). Read back from the mlpackage,
    every 8-bit weight is within one quantization step of the FP16 weight (plus the rounding of the step
    itself to FP16), and the scale-0 channels dequantize to exactly 0."""
    pytest.importorskip("coremltools")
    out = tmp_path / "exports"
    for precision in ("fp16", "int8"):
        export_checkpoint(student, ExportConfig(target="coreml", precision=precision), out, data=small_synthetic,
                          progress=False, log=lambda _: None)
    console = "".join(capfd.readouterr())
    log = (out / "coreml-int8" / "export.log").read_text()
    assert re.search(r"RuntimeWarning: (divide by zero|invalid value) encountered", log) and "Running MIL" in log
    assert "RuntimeWarning" not in console and "Running MIL" not in console

    floats = _mil_weights(out / "coreml-fp16" / "model.fp16.mlpackage")
    quantized = {name: w for name, w in _mil_weights(out / "coreml-int8" / "model.int8.mlpackage").items()
                 if w[0] == "int8"}
    assert len(quantized) >= 5 and set(quantized) <= set(floats)
    fp16_scale_rounding = 127 * 2.0 ** -25  # half an FP16 subnormal step, times the largest int8 level
    zero_channels = 0
    for name, (_, dequantized, scale, axis) in quantized.items():
        weight = floats[name][1]
        assert np.isfinite(dequantized).all(), name
        error = np.abs(dequantized - weight)
        assert (error <= scale + fp16_scale_rounding).all(), (name, float((error - scale).max()))
        dead = (scale == 0).reshape(-1)
        zero_channels += int(dead.sum())
        assert (np.moveaxis(dequantized, axis, 0)[dead] == 0).all(), name
        assert (np.abs(np.moveaxis(weight, axis, 0)[dead]) <= 127 * 2.0 ** -24).all(), name
    assert zero_channels > 0  # the case behind the warnings is covered
    details = json.loads((out / "manifest.json").read_text())["exports"]["coreml-int8"]
    assert details["log"] == "coreml-int8/export.log"
