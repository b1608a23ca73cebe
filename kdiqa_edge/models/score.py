"""The deployable score model: one graph from pixels to a quality score, no text tower.

With u = encode(x), u_hat = u / |u| and W = logit_scale * anchors (one constant [5, D] matrix), the head is
`score = (softmax(u_hat @ W.T) * levels).sum(-1)`. The expectation is written as an elementwise product and a
sum, not a matmul with a 1-D operand, because coremltools rejects the latter.

`input="uint8"` folds the CLIP mean/std normalization into the graph, so the artifact takes raw pixels
(NCHW, or NHWC on request): x_norm = x * (1 / (255 std)) - mean / std, per channel.

`with_map=True` adds the `score_map` output [N, h, w] (kdiqa_edge/models/maps.py): the same folded head at every
position of the student's final feature map, from the same encoder pass. The score is computed from that pass
exactly as without the map (the student's own forward_head, proj, head), so its output does not change.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from kdiqa_edge.errors import ExportError
from kdiqa_edge.preprocess import PreprocessSpec

INPUTS = ("float", "uint8")
LAYOUTS = ("NCHW", "NHWC")


class FoldedHead(nn.Module):
    """L2 norm + one constant matmul + softmax + expectation over the levels."""

    def __init__(self, weight: torch.Tensor, levels: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())  # [K, D] = logit_scale * anchors
        self.register_buffer("levels", levels.detach().float().clone())  # [K]

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(features @ self.weight.t(), dim=-1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probs(features)
        return (probs * self.levels).sum(-1), probs


class InputNorm(nn.Module):
    """Raw pixels (uint8 or [0, 255] float) -> CLIP-normalized float NCHW, as one Mul and one Add."""

    def __init__(self, spec: PreprocessSpec, layout: str = "NCHW", pixel_scale: float = 255.0):
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.layout = layout
        self.register_buffer("scale", 1.0 / (pixel_scale * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        return x.float() * self.scale + self.shift


def folded_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W = logit_scale * anchors and the levels of a QualityHead-like module."""
    anchors = head.anchors.detach().float()
    logit_scale = torch.as_tensor(head.logit_scale).detach().float().reshape(())
    levels = getattr(head, "levels", None)
    if levels is None:
        levels = torch.arange(1, anchors.shape[0] + 1, dtype=torch.float32)
    levels = torch.as_tensor(levels, dtype=torch.float32).detach().reshape(-1)
    if levels.numel() != anchors.shape[0]:
        raise ExportError(f"head has {anchors.shape[0]} anchors but {levels.numel()} levels")
    return logit_scale * anchors, levels


def has_quality_head(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return head is not None and hasattr(head, "anchors") and hasattr(head, "logit_scale")


def reparameterized(model: nn.Module) -> nn.Module:
    """A copy with timm's re-parameterizable blocks (RepVGG, MobileOne, FastViT...) fused for inference."""
    from timm.utils.model import reparameterize_model

    model = copy.deepcopy(model).eval()
    return reparameterize_model(model, inplace=True)


@contextlib.contextmanager
def plain_attention():
    """Trace nn.MultiheadAttention as plain ops: its fused inference kernel exports to neither ONNX nor CoreML."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class ScoreModel(nn.Module):
    """image -> score [N] (and probs [N, K] when `with_probs`, score_map [N, h, w] when `with_map`), for export.

    `model` follows the IQA model interface: `encode(x) -> features`, `head`, `preprocess`, `forward`.
    A QualityHead is folded into one constant; a regression head (a Linear) keeps the model's own forward.
    """

    def __init__(self, model: nn.Module, input: str = "float", layout: str = "NCHW", with_probs: bool = False,
                 reparameterize: bool = True, with_map: bool = False):
        super().__init__()
        if input not in INPUTS:
            raise ExportError(f"unknown input kind {input!r}; choose one of: {', '.join(INPUTS)}")
        if layout not in LAYOUTS:
            raise ExportError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        if layout == "NHWC" and input != "uint8":
            raise ExportError("NHWC layout is for raw uint8 pixels; float inputs are normalized NCHW")
        self.input_kind = input
        self.layout = layout
        self.preprocess: PreprocessSpec = model.preprocess
        self.quality_head = has_quality_head(model)
        if with_probs and not self.quality_head:
            raise ExportError("a regression-head model has no probabilities to output")
        self.with_probs = with_probs
        if with_map:
            from kdiqa_edge.models.maps import check_map

            check_map(model)
        self.with_map = with_map
        self.model = reparameterized(model) if reparameterize else copy.deepcopy(model).eval()
        self.input_norm = InputNorm(self.preprocess, layout) if input == "uint8" else None
        self.head = FoldedHead(*folded_weight(model.head)) if self.quality_head else None
        self.eval()

    @property
    def output_names(self) -> list[str]:
        from kdiqa_edge.models.maps import MAP_OUTPUT

        return ["score", *(["probs"] * self.with_probs), *([MAP_OUTPUT] * self.with_map)]

    def input_spec(self) -> dict:
        """The `kdiqa_edge.input` metadata value."""
        return {
            "name": "image",
            "dtype": "uint8" if self.input_kind == "uint8" else "float32",
            "layout": self.layout,
            "size": self.preprocess.size,
            "normalized": self.input_kind == "float",
        }

    def example_input(self, batch: int = 1) -> torch.Tensor:
        size = self.preprocess.size
        shape = (batch, size, size, 3) if self.layout == "NHWC" else (batch, 3, size, size)
        if self.input_kind == "uint8":
            return torch.randint(0, 256, shape, dtype=torch.uint8)
        return torch.randn(shape)

    def forward(self, x: torch.Tensor):
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.with_map:
            return self._with_map(x)
        if self.head is None:
            score = self.model(x).reshape(x.shape[0])
            return score
        score, probs = self.head(self.model.encode(x))
        return (score, probs) if self.with_probs else score

    def _with_map(self, x: torch.Tensor):
        from kdiqa_edge.models.maps import pooled_and_positions

        pooled, positions = pooled_and_positions(self.model, x)
        if self.head is None:  # a regression head: the same Linear on the pooled and per-position features
            return self.model.head(pooled).reshape(x.shape[0]), self.model.head(positions)
        score, probs = self.head(pooled)
        score_map = self.head(positions)[0]
        return (score, probs, score_map) if self.with_probs else (score, score_map)
