"""Torch-free inference: numpy + PIL + the runtime of the artifact (onnxruntime, tensorrt, coremltools;
executorch for .pte, whose pip wheel brings torch with it)."""

from kdiqa_edge.runtime.backends import BACKENDS, Backend, backend_kind, load_backend
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
