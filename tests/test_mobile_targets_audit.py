"""The mobile and GPU targets' defects found by audit: ExecuTorch INT8 with --with-map, the device scripts'
working folder, the TensorRT FP16 notes, CoreML int8's float head and projection."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from kdiqa_edge.export import ExportConfig


@pytest.fixture(scope="module")
def student(student_checkpoints):
    from kdiqa_edge.models import load_checkpoint

    return load_checkpoint(student_checkpoints("audit-mobile", {"student": "test_resnet"})["student"])


@pytest.fixture(scope="module")
def examples(student):
    from kdiqa_edge.export import Examples
    from kdiqa_edge.export.evaluate import torch_reference

    images = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    return Examples(parity=images[:4], calib=images[:8], test=images, test_mos=torch_reference(student, images))


def _fake_tool(folder: Path, name: str, record: Path) -> None:
    """A stand-in for `name` on PATH: it records the folder it ran in and its arguments."""
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f'#!/bin/sh\necho "$(pwd) $*" >> {record}\n')
    tool.chmod(0o755)


def _run_elsewhere(script: Path, tmp_path: Path, tool: str) -> list[str]:
    """Run `script` by its path from another folder, `tool` faked; the folder each call ran in and its args."""
    record = tmp_path / f"{tool}.calls"
    _fake_tool(tmp_path / "bin", tool, record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(script)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


# --- ExecuTorch ---------------------------------------------------------------------------------------------


def test_executorch_int8_with_map_keeps_the_projection_float_both_times(student, examples, tmp_path):
    """--with-map runs the projection twice (pooled, and per position through a reshape): one was int8 and
    the other float over one shared weight, and XNNPACK refused the program ("Failed to create linear node")."""
    pytest.importorskip("executorch")
    from kdiqa_edge.export import executorch as et
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models.score import ScoreModel

    scored = ScoreModel(student, with_map=True)
    graph = torch.export.export(scored, (scored.example_input(1),)).module()
    linears = [n.name for n in graph.graph.nodes if et._is_compute(n) and et._op_name(n) == "linear"]
    assert len(linears) == 2 and set(linears) <= et.float_nodes(graph, stem=False)

    cfg = ExportConfig(target="executorch", precision="int8", with_map=True, latency_runs=2)
    program = et.build_program(student, examples, tmp_path, cfg, artifact_meta(student), "int8")
    assert program.int8["stem"] == "float" and program.test_scores.shape == (16,)
    report = et.check_map(student, program, examples, cfg, artifact_meta(student), {})
    assert report["shape"] == [2, 2] and report["parity"]["max_abs_diff"] < 0.1


def test_benchmark_on_device_script_runs_from_any_folder(tmp_path):
    from kdiqa_edge.export import executorch as et

    out = tmp_path / "executorch-int8"
    out.mkdir()
    (out / "model.int8.pte").write_bytes(b"program")
    script = et.write_device_script(out, "model.int8.pte", threads=4)
    assert script.stat().st_mode & stat.S_IXUSR  # ./benchmark_on_device.sh
    calls = [call.split(" ", 1) for call in _run_elsewhere(script, tmp_path, "adb")]
    (folder, args), = [call for call in calls if call[1].startswith("push ")]
    assert Path(folder) == out and args.startswith("push model.int8.pte ")  # the push finds the program


# --- TensorRT -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensorrt_fp16(student, examples, tmp_path_factory):
    """The tensorrt target's FP16 export where tensorrt does not import: the ONNX, trtexec.sh and the notes."""
    pytest.importorskip("onnx")
    from kdiqa_edge.export.base import TARGETS
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.export.tensorrt import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("tensorrt imports here: the engine would be built")
    out = tmp_path_factory.mktemp("tensorrt-fp16")
    cfg = ExportConfig(target="tensorrt", precision="fp16", input="uint8", latency_runs=2, parity_images=4)
    return out, TARGETS.get("tensorrt").export(student, examples, out, cfg, artifact_meta(student))


def test_tensorrt_fp16_notes_do_not_advise_onnx_runtime(tensorrt_fp16):
    """The FP16 ONNX is for TensorRT on a GPU: ONNX Runtime emulating FP16 on this CPU said "ship the FP32
    model for ONNX Runtime here", which is no advice for a Jetson."""
    _, result = tensorrt_fp16
    notes = "\n".join(result.notes)
    assert "ship the FP32 model for ONNX Runtime" not in notes and "SLOWER" not in notes
    latency = next(i for i, note in enumerate(result.notes) if "latency at batch 1, ONNX Runtime CPU" in note)
    assert "not the engine's speed" in result.notes[latency + 1]
    assert result.unavailable and "NO ENGINE WAS BUILT" in result.unavailable


def test_trtexec_script_runs_from_any_folder(tensorrt_fp16, tmp_path):
    out, result = tensorrt_fp16
    script = out / "trtexec.sh"
    assert script in result.files and script.stat().st_mode & stat.S_IXUSR
    (call,) = _run_elsewhere(script, tmp_path, "trtexec")
    folder, args = call.split(" ", 1)
    assert Path(folder) == out and "--onnx=model.fp16.onnx" in args.split()  # the ONNX is found
    assert (Path(folder) / "model.fp16.onnx").is_file()
    # the note's command names the ONNX by file name too: it points at the script, which runs from anywhere
    assert any(note.startswith("trtexec equivalent: trtexec.sh (beside model.fp16.onnx") for note in result.notes)


