"""The shipping side's defects found by a third audit (export and bench): what --precision auto ships beside
its pick, options a target ignored, odd values that hung or were killed, and late refusals."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.export import ExportConfig

# --- ExecuTorch --precision auto: the pick gets its phone script, as a named precision does ---------------
# (--target executorch: test_export_executorch.py::test_auto_measures_the_programs_and_ships_the_faster)


def test_cpu_auto_executorch_pick_gets_the_script_and_others_none(tmp_path):
    """cpu auto's ExecuTorch pick (OUT/cpu-auto/model.pte) had no benchmark_on_device.sh either."""
    from kdiqa_edge.export.auto import Candidate, Measured
    from kdiqa_edge.export.base import TARGETS

    cpu = TARGETS.get("cpu")
    cfg = ExportConfig(target="cpu", precision="auto", threads=4)
    pick = Measured(Candidate("executorch:fp32", "fp32", build=None, runtime="executorch"))
    files, notes = cpu.beside(pick, tmp_path / "model.pte", cfg)
    assert files == [tmp_path / "benchmark_on_device.sh"] and "--cpu_threads=4" in files[0].read_text()
    assert len(notes) == 1 and "adb push model.pte" in notes[0]
    assert cpu.beside(Measured(Candidate("onnx:fp32", "fp32", build=None, runtime="onnx")),
                      tmp_path / "model.onnx", cfg) == ([], [])


# --- CoreML: its input is Core ML's image, whatever --input says --------------------------------------------


@pytest.mark.parametrize("how", ["flag", "profile"])
def test_coreml_refuses_an_explicit_float_input(how, tmp_path, capsys):
    """--target coreml --input float wrote an ImageType package (8-bit pixels, normalization inside) and a
    manifest saying uint8: the float tensor asked for was silently not what shipped."""
    from cli_helpers import run_cli

    args = ["export", tmp_path / "no-checkpoint", "--out", tmp_path / "out"]
    if how == "flag":
        args += ["--target", "coreml", "--input", "float"]
    else:
        (tmp_path / "p.yaml").write_text("target: coreml\ninput: float\n")
        args += ["--profile", tmp_path / "p.yaml"]
    code, _, err = run_cli(args, capsys)
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "--target coreml takes an image" in err and not (tmp_path / "out").exists()


# --- odd numbers: refused in one line, not a hang or a kill for memory ------------------------------------


def test_export_threads_beyond_reason_are_refused():
    """--threads 100000 (or a profile's) opened ONNX Runtime sessions with that many threads: the export hung
    (1024 threads took 40 s a session on 2 cores)."""
    with pytest.raises(ConfigError, match="threads is at most 256"):
        ExportConfig(threads=100_000).validate()
    ExportConfig(threads=256).validate()


@pytest.mark.parametrize("args, message", [(["--threads", "100000"], "--threads is at most 256"),
                                           (["--batch-sizes", "1,100000"], "at most 1024 images a batch")])
def test_bench_numbers_beyond_reason_are_one_line(args, message, tmp_path, capsys):
    """bench --batch-sizes 100000 was killed for memory after its warm-up began (exit 137, no word); --threads
    100000 hung opening the session."""
    from cli_helpers import run_cli

    code, _, err = run_cli(["bench", tmp_path / "model.onnx", *args], capsys)
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1 and message in err, err


# --- a profile's bad value for one target: refused before any work ----------------------------------------


@pytest.mark.parametrize("profile, message", [
    ("target: coreml\ncoreml_target: iOS99\n", "unknown CoreML deployment target 'iOS99'"),
    ("target: tensorrt\ntensorrt_version: abc\n", "TensorRT version must look like 10.3, got 'abc'")])
def test_a_target_value_that_cannot_work_is_refused_before_any_work(profile, message, tmp_path, capsys):
    """Both were refused only after the synthetic set was generated and decoded (and the TensorRT one after
    the ONNX export too), leaving OUT with its lock file."""
    from cli_helpers import run_cli

    if "coreml" in profile:
        pytest.importorskip("coremltools")
    (tmp_path / "p.yaml").write_text(profile)
    code, _, err = run_cli(["export", tmp_path / "no-checkpoint", "--profile", tmp_path / "p.yaml",
                            "--out", tmp_path / "out"], capsys)
    # (the last line: in this process torch may log its pytree notice as coremltools is first imported)
    assert code == ConfigError.exit_code and err.strip().splitlines()[-1].startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


