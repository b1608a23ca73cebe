"""onnxruntime's execution providers: which are asked for, the one that runs, and what is said when one cannot."""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime_helpers import SIZE, export_tiny_onnx

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.runtime import QualityModel
from kdiqa_edge.runtime.providers import resolve_providers


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    export_tiny_onnx(folder / "float.onnx")
    export_tiny_onnx(folder / "uint8.onnx", uint8_nhwc=True)
    return folder


def test_execution_providers_explicit_or_best_available():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt", available) == available  # TensorRT, then CUDA, then CPU per node
    assert resolve_providers("cpu", available) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="not available"):
        resolve_providers("coreml", available)


def test_unavailable_provider_is_a_clear_error(onnx_dir):
    import onnxruntime as ort

    from kdiqa_edge.runtime.providers import PROVIDERS

    missing = next(short for short, full in PROVIDERS.items() if full not in ort.get_available_providers())
    with pytest.raises(ConfigError, match="not available"):  # cuda on the CPU build, rocm on onnxruntime-gpu
        QualityModel.load(onnx_dir / "float.onnx", provider=missing)


def test_two_onnxruntime_builds_installed_are_named_as_the_cause(onnx_dir, monkeypatch):
    """onnxruntime and onnxruntime-gpu installed together share one package: whichever was installed last
    wins its files, and CUDA vanishes when that was the CPU build. The error, or the note when the best
    available provider was asked for, says so and how to fix it."""
    import onnxruntime as ort

    from kdiqa_edge.runtime import providers

    assert {"onnxruntime", "onnxruntime-gpu"} & set(providers.onnxruntime_builds())
    monkeypatch.setattr(providers, "onnxruntime_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU build's files won
        with pytest.raises(ConfigError, match="onnxruntime-gpu is installed, but so is onnxruntime") as err:
            QualityModel.load(onnx_dir / "float.onnx", provider="cuda")
        assert fix in str(err.value)
        (note,) = QualityModel.load(onnx_dir / "float.onnx").notes
        assert note.startswith("float.onnx: running on CPUExecutionProvider, not CUDA") and fix in note
    with pytest.raises(ConfigError) as err:  # a provider no such build has: no hint
        QualityModel.load(onnx_dir / "float.onnx", provider="coreml")
    assert "onnxruntime-gpu" not in str(err.value)
    monkeypatch.setattr(providers, "onnxruntime_builds", lambda: ["onnxruntime"])
    assert providers.build_clash("CUDAExecutionProvider") is None


def test_a_listed_provider_that_does_not_start(onnx_dir, monkeypatch, capsys):
    """onnxruntime-gpu lists CUDA on machines with no GPU or no CUDA libraries (the CPU build here, told
    it has CUDA, behaves the same: the session starts on the CPU)."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    model = QualityModel.load(onnx_dir / "float.onnx")  # the best available: the next one runs, and says so
    assert model.backend.provider == "CPUExecutionProvider" and model.backend.device == "cpu"
    (note,) = model.notes  # with onnxruntime's reason (the CPU build: its warning that it has no CUDA)
    assert note.startswith("float.onnx: CUDAExecutionProvider did not start here (") and "()" not in note
    assert note.endswith("); running on CPUExecutionProvider")
    assert model.predict(np.zeros((2, SIZE, SIZE, 3), np.uint8)).shape == (2,)
    assert QualityModel.load(onnx_dir / "float.onnx", provider="cpu").notes == []
    with pytest.raises(ConfigError, match="CUDAExecutionProvider failed to initialise"):
        QualityModel.load(onnx_dir / "float.onnx", provider="cuda")  # asked for by name: an error


# What onnxruntime-gpu 1.31 printed to fd 2 here (no NVIDIA driver) when a session asked for CUDA: colour-coded
# default-logger lines, the reset code on a line of its own
_ORT_NO_DRIVER = (
    "\x1b[1;31m2026-12-01 18:14:29.319335616 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/venv/lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
    "libcuda.so.1: cannot open shared object file: No such file or directory\n\x1b[m\n"
    "\x1b[0;93m2026-12-01 18:14:29.319381795 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
    "CUDA 13.*.\x1b[m\n")
_NO_DRIVER_REASON = ("Failed to load library libonnxruntime_providers_cuda.so with error: libcuda.so.1: cannot "
                     "open shared object file: No such file or directory")


def test_provider_reason_is_onnxruntimes_error_in_one_line():
    from kdiqa_edge.runtime.providers import _split_ort_log, provider_reason

    logged, other = _split_ort_log([*_ORT_NO_DRIVER.splitlines(keepends=True), "a line of someone else's\n"])
    assert [level for level, _ in logged] == ["E", "W"] and other == ["a line of someone else's\n"]
    assert provider_reason(logged, [], None) == _NO_DRIVER_REASON  # the error first, paths cut to file names
    assert provider_reason(logged[1:], [], None).startswith("Failed to create CUDAExecutionProvider")
    device = [("E", "CUDA failure 100: no CUDA-capable device is detected ; GPU=-1 ; hostname=x ; "
                    "file=/onnxruntime_src/cuda_call.cc ; line=118 ; expr=cudaGetDeviceCount(&num_devices);")]
    assert provider_reason(device, [], None) == "CUDA failure 100: no CUDA-capable device is detected"
    assert provider_reason([], ["Specified provider 'X' is not in available provider names."], None) == \
        "Specified provider 'X' is not in available provider names."
    assert provider_reason([], [], RuntimeError("/src/pybind_state.cc:729 Please install TensorRT")) == \
        "pybind_state.cc:729 Please install TensorRT"
    assert provider_reason([], [], None) is None


def test_a_provider_that_cannot_start_prints_nothing_of_onnxruntimes(onnx_dir, monkeypatch, capfd):
    """onnxruntime-gpu without a working GPU: its log lines on fd 2 and its fallback banner on stdout (which
    would land in `score --csv` output) are held back; our note carries the reason. Where opening raises (the
    TensorRT provider without TensorRT), the providers after it are tried here, not by onnxruntime."""
    import os
    import warnings

    import onnxruntime as ort

    real = ort.InferenceSession
    seen = []

    def noisy(model, options, providers, **kwargs):
        seen.append((list(providers), kwargs.get("enable_fallback")))
        os.write(2, _ORT_NO_DRIVER.encode())
        warnings.warn("a warning about something else", UserWarning, stacklevel=1)  # passed on, not swallowed
        if providers[0] == "TensorrtExecutionProvider":
            raise RuntimeError("/onnxruntime_src/pybind_state.cc:729 Please install TensorRT libraries")
        return real(model, options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", noisy)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="something else"):
        model = QualityModel.load(onnx_dir / "float.onnx")
    assert model.notes == [f"float.onnx: CUDAExecutionProvider did not start here ({_NO_DRIVER_REASON}); "
                           "running on CPUExecutionProvider"]
    assert model.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8)).shape == (1,)
    with pytest.raises(ConfigError, match=r"TensorrtExecutionProvider failed to initialise \(Failed to load"), \
            pytest.warns(UserWarning):
        QualityModel.load(onnx_dir / "float.onnx", provider="tensorrt")
    assert seen[-2:] == [(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 0),
                         (["CUDAExecutionProvider", "CPUExecutionProvider"], 0)]  # onnxruntime's fallback off
    out, err = capfd.readouterr()
    assert "onnxruntime" not in out + err and "EP Error" not in out


def test_an_accelerator_that_fails_while_running_falls_back_with_a_note(onnx_dir, caplog):
    """onnxruntime's own run-time fallback (off: it prints to stdout) done here: the session goes on with the
    providers after the one that failed, and says so."""
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    model = QualityModel.load(onnx_dir / "uint8.onnx", provider="cpu")  # its input: uint8 NHWC, as below
    backend, session = model.backend, model.backend.session

    class FailsOnce:  # a session started on CUDA whose engine build fails on the first run
        def __init__(self):
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_providers(self):
            return self.providers

        def set_providers(self, providers):
            self.providers = providers

        def run(self, names, feed):
            if self.providers[0] != "CPUExecutionProvider":
                raise EPFail("CUDA error cudaErrorNoKernelImageForDevice: no kernel image is available")
            return session.run(names, feed)

    backend.session, backend.provider, backend.device = FailsOnce(), "CUDAExecutionProvider", "cuda"
    x = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    assert np.allclose(backend.run(x), session.run(backend.output_names, {backend.input_name: x})[0].reshape(-1))
    assert backend.provider == "CPUExecutionProvider" and backend.device == "cpu"
    assert backend.notes == ["uint8.onnx: CUDAExecutionProvider failed while running (CUDA error "
                             "cudaErrorNoKernelImageForDevice: no kernel image is available); running on "
                             "CPUExecutionProvider from here"]
    assert backend.notes[0] in caplog.text and model.notes == backend.notes  # score/bench read the model's
    backend.session.providers = ["CPUExecutionProvider"]
    backend.session.run = lambda *_: (_ for _ in ()).throw(EPFail("cpu"))
    with pytest.raises(EPFail):  # nothing left to fall back to
        backend.run(x)


def test_cuda_libraries_preloaded_once_and_quietly(monkeypatch, capsys):
    import sys

    import onnxruntime as ort

    from kdiqa_edge.runtime import providers

    calls = []

    def preload_dlls():
        calls.append(1)
        print("Failed to load libcudnn.so.9: cannot open shared object file")  # what onnxruntime-gpu prints

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(providers, "_preloaded", False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    providers.preload_cuda_libraries("CPUExecutionProvider")  # no CUDA session: nothing to load
    assert calls == []
    providers.preload_cuda_libraries("CUDAExecutionProvider")
    providers.preload_cuda_libraries("CUDAExecutionProvider")
    assert calls == [1] and capsys.readouterr().out == ""
    monkeypatch.setattr(providers, "_preloaded", False)
    monkeypatch.setitem(sys.modules, "torch", object())  # torch imported: its CUDA libraries are loaded
    providers.preload_cuda_libraries("CUDAExecutionProvider")
    assert calls == [1]
