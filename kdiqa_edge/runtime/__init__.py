"""Torch-free inference: numpy + PIL + the runtime of the artifact (onnxruntime, tensorrt, coremltools,
openvino; executorch for .pte, whose pip wheel brings torch with it).

One module per runtime registers its backend in `base.BACKENDS`; importing them here is the registration, so
every backend is there whichever `kdiqa_edge.runtime` module is imported first."""

from kdiqa_edge.runtime import backends, executorch, openvino  # noqa: F401 - each registers its backend
from kdiqa_edge.runtime.base import BACKENDS, Backend, backend_kind, load_backend
from kdiqa_edge.runtime.info import ArtifactInfo, InputSpec
from kdiqa_edge.runtime.model import QualityModel, ScoreResult
from kdiqa_edge.runtime.providers import PROVIDERS

__all__ = [
           "BACKENDS",
           "PROVIDERS",
           "ArtifactInfo",
           "Backend",
           "InputSpec",
           "QualityModel",
           "ScoreResult",
           "backend_kind",
           "load_backend",
]