# --- CoreML -------------------------------------------------------------------------------------------------


def test_coreml_int8_keeps_the_head_and_projection_weights_float(student):
    """Every other target keeps the folded head and the projection feeding it in float at INT8; CoreML's
    linear_quantize_weights took every 2-D weight of 2048+ elements, the projection (and ViT-B/32's 5 x 512
    anchors) among them."""
    pytest.importorskip("coremltools")
    from kdiqa_edge.export import coreml

    mlmodel = coreml.convert(student, ExportConfig(target="coreml", precision="int8"), {"source": {"arch": "x"}})
    ops = list(mlmodel._mil_program.functions["main"].operations)
    quantized = [op for op in ops if op.op_type.startswith("constexpr_")]
    assert any(len(op.outputs[0].shape) == 4 for op in quantized)  # the convs' weights are int8
    assert not [op.name for op in quantized if len(op.outputs[0].shape) == 2]  # head and projection are not
    proj = student.proj.weight.detach().numpy()
    floats = [op for op in ops if op.op_type == "const" and op.outputs[0].shape == proj.shape]
    assert len(floats) == 1 and np.allclose(floats[0].outputs[0].val.astype(np.float32), proj, atol=1e-3)


def _blocked(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which `module` raises ImportError (as where it is not installed)."""
    blocker = tmp_path / "blocked" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f'raise ImportError("No module named {module} (blocked by the test)")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    env.pop("KDIQA_DEBUG", None)
    return env


def test_coreml_without_coremltools_is_one_line_naming_the_extra(student_checkpoints, tmp_path):
    """Was a traceback (ImportError from inside the converter) and a .failed.log in OUT."""

    checkpoint = student_checkpoints("audit-mobile-coreml", {"student": "test_resnet"})["student"]
    done = subprocess.run([sys.executable, "-m", "kdiqa_edge", "export", str(checkpoint), "--target", "coreml",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=_blocked(tmp_path, "coremltools"), timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the coreml target needs coremltools") and "kdiqa-edge[export]" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_coreml_preflight_keeps_coremltools_import_chatter_off_the_terminal():
    """The preflight imports coremltools before the export's output is captured: its version warnings
    (scikit-learn, torch), the native proxies it cannot load off macOS and torch's pytree deprecation must
    not reach the user."""

    pytest.importorskip("coremltools")
    done = subprocess.run([sys.executable, "-c", "from kdiqa_edge.export.coreml import CoreMLTarget; "
                                                 "from kdiqa_edge.export import ExportConfig; "
                                                 "CoreMLTarget().preflight(ExportConfig(target='coreml'))"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


def test_executorch_phone_note_points_at_the_script(student, examples, tmp_path):
    """The note's adb commands name the program by file name: pasted from the folder the export ran in they
    failed (`adb push model.fp32.pte`: no such file). It names the script beside the program, which runs them
    from there."""
    pytest.importorskip("executorch")
    from kdiqa_edge.export.base import TARGETS
    from kdiqa_edge.export.pipeline import artifact_meta

    cfg = ExportConfig(target="executorch", latency_runs=2)
    result = TARGETS.get("executorch").export(student, examples, tmp_path, cfg, artifact_meta(student))
    (note,) = [note for note in result.notes if note.startswith("on the phone:")]
    assert note.startswith("on the phone: benchmark_on_device.sh (beside model.fp32.pte")
    assert "adb push model.fp32.pte /data/local/tmp/kdiqa/model.fp32.pte" in note
    assert tmp_path / "benchmark_on_device.sh" in result.files


def test_trtexec_script_names_a_relative_timing_cache_from_where_the_export_ran(tmp_path, monkeypatch):
    """trtexec.sh runs from its own folder: a --timing-cache named relative to the export's folder would
    otherwise point beside the script."""
    from kdiqa_edge.export.tensorrt import script_timing_cache

    monkeypatch.chdir(tmp_path)
    named = script_timing_cache(ExportConfig(target="tensorrt", timing_cache="caches/trt.cache"))
    assert named == tmp_path / "caches" / "trt.cache" and named.is_absolute()
    assert script_timing_cache(ExportConfig(target="tensorrt")) == Path("timing.cache")  # beside the script


def test_coreml_int8_keeps_the_stem_float_unless_asked_otherwise(student):
    """--int8-stem float (the default) keeps the stem's conv float, as the other targets do; before, CoreML read
    no --int8-stem and quantized the conv over the RGB channels (BN folded in) with the rest (a real stem, such
    as resnet18's 9,408 weights, is over linear_quantize_weights' 2,048 threshold; this tiny one is not, so
    the test reads the names int8 is told to keep float)."""
    pytest.importorskip("coremltools")
    import torch
    from coremltools.optimize.coreml import get_weights_metadata

    from kdiqa_edge.export import coreml

    mlmodel = coreml.convert(student, ExportConfig(target="coreml", precision="fp16"), {"source": {"arch": "x"}})
    kept = {stem: set(coreml.float_weights(mlmodel, student, stem)) for stem in ("float", "int8")}
    (stem,) = kept["float"] - kept["int8"]
    weights = get_weights_metadata(mlmodel, weight_threshold=0)
    first = next(m for m in student.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert weights[stem].val.shape == tuple(first.weight.shape)  # the first conv, over the RGB channels
    assert kept["int8"] and kept["int8"] < kept["float"]  # the head and the projection stay float either way
