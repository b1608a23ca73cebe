"""The built-in inference backends: ONNX Runtime, TensorRT, CoreML and the torch checkpoint, each registered in
`runtime.base.BACKENDS` (the protocol they follow is there too; ExecuTorch and OpenVINO have modules of their
own, registered the same way, and none imports a sibling).

onnxruntime is imported when its backend is built, as tensorrt, cuda-python, coremltools and torch are when
theirs are, so this module imports anywhere numpy does.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge import artifact
from kdiqa_edge.errors import (
    CheckpointError,
    ConfigError,
    MissingDependency,
    TensorRTUnavailable,
    first_line,
    require,
)
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.runtime.base import BACKENDS, Backend, backend_kind, load_backend  # noqa: F401 - re-exported
from kdiqa_edge.runtime.info import ArtifactInfo, InputSpec
from kdiqa_edge.runtime.providers import (
    BEST_AVAILABLE,
    PROVIDER_DEVICES,
    build_clash,
    open_session,
    preload_cuda_libraries,
    provider_reason,
    resolve_providers,
)

log = logging.getLogger(__name__)


# --- ONNX Runtime --------------------------------------------------------------------------------------


def spin_options(options, spinning: bool | None, stop_spinning: bool = False) -> None:
    """ONNX Runtime SessionOptions' intra-op spin-waiting: `spinning` None leaves ORT's default (on);
    `stop_spinning` stops the workers' spin when each run returns (`session.force_spinning_stop`)."""
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")


