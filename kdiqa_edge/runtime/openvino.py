"""The OpenVINO backend: a kdiqa-edge OpenVINO IR (`model.<precision>.xml` + `.bin`) through openvino's runtime.

Torch-free: openvino is imported when the backend is built, so this module imports anywhere numpy does. It
registers itself in `kdiqa_edge.runtime.base.BACKENDS` (`kdiqa_edge.runtime` imports it).

- The kdiqa_edge.* metadata is in the IR's rt_info, under `kdiqa_edge/<key>` (`read_meta`): the .xml alone
  describes the model (its weights are in the .bin beside it).
- The device is OpenVINO's: `provider` CPU (default), GPU, NPU, AUTO, or any name OpenVINO takes (GPU.1,
  AUTO:GPU,CPU, HETERO:...); lower case works too. It is compiled with `PERFORMANCE_HINT: LATENCY`,
  `INFERENCE_NUM_THREADS` from `threads` (CPU) and the `INFERENCE_PRECISION_HINT` the file records
  (`kdiqa_edge/inference_precision`: f32, bf16 or f16; BF16 and FP16 exports are inference precisions over
  the same IR; an INT8 IR's is what its float regions run in, f32 or bf16: `int8:bf16+stem-*` candidates).
  Without a recorded hint, f32: OpenVINO's CPU plugin would otherwise run an FP32 IR in bf16 on CPUs with
  AVX512-BF16 or AMX, silently.
- A recorded precision the device cannot run (bf16 on a CPU without BF16, f16 on one without AVX512-FP16) is
  not an error: OpenVINO runs the nearest it has, and `notes` says which it did (`inference_precision`).
- Every IR is compiled by one Core per process (`shared_core`: a Core per model made Ctrl-C a SIGSEGV).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge import artifact
from kdiqa_edge.errors import CheckpointError, ConfigError, MissingDependency, first_line
from kdiqa_edge.runtime.base import BACKENDS
from kdiqa_edge.runtime.info import ArtifactInfo

EXTRA = "openvino"
RT_INFO_SECTION = "kdiqa_edge"  # rt_info path: kdiqa_edge/<key>, the keys of kdiqa_edge.artifact.KEYS
DEFAULT_DEVICE = "CPU"
# OpenVINO's names for the inference precisions, and the OPTIMIZATION_CAPABILITIES entry a device lists for each
HINTS = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
_TYPE_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "f32": "f32", "bf16": "bf16", "f16": "f16"}
# they pick or split over the physical ones (not BATCH: automatic batching is for throughput, and it refuses the
# per-device settings the others pass on)
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI")
_DEVICE = re.compile(r"^(CPU|GPU|NPU)(\.\d+)?$|^(AUTO|HETERO|MULTI)(:.*)?$")


def openvino():
    """The openvino module, or a one-line MissingDependency naming the extra."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingDependency(f"running an OpenVINO IR (.xml) needs openvino ({exc}); install it with: "
                                f"pip install 'kdiqa-edge[{EXTRA}]'") from None
    return ov


def device_name(provider: str | None) -> str:
    """`provider` as an OpenVINO device name: None, "" or "cpu" -> CPU; gpu, npu, auto -> GPU, NPU, AUTO; a
    full name (GPU.1, AUTO:GPU,CPU, HETERO:GPU,CPU) as it is, upper-cased."""
    name = (provider or DEFAULT_DEVICE).strip().upper()
    if not _DEVICE.match(name):
        raise ConfigError(f"an OpenVINO IR runs on an OpenVINO device: CPU, GPU, NPU or AUTO (or GPU.1, "
                          f"AUTO:GPU,CPU...); --provider {provider} is not one")
    return name


def read_meta(model) -> dict[str, Any]:
    """The decoded kdiqa_edge.* metadata in an ov.Model's rt_info (empty when there is none)."""
    info = model.get_rt_info()
    if RT_INFO_SECTION not in info:
        return {}
    keys = list(info[RT_INFO_SECTION].keys())
    props = {artifact.PREFIX + key: model.get_rt_info([RT_INFO_SECTION, key]).astype(str) for key in keys}
    return artifact.decode(props)


def write_meta(model, meta: dict[str, Any]) -> None:
    """Set the kdiqa_edge.* metadata (string values, as artifact.encode makes them) in an ov.Model's rt_info."""
    for key, value in sorted(artifact.encode(meta).items()):
        model.set_rt_info(value, [RT_INFO_SECTION, key[len(artifact.PREFIX):]])


def _precision_name(value) -> str:
    """OpenVINO's Type (or its string) -> f32 | bf16 | f16."""
    text = str(getattr(value, "get_type_name", lambda: value)())
    return _TYPE_NAMES.get(text.lower(), text.lower())


def _supported(core, device: str, name: str) -> bool:
    try:
        return name in core.get_property(device, "SUPPORTED_PROPERTIES")
    except Exception:  # noqa: BLE001 - a device that does not answer keeps what it was given
        return True


def _capabilities(core, device: str) -> list[str] | None:
    try:
        return list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - AUTO/HETERO have none of their own
        return None


def _device_config(core, device: str, threads: int | None, hint: str) -> dict[str, Any]:
    """The threads and the inference precision for one physical device, each where the device takes it. A
    device without the precision's kernels gets no hint (GPU plugins refuse one they lack): it runs its own
    default, which the backend's notes name."""
    config: dict[str, Any] = {}
    if threads and _supported(core, device, "INFERENCE_NUM_THREADS"):
        config["INFERENCE_NUM_THREADS"] = int(threads)
    capabilities = _capabilities(core, device)
    if (capabilities is None or HINTS.get(hint) in capabilities) and _supported(core, device, "INFERENCE_PRECISION_HINT"):
        config["INFERENCE_PRECISION_HINT"] = hint
    return config


