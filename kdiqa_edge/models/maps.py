"""Local quality maps from a student: the frozen quality head applied at every position of its last feature map.

The `fast` map. A student scores `head(proj(pool(F)))`, with F the encoder's final feature map [C, h, w]
(7x7 at 224 px for resnet18, efficientnet_b0 and mobilevit_s; Swin's final token grid, 7x7 at 224 px, is the
same thing in NHWC). Instead of pooling first, the encoder's own head (`forward_head`: the pooling and whatever
timm puts after it, e.g. ConvNeXt's norm or MobileNetV3's conv_head) is applied to each position alone, as a
1x1 feature map; the projection into CLIP's space and the 5-anchor head follow, so every position gets a
score in the head's units (1..5). One forward pass: the map costs h*w head evaluations on top of the score.

What it is and is not: each position's features come from a receptive field that covers much of the image
(most of it at 64 px), so the map says where the encoder's evidence for low quality sits, not the quality of
an isolated patch (that is the runtime's `patches` map, kdiqa_edge/runtime/maps.py). Because the head
normalizes and takes a softmax, the mean of the map is not the global score.

Models whose encoder ends in a token sequence without a grid (ViT with a class token, the CLIP teachers)
have no fast map: `check_map` refuses them in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from kdiqa_edge.errors import ExportError

MAP_OUTPUT = "score_map"  # the artifacts' second (or third, after probs) output: [N, h, w]


def check_map(model: nn.Module) -> None:
    """Refuse, in one line, a model without a spatial final feature map (a teacher, a ViT)."""
    encoder = getattr(model, "encoder", None)
    name = getattr(getattr(model, "build", None), "arch", None) or type(model).__name__
    if encoder is None or not hasattr(encoder, "forward_features") or not hasattr(encoder, "forward_head"):
        raise ExportError(f"{name} has no timm encoder with a final feature map: score maps are made from a "
                          "student's (--with-map is for students)")
    size = model.preprocess.size
    with torch.no_grad():
        features = encoder.forward_features(torch.zeros(1, 3, size, size))
    if features.ndim != 4:
        raise ExportError(f"{name} ends in a token sequence {tuple(features.shape)}, not a feature map: it has "
                          "no fast score map (convolutional students, Swin and MobileViT do)")


def grid_shape(model: nn.Module) -> tuple[int, int]:
    """(h, w) of the model's fast map at its input size."""
    size = model.preprocess.size
    with torch.no_grad():
        _, positions = pooled_and_positions(model, torch.zeros(1, 3, size, size))
    return int(positions.shape[1]), int(positions.shape[2])


def pooled_and_positions(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder pass: the features `model.encode(x)` gives [N, D], and the same features per position of
    the final feature map [N, h, w, D] (each position through the encoder's head alone, then the projection).

    The pooled features are computed as the student computes them (`forward_head(forward_features(x))`, then
    `proj`), so a score from them is the student's score, op for op."""
    encoder = model.encoder
    features = encoder.forward_features(x)
    pooled = encoder.forward_head(features)
    channels_last = getattr(encoder, "output_fmt", "NCHW") == "NHWC"
    grid = features if channels_last else features.permute(0, 2, 3, 1)  # [N, h, w, C]
    h, w, channels = int(grid.shape[1]), int(grid.shape[2]), int(grid.shape[3])
    cells = grid.reshape(-1, 1, 1, channels)  # every position as a 1x1 feature map, in the encoder's layout
    per_position = encoder.forward_head(cells if channels_last else cells.permute(0, 3, 1, 2))
    proj = getattr(model, "proj", None)
    if proj is not None:
        pooled, per_position = proj(pooled), proj(per_position)
    return pooled, per_position.reshape(-1, h, w, per_position.shape[-1])


@torch.no_grad()
def fast_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The source model's fast map [N, h, w] (normalized float NCHW in), scores in the head's units: the
    reference the exported `score_map` outputs are checked against."""
    _, positions = pooled_and_positions(model, x)
    return model.head(positions)