@BACKENDS.register("onnx")
class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None, stop_spinning: bool = False):
        """spinning: ONNX Runtime's intra-op spin-waiting (`session.intra_op.allow_spinning`). None: what the
        artifact records (`ort_spinning`, which `--precision auto` measures on the machine), else ORT's default
        (on). stop_spinning: the workers stop spinning when each run returns (`session.force_spinning_stop`;
        they still spin between the ops of a run): for sessions timed side by side in one process, where an
        idle session's workers would otherwise spin on (tens of ms) into the next session's turn."""
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

        self._ep_fail = EPFail  # what a provider raises when it fails on a run
        available = ort.get_available_providers()
        providers = resolve_providers(provider, available)
        preload_cuda_libraries(providers[0])
        # asked for by name: a provider that fails to start is an error; picked as the best available
        # (onnxruntime-gpu lists CUDA on machines without a working GPU too): the next one runs, and says so
        strict = provider not in BEST_AVAILABLE
        self.path = path
        self.stop_spinning = bool(stop_spinning)
        self.session, reason = self._session(path, providers, threads, spinning, strict, self.stop_spinning)
        started = self.session.get_providers()
        self.notes = [] if reason is None else [
            f"{path.name}: {providers[0]} did not start here ({reason}); running on {started[0]}"]
        if not strict and "CUDAExecutionProvider" not in available and \
                (clash := build_clash("CUDAExecutionProvider")):  # onnxruntime-gpu installed, yet no CUDA
            self.notes.append(f"{path.name}: running on {started[0]}, not CUDA: {clash}")
        meta = artifact.decode(self.session.get_modelmeta().custom_metadata_map)
        recorded = {"on": True, "off": False}.get(str(meta.get("ort_spinning")))
        if spinning is None and recorded is False:  # the session options are fixed at creation: open it again
            self.session, _ = self._session(path, started, threads, False, strict, self.stop_spinning)
        self.spinning = spinning if spinning is not None else recorded is not False
        self.info = ArtifactInfo.from_meta(path, meta, "onnx")
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        batch = graph_input.shape[0] if graph_input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.max_batch = None
        names = [o.name for o in self.session.get_outputs()]
        self.output_names = ["score" if "score" in names else names[0]]
        self.provider = started[0]
        self.device = PROVIDER_DEVICES.get(self.provider, "cpu")

    @staticmethod
    def _session(path: Path, providers: list[str], threads: int | None, spinning: bool | None, strict: bool = True,
                 stop_spinning: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # provider fallbacks are reported below, not as log spam
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        spin_options(options, spinning, stop_spinning)
        try:
            session, reason = open_session(str(path), options, providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
        if strict and reason is not None:
            raise ConfigError(f"{path}: {providers[0]} failed to initialise ({reason}); it would run on "
                              f"{session.get_providers()[0]}: check the CUDA/cuDNN/TensorRT libraries")
        return session, reason

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(self.output_names, {self.input_name: x})[0].reshape(-1)
        except self._ep_fail as exc:
            # the accelerator failed on a run (a TensorRT engine build, say): as onnxruntime's own fallback
            # would, go on with the providers after it
            rest = self.session.get_providers()[1:]
            if not rest:
                raise
            note = (f"{self.path.name}: {self.provider} failed while running "
                    f"({provider_reason([], [], exc)}); running on {rest[0]} from here")
            self.notes.append(note)
            log.warning(note)
            self.session.set_providers(rest)
            self.provider = rest[0]
            self.device = PROVIDER_DEVICES.get(self.provider, "cpu")
            return self.session.run(self.output_names, {self.input_name: x})[0].reshape(-1)

    def synchronize(self) -> None:
        pass  # session.run returns host arrays: the device work is done


# --- TensorRT ------------------------------------------------------------------------------------------


def engine_meta(header: dict[str, Any]) -> dict[str, Any]:
    """The kdiqa_edge.* metadata inside an engine header (prefixed keys, or under "metadata")."""
    if any(k.startswith(artifact.PREFIX) for k in header):
        return artifact.decode(header)
    nested = header.get("metadata") or header.get("meta") or {}
    return artifact.decode(nested) if any(k.startswith(artifact.PREFIX) for k in nested) else dict(nested)


def header_tensorrt_version(header: dict[str, Any]) -> str | None:
    meta = engine_meta(header)
    for source in (header, header.get("versions") or {}, meta.get("versions") or {}):
        for key in ("tensorrt", "tensorrt_version", "trt_version"):
            if isinstance(source, dict) and source.get(key):
                return str(source[key])
    return None


def header_gpu(header: dict[str, Any]) -> dict[str, Any]:
    gpu = header.get("gpu") or header.get("device") or {}
    return gpu if isinstance(gpu, dict) else {"name": str(gpu)}


def check_engine_header(path: Path, header: dict[str, Any], trt_version: str, gpu: dict[str, Any]) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU: engines are not portable."""
    built = header_tensorrt_version(header)
    if built is None:
        raise CheckpointError(f"{path}: the engine header does not record its TensorRT version; rebuild it "
                              "with `kdiqa-edge export --target tensorrt` on this device")
    if built != trt_version:
        raise CheckpointError(f"{path}: engine built with TensorRT {built}, this machine has TensorRT "
                              f"{trt_version}; rebuild it here (engines do not move between versions)")
    want = header_gpu(header)
    for key in ("compute_capability", "name"):
        if want.get(key) and gpu.get(key) and str(want[key]) != str(gpu[key]):
            raise CheckpointError(f"{path}: engine built for GPU {want.get('name')} (sm {want.get('compute_capability')}), "
                                  f"this is {gpu.get('name')} (sm {gpu.get('compute_capability')}); rebuild it here")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingDependency("running a TensorRT engine needs cuda-python: pip install cuda-python") from None
    return cudart


def _check_cuda(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


@BACKENDS.register("tensorrt")
class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None):
        header, blob = artifact.read_engine_file(path)
        self.info = ArtifactInfo.from_meta(path, engine_meta(header), "tensorrt")
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise TensorRTUnavailable(f"{path}: tensorrt does not import here ({exc}); run TensorRT engines "
                                      "on the device they were built on, or bench the ONNX file") from None
        cudart = _cudart()
        props = _check_cuda(cudart.cudaGetDeviceProperties(0))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        gpu = {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
        check_engine_header(path, header, trt.__version__, gpu)
        self._trt, self._cudart = trt, cudart
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise CheckpointError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self.input_name = inputs[0]
        self.output_name = "score" if "score" in outputs else outputs[0]
        self.extra_outputs = [n for n in outputs if n != self.output_name]
        batch = self.engine.get_tensor_shape(self.input_name)[0]
        self.fixed_batch = int(batch) if batch > 0 else None
        # dynamic batch: the optimization profile's max (the exporter also records it in the header)
        self.max_batch = None if self.fixed_batch else int(
            self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.stream = _check_cuda(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)
        self._lock = threading.Lock()  # one context, stream and buffers: one run at a time

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self._cudart.cudaFree(pointer)
            pointer = _check_cuda(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._run(np.ascontiguousarray(x))

    def _run(self, x: np.ndarray) -> np.ndarray:
        trt, cudart = self._trt, self._cudart
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        d_in = self._device_buffer(self.input_name, x.nbytes)
        self.context.set_tensor_address(self.input_name, d_in)
        outputs = {}
        for name in [self.output_name, *self.extra_outputs]:
            shape = tuple(self.context.get_tensor_shape(name))
            host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._device_buffer(name, max(host.nbytes, 1)))
            outputs[name] = host
        kind = cudart.cudaMemcpyKind
        _check_cuda(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        host = outputs[self.output_name]
        _check_cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[self.output_name][0], host.nbytes,
                                           kind.cudaMemcpyDeviceToHost, self.stream))
        self.synchronize()
        return host.astype(np.float32).reshape(-1)

    def synchronize(self) -> None:
        _check_cuda(self._cudart.cudaStreamSynchronize(self.stream))

    def __del__(self):
        for pointer, _ in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(pointer)


# --- CoreML --------------------------------------------------------------------------------------------


@BACKENDS.register("coreml")
class CoreMLBackend:
    name = "coreml"
    fixed_batch = None
    max_batch = None

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None):
        if sys.platform != "darwin":
            raise MissingDependency(f"{path}: CoreML models run on macOS only (this is {sys.platform}); "
                                    "bench the ONNX file here and the .mlpackage on a Mac")
        ct = require("coremltools", "export")
        units = {"cpu": ct.ComputeUnit.CPU_ONLY, "gpu": ct.ComputeUnit.CPU_AND_GPU,
                 "ane": ct.ComputeUnit.CPU_AND_NE}.get((provider or "").lower(), ct.ComputeUnit.ALL)
        try:
            self.model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as exc:  # noqa: BLE001 - coremltools raises many types for a bad package
            raise CheckpointError(f"{path}: coremltools cannot load it: {exc}") from None
        self.info = ArtifactInfo.from_meta(path, artifact.decode(dict(self.model.user_defined_metadata)), "coreml")
        description = self.model.get_spec().description
        self.input_name = description.input[0].name
        self.image_input = description.input[0].type.WhichOneof("Type") == "imageType"
        names = [o.name for o in description.output]
        self.output_name = "score" if "score" in names else names[0]
        self.device = (provider or "all").lower()

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.image_input:  # ImageType: one PIL image per example, a list of examples is one batch call
            from PIL import Image

            hwc = x if self.info.input.layout == "NHWC" else x.transpose(0, 2, 3, 1)
            if hwc.dtype != np.uint8:
                raise ConfigError("a CoreML image input takes uint8 pixels: its metadata must say dtype uint8")
            outputs = self.model.predict([{self.input_name: Image.fromarray(img)} for img in hwc])
            return np.array([float(np.asarray(out[self.output_name]).reshape(-1)[0]) for out in outputs],
                            np.float32)
        out = self.model.predict({self.input_name: x})[self.output_name]
        return np.asarray(out, np.float32).reshape(-1)

    def synchronize(self) -> None:
        pass


# --- torch checkpoint / run dir (optional: needs the [train] extra) -----------------------------------


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """model.json of a checkpoint dir, or of a run dir's checkpoints/best (torch-free)."""
    for candidate in (path / "model.json", path / "checkpoints" / "best" / "model.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise CheckpointError(f"{path}: neither a checkpoint dir (model.json) nor a run dir (checkpoints/best)")


TORCH_DEVICES = ("cpu", "cuda", "auto")  # what --provider takes for a checkpoint; auto (or none): cuda where there
# ONNX Runtime's providers a checkpoint runs as a torch device: `bench ENGINE.onnx --reference RUN --provider
# tensorrt` times the ONNX rows on TensorRT and runs the torch reference on the same NVIDIA GPU
TORCH_DEVICE_OF = {"tensorrt": "cuda"}


@BACKENDS.register("torch")
class TorchBackend:
    name = "torch"
    fixed_batch = None
    max_batch = None

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None):
        meta = checkpoint_meta(path)
        asked = provider
        provider = TORCH_DEVICE_OF.get((provider or "").lower(), provider)
        if (provider or "auto").lower() not in TORCH_DEVICES:
            raise ConfigError(f"a checkpoint runs on a torch device: {', '.join(TORCH_DEVICES[:-1])} or "
                              f"{TORCH_DEVICES[-1]} (the best available); --provider {provider} is not one")
        torch = require("torch", "train")
        from kdiqa_edge.models import load_checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        want_cuda = (provider or "auto").lower() in ("auto", "cuda")
        self.device = "cuda" if want_cuda and torch.cuda.is_available() else "cpu"
        if (provider or "").lower() == "cuda" and self.device != "cuda":
            raise ConfigError(f"--provider {asked} asked for (a checkpoint runs on cuda for it), but torch sees no "
                              "CUDA device" if asked.lower() != "cuda" else
                              "--provider cuda asked for, but torch sees no CUDA device")
        self._torch = torch
        self.model = load_checkpoint(path).eval().to(self.device)
        spec = getattr(self.model, "preprocess", None) or PreprocessSpec.from_dict(meta.get("preprocess", {}))
        source = {"kind": meta.get("kind"), "arch": meta.get("arch"), "checkpoint_hash": meta.get("content_hash"),
                  "pretrained": meta.get("pretrained"), "variant": meta.get("head")}
        self.info = ArtifactInfo(path=path, target="torch", precision="fp32", preprocess=spec,
                                 input=InputSpec(size=spec.size), source=source,
                                 meta={"preprocess": spec.to_dict(), "source": source})

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            # a writable array: torch.from_numpy warns of a read-only one (a decoded image, a memory map)
            score = self.model(torch.from_numpy(np.require(x, requirements=("C", "W"))).to(self.device))
        return score.float().cpu().numpy().reshape(-1)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.synchronize()