# --- options a target never read: refused, as --int8-stem block and --candidates are ----------------------


@pytest.mark.parametrize("options, message", [
    ({"target": "tensorrt", "precision": "int8", "int8_recipe": "dw-float"}, "--target tensorrt quantizes"),
    ({"target": "executorch", "precision": "int8", "int8_recipe": "dw-float"}, "--target executorch"),
    ({"target": "onnx", "precision": "auto", "int8_recipe": "dw-float"}, "auto measures every one"),
    ({"target": "cpu", "precision": "auto", "int8_recipe": "compute-only"}, "--target cpu quantizes"),
])
def test_int8_recipe_where_no_recipe_is_read_is_refused(options, message):
    """The TensorRT form, ExecuTorch, OpenVINO and CoreML quantize their own way, and auto measures every
    recipe: --int8-recipe was accepted there, recorded in the manifest's config, and changed nothing."""
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**options).validate()
    ExportConfig(target="onnx", precision="int8", int8_recipe="dw-float").validate()
    ExportConfig(target="all", precision="int8", int8_recipe="dw-float").validate()  # onnx-int8 reads it


@pytest.mark.parametrize("target, precision", [("executorch", "int8"), ("executorch", "auto"),
                                               ("coreml", "int8")])
def test_calib_method_a_target_cannot_honour_is_refused_before_any_work(target, precision):
    """ExecuTorch's XNNPACKQuantizer (a histogram observer) and coremltools calibrate their own way:
    --calib-method entropy was accepted and recorded, and the program was the same as with minmax."""
    from kdiqa_edge.export.base import TARGETS

    if target == "coreml":
        pytest.importorskip("coremltools")
    cfg = ExportConfig(target=target, precision=precision, calib_method="entropy").validate()
    with pytest.raises(ConfigError, match="--calib-method entropy: .*leave --calib-method out"):
        TARGETS.get(target).preflight(cfg)


def test_the_gate_sizes_the_model_not_the_phone_script_beside_it():
    """An ExecuTorch pick now ships with benchmark_on_device.sh: --max-size-mb judges the program alone."""
    from kdiqa_edge.export.pipeline import pick_figures

    entry = {"files": [{"path": "cpu-auto/model.pte", "bytes": 2_000_000},
                       {"path": "cpu-auto/benchmark_on_device.sh", "bytes": 1_117}],
             "drift": {}, "details": {"auto": {"pick": "executorch:fp32", "candidates": []}}}
    assert pick_figures("cpu-auto", entry).size_mb == 2.0


def test_executorch_refuses_a_max_batch_it_would_not_build(tmp_path, capsys):
    """--target executorch --max-batch 16 wrote a batch-1 program with static shapes: the batch asked for was
    silently not what shipped."""
    from cli_helpers import run_cli

    code, _, err = run_cli(["export", tmp_path / "no-checkpoint", "--target", "executorch",
                            "--precision", "int8", "--max-batch", "16", "--out", tmp_path / "out"], capsys)
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "ExecuTorch programs are batch 1" in err and not (tmp_path / "out").exists()


# --- the engine file: a damaged one is one line ------------------------------------------------------------


@pytest.mark.parametrize("content", [b"KDIQATRT", b"KDIQATRT\x02", b"KDIQATRT\x02\x00\x00\x00[]"])
def test_a_damaged_engine_file_is_one_line(content, tmp_path):
    """An engine cut off inside its header length was struct.error (a traceback in `score`); a header that is
    JSON but not an object failed later, deep in the metadata."""
    from kdiqa_edge.artifact import read_engine_file
    from kdiqa_edge.errors import CheckpointError

    (tmp_path / "model.engine").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.engine: (truncated engine file|corrupt engine header)"):
        read_engine_file(tmp_path / "model.engine")


def test_min_speedup_outside_auto_is_refused():
    """--min-speedup 2 with --precision int8 was accepted, recorded, and shipped the INT8 model regardless."""
    with pytest.raises(ConfigError, match="--min-speedup is what --precision auto asks"):
        ExportConfig(target="onnx", precision="int8", min_speedup=2.0).validate()
    ExportConfig(target="onnx", precision="auto", min_speedup=2.0).validate()
    ExportConfig(target="onnx", precision="int8").validate()  # the default, as a profile may carry it
