"""What an audit of the OpenVINO target, its runtime and cross-runtime auto found, each pinned: Ctrl-C after two IRs
were released interrupts instead of crashing, a file that is not an IR (or a damaged one) is one line naming what
is wrong with no other program's log, OpenVINO's BATCH device is refused before any work, an INT8 auto pick
records its weights and NNCF's settings as `--precision int8` does, NNCF's missing entropy calibration leaves the
OpenVINO INT8 candidates out with a line, not failed rows.

Tiny random-init test_resnet students at 64 px, IRs written by `write_ir` (no CLI export) where that is enough.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("open_clip")

from kdiqa_edge.errors import CheckpointError, ConfigError
from kdiqa_edge.export import TARGETS, ExportConfig, auto, isolated
from kdiqa_edge.export import openvino as ovt


@pytest.fixture(scope="module")
def examples(scored_examples):
    return scored_examples(16)


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_student, examples) -> Path:
    """The tiny student's f32 IR, float NCHW input."""
    from kdiqa_edge.export.pipeline import artifact_meta

    folder = tmp_path_factory.mktemp("audit-ir")
    onnx_path = ovt.fp32_onnx(tiny_student, ExportConfig(), folder)
    return ovt.write_ir(tiny_student, onnx_path, examples, folder, ExportConfig(target="openvino"),
                        artifact_meta(tiny_student), "fp32")[0]