# openvino's own wording for a damaged IR -> what it means for the user's files
_READ_FAILURES = (("pugi::status_ok", "the .xml is not well-formed XML (truncated, or not an IR)"),
                  ("is_valid_weights_range", "the .bin is shorter than the .xml needs (truncated, or another "
                                             "IR's weights)"))
_WHERE = re.compile(r"(Exception from|Check '.*' failed at) \S+:\d+:?")


def _reason(exc: BaseException) -> str:
    """openvino's message without its "Exception from src/...cpp:NN:" parts: the lines that say something,
    joined (a damaged IR: what is wrong with the files)."""
    text = str(exc)
    for marker, meaning in _READ_FAILURES:
        if marker in text:
            return meaning
    said = [_WHERE.sub("", line).strip() for line in text.splitlines()]
    said = [line.removesuffix("Error:").strip() for line in said if line and _WHERE.sub("", line).strip()]
    return (" ".join(said) if said else first_line(exc))[:300]


_CORE = None


def shared_core():
    """One ov.Core for every IR this process loads, as OpenVINO advises. Each Core loads a CPU plugin of its own,
    which gives the thread that compiles an alternate signal stack and, when the Core goes, puts back the one it
    found: with a Core per model, two models released in the order they were made (auto's `models.clear()`)
    left the main thread on the first one's freed stack, and the next signal, a Ctrl-C, killed the process with
    SIGSEGV instead of interrupting it."""
    global _CORE
    ov = openvino()  # a missing openvino is its one line every time, not only the first
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def _is_ir(path: Path) -> bool:
    """Whether the file starts as an IR does: an XML document whose root is <net>."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return True  # read_model says what is wrong
    return b"<net" in head


@BACKENDS.register("openvino")
class OpenVinoBackend:
    """A kdiqa-edge OpenVINO IR, compiled for latency on one OpenVINO device."""

    name = "openvino"
    fixed_batch = None
    max_batch = None

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None):
        core = shared_core()
        if not path.with_suffix(".bin").is_file():
            raise CheckpointError(f"{path}: its weights, {path.with_suffix('.bin').name}, are not beside it "
                                  "(an OpenVINO IR is the .xml and the .bin together)")
        self.device_name = device_name(provider)
        if not _is_ir(path):  # read_model would try every frontend on it, TensorFlow's logging to stderr
            raise CheckpointError(f"{path}: not an OpenVINO IR (no <net> element at its start)")
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001 - openvino raises RuntimeError for a bad IR
            raise CheckpointError(f"{path}: openvino cannot read it: {_reason(exc)}") from None
        self.info = ArtifactInfo.from_meta(path, read_meta(model), "openvino")
        self.notes: list[str] = []
        config = self._config(core, path, threads)
        try:
            self.compiled = core.compile_model(model, self.device_name, config)
            self.request = self.compiled.create_infer_request()
            self._lock = threading.Lock()  # around the request's infer and the read of its outputs
        except Exception as exc:  # noqa: BLE001 - a device that is absent or refuses the model
            available = ", ".join(core.available_devices) or "none"
            raise ConfigError(f"{path}: openvino cannot compile it for {self.device_name} ({_reason(exc)}); "
                              f"OpenVINO devices here: {available}") from None
        self.inference_precision = self._effective_precision(path)
        self.device = self.device_name.split(".")[0].split(":")[0].lower()
        names = [output.get_any_name() for output in self.compiled.outputs]
        self.output = self.compiled.output("score" if "score" in names else names[0])

    def _config(self, core, path: Path, threads: int | None) -> dict[str, Any]:
        """PERFORMANCE_HINT LATENCY, and per physical device the threads and the recorded inference precision
        where it runs it; a virtual device (AUTO, HETERO, MULTI) passes them on to each device it may pick."""
        self.recorded_precision = str(self.info.meta.get("inference_precision") or "f32")
        base = self.device_name.split(":")[0]
        if base in VIRTUAL_DEVICES:
            devices = {name: _device_config(core, name, threads, self.recorded_precision)
                       for name in core.available_devices}
            return {"PERFORMANCE_HINT": "LATENCY", "DEVICE_PROPERTIES": {k: v for k, v in devices.items() if v}}
        return {"PERFORMANCE_HINT": "LATENCY",
                **_device_config(core, self.device_name, threads, self.recorded_precision)}

    def _effective_precision(self, path: Path) -> str | None:
        """The precision the compiled model runs in (the CPU plugin settles for what the CPU has: f16 -> bf16 or
        f32), a note where it is not the recorded one; None where the device does not say (AUTO)."""
        try:
            effective = _precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:  # noqa: BLE001 - AUTO and some devices do not report it
            return None
        if effective != self.recorded_precision:
            self.notes.append(f"{path.name}: recorded inference precision {self.recorded_precision}; "
                              f"{self.device_name} runs it in {effective} (it has no {self.recorded_precision} "
                              "kernels)")
        return effective

    def infer(self, x: np.ndarray, outputs: list) -> list[np.ndarray]:
        """Copies of `outputs` (compiled outputs) for input `x`. One request serves the model, so one thread
        at a time: two threads sharing it got 'Infer Request is busy', or each other's scores."""
        with self._lock:
            self.request.infer({0: np.ascontiguousarray(x)})
            return [np.array(self.request.get_tensor(output).data) for output in outputs]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x, [self.output])[0].astype(np.float32).reshape(-1)

    def synchronize(self) -> None:
        pass  # infer() is synchronous
