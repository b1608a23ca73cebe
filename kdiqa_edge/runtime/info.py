"""What an artifact says about itself: input layout, preprocessing, precision, target (torch-free).

Every exported file carries the `kdiqa_edge.*` keys of `kdiqa_edge.artifact`, so this is all the runtime
needs to turn images into the model's input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kdiqa_edge.artifact import FORMAT_VERSION
from kdiqa_edge.errors import CheckpointError
from kdiqa_edge.preprocess import PreprocessSpec


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str = "image"  # the graph's input name
    dtype: str = "float32"  # float32: normalized pixels; uint8: raw pixels, normalization folded in
    layout: str = "NCHW"  # NCHW or NHWC
    size: int = 224  # height = width
    normalized: bool = True  # float inputs are mean/std normalized by the caller

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    target: str  # onnx | tensorrt | coreml | torch
    precision: str  # fp32 | fp16 | int8
    preprocess: PreprocessSpec
    input: InputSpec
    outputs: tuple[str, ...] = ("score",)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # kind, arch, checkpoint_hash, ...
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # every decoded kdiqa_edge.* key

    @property
    def arch(self) -> str:
        return str(self.source.get("arch", "?"))

    @property
    def pretrained(self) -> bool | None:
        """Whether the model started from pretrained weights, as its checkpoint recorded (`source.pretrained`);
        False: random init, so its scores are a smoke test, not image quality; None: not recorded."""
        value = self.source.get("pretrained")
        return None if value is None else bool(value)

    def not_pretrained_note(self, name: str | None = None) -> str | None:
        """The line every output that scores with a random-init model carries (`name`: how the output names
        the model, default the file's name); None for any other model."""
        if self.pretrained is not False:
            return None
        return (f"{name or self.path.name} is not pretrained (random init): its scores are a smoke test, "
                "not image quality")

    @classmethod
    def from_meta(cls, path: str | Path, meta: dict[str, Any], target: str) -> ArtifactInfo:
        """Build from decoded `kdiqa_edge.*` metadata; refuse an artifact that carries none."""
        if not meta or "preprocess" not in meta:
            raise CheckpointError(
                f"{path} carries no kdiqa_edge metadata (no preprocessing spec): export it with `kdiqa-edge export`")
        version = str(meta.get("format", FORMAT_VERSION))
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: artifact format {version!r}, this runtime reads {FORMAT_VERSION!r}")
        if not isinstance(meta["preprocess"], dict):
            raise CheckpointError(f"{path}: corrupt kdiqa_edge.preprocess metadata")
        preprocess = PreprocessSpec.from_dict(meta["preprocess"])
        raw_input = meta.get("input") if isinstance(meta.get("input"), dict) else {}
        spec = InputSpec.from_dict({"size": preprocess.size, **raw_input})
        outputs = meta.get("outputs") if isinstance(meta.get("outputs"), list) else ["score"]
        source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        return cls(path=Path(path), target=str(meta.get("target", target)),
                   precision=str(meta.get("precision", "fp32")), preprocess=preprocess, input=spec,
                   outputs=tuple(outputs), source=source, meta=meta)