def _python(code: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KDIQA_DEBUG", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


# --- Ctrl-C ---------------------------------------------------------------------------------------------------


def test_ctrl_c_after_two_irs_were_released_in_the_order_they_were_made_interrupts(ir):
    """Each ov.Core's CPU plugin gave the compiling thread an alternate signal stack of its own, and put back the
    one it found when it went: with a Core per model, releasing two models first-made-first (auto's
    `models.clear()` before its timing) left the main thread on freed memory, and Ctrl-C during cpu-auto's timing
    was a SIGSEGV (exit -11, no message, the staging folders left behind) instead of an interrupt."""
    done = _python("""
        import gc, os, signal, sys, time
        from kdiqa_edge.runtime import QualityModel

        signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, wherever pytest runs
        first = QualityModel.load(sys.argv[1], threads=1)
        second = QualityModel.load(sys.argv[1], threads=1)
        del first
        gc.collect()
        del second
        gc.collect()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        except KeyboardInterrupt:
            print("interrupted")
        """, ir)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "interrupted"


# --- files that are not (whole) IRs -----------------------------------------------------------------------------


def test_a_file_that_is_not_an_ir_is_one_line_without_other_programs_logs(ir, tmp_path, small_synthetic):
    """read_model tried every frontend on it: TensorFlow's logged two absl lines to stderr, and the error said
    '"Please check that model format: ".xml" is supported ... Available frontends: jax paddle onnx ...'."""
    image = min((Path(small_synthetic.root) / "images").iterdir())
    for name, text in (("garbage", "garbage\n"), ("other", '<?xml version="1.0"?>\n<config><a/></config>\n'),
                       ("empty", "")):
        (tmp_path / f"{name}.xml").write_text(text)
        (tmp_path / f"{name}.bin").write_bytes(ir.with_suffix(".bin").read_bytes())
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("KDIQA_DEBUG", None)
        done = subprocess.run([sys.executable, "-m", "kdiqa_edge", "score", str(tmp_path / f"{name}.xml"), str(image)],
                              capture_output=True, text=True, env=env, timeout=240)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == CheckpointError.exit_code, done.stderr
        assert len(lines) == 1 and "not an OpenVINO IR" in lines[0], done.stderr


def test_a_damaged_ir_says_which_of_its_files_is_damaged(ir, tmp_path):
    from kdiqa_edge.runtime import QualityModel

    xml, weights = ir.read_bytes(), ir.with_suffix(".bin").read_bytes()
    (tmp_path / "cut.xml").write_bytes(xml[: len(xml) // 2])
    (tmp_path / "cut.bin").write_bytes(weights)
    with pytest.raises(CheckpointError, match=r"cut\.xml: openvino cannot read it: the \.xml is not well-formed XML"):
        QualityModel.load(tmp_path / "cut.xml")
    (tmp_path / "short.xml").write_bytes(xml)
    (tmp_path / "short.bin").write_bytes(weights[:1000])
    with pytest.raises(CheckpointError, match=r"short\.xml: openvino cannot read it: the \.bin is shorter than the "
                                              r"\.xml needs"):
        QualityModel.load(tmp_path / "short.xml")


def test_reason_drops_openvinos_source_locations():
    from kdiqa_edge.runtime.openvino import _reason

    npu = RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nException from src/plugins/a.cpp:54:\n"
                       "VCL compiler loading failed, aborting. Error: Exception from src/plugins/vcl_api.cpp:22:\n"
                       "Cannot load library \"libnpu.so\": cannot open shared object file\n\n")
    assert _reason(npu) == ('VCL compiler loading failed, aborting. Cannot load library "libnpu.so": cannot open '
                            "shared object file")


# --- devices ------------------------------------------------------------------------------------------------


def test_batch_device_is_refused_in_one_line_and_auto_keeps_the_recorded_precision(ir, examples):
    """BATCH:CPU passed the device check, then failed in compile_model on our own DEVICE_PROPERTIES ("Unsupported
    config key"), an error that blamed the model."""
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.openvino import device_name

    with pytest.raises(ConfigError, match=r"--provider BATCH:CPU is not one"):
        device_name("BATCH:CPU")
    with pytest.raises(ConfigError, match=r"--provider batch:cpu is not one"):
        QualityModel.load(ir, provider="batch:cpu", threads=1)
    # AUTO, MULTI and HETERO pass the recorded f32 on to the CPU (OpenVINO's CPU default is bf16 on BF16 CPUs)
    on_cpu = QualityModel.load(ir, threads=1).predict(examples.test)
    for device in ("AUTO", "MULTI:CPU", "HETERO:CPU"):
        np.testing.assert_array_equal(QualityModel.load(ir, provider=device, threads=1).predict(examples.test), on_cpu)


# --- auto ---------------------------------------------------------------------------------------------------


def test_an_int8_auto_pick_records_its_weights_and_nncf_settings(tiny_student, examples, tmp_path):
    """`--target openvino --precision auto` shipping INT8 wrote `weights: fp32` (the .bin held int8 weights) and
    none of NNCF's settings (preset, model type, ignored scope) that `--precision int8` records in details.int8."""
    from kdiqa_edge.export.pipeline import artifact_meta

    ms = {"fp32": 2.0, "int8:stem-int8": 1.0}

    def timer(measured, model, x):
        return ms[measured.name] / 1e3 * len(x)

    cfg = ExportConfig(target="openvino", precision="auto", max_drift=2.0, min_speedup=1.0, latency_runs=3,
                       calib=16, candidates="int8:stem-int8")
    result = auto.export_auto(TARGETS.get("openvino"), tiny_student, examples, tmp_path, cfg,
                              artifact_meta(tiny_student), timer=timer, log=lambda _: None)
    assert result.extra["auto"]["pick"] == "int8:stem-int8" and result.precision == "int8"
    assert result.extra["weights"] == "int8 + fp32" == result.extra["recipe"]["weights"]
    int8 = result.extra["int8"]
    assert int8["quantizer"] == "nncf.quantize" and int8["stem"] == "int8" and int8["calibration_images"] == 16
    assert int8["preset"] == "performance" and int8["model_type"] == "default"  # a ReLU net, no attention
    assert any(name.startswith("/head/") for name in int8["ignored_scope"])
    rows = {r["name"]: r for r in result.extra["auto"]["candidates"]}
    assert rows["int8:stem-int8"]["recipe"]["preset"] == "performance" and rows["fp32"]["recipe"]["weights"] == "fp32"
    # what the file holds: int8 weights, well under the f32 IR's
    assert (tmp_path / "model.bin").stat().st_size < 0.5 * rows["fp32"]["bytes"]


def test_entropy_calibration_leaves_openvino_int8_out_of_cpu_auto_with_a_line(tiny_student, examples, tmp_path):
    """--calib-method entropy (ONNX Runtime's) with cpu-auto: OpenVINO's INT8 candidates were built anyway and each
    failed with 'NNCF quantization of test_resnet failed: KeyError: 'entropy''."""
    from kdiqa_edge.export.pipeline import artifact_meta

    cfg = ExportConfig(target="cpu", precision="auto", calib_method="entropy")
    own = ExportConfig(target="openvino", precision="auto", calib_method="entropy")
    names = [c.name for c in TARGETS.get("openvino").candidates(tiny_student, examples, own,
                                                                artifact_meta(tiny_student), tmp_path)]
    assert names == ["fp32", *(["bf16"] if ovt.bf16_here() else [])]
    said = [line for line in TARGETS.get("cpu").left_out(cfg) if line.startswith("openvino int8:")]
    assert said == ["openvino int8: NNCF has no entropy calibration (--calib-method entropy): no int8 candidates "
                    "(minmax or percentile offers them)"]
    minmax = ExportConfig(target="openvino", precision="auto")
    assert "int8:stem-float" in [c.name for c in TARGETS.get("openvino").candidates(
        tiny_student, examples, minmax, artifact_meta(tiny_student), tmp_path / "minmax")]


def test_isolated_timing_counts_its_candidates_in_words(monkeypatch, tmp_path):
    from kdiqa_edge.export import measure
    from kdiqa_edge.export.auto import Candidate, Measured

    monkeypatch.setattr(measure, "in_own_process", lambda path, sample, batches, *args: {b: [1e-3] * 3
                                                                                        for b in batches})
    item = Measured(Candidate("onnx:fp32", "fp32", build=None, reference=True))
    item.path, item.drift, item.bytes = tmp_path / "model.onnx", {"delta_srcc": 0.0}, 1
    said = []
    isolated.rank_isolated([item], np.zeros((1, 8, 8, 3), np.uint8), ExportConfig(precision="auto", max_batch=1),
                           max_drift=0.01, work=tmp_path / "t", log=said.append, rounds=1)
    assert said[0] == "  timing 1 candidate, each in processes of its own (1 alternated round)"
