"""The quality head: CLIP's frozen text anchors turn image features into a 1..5 quality score.

For image features v and anchors t_1..t_5 (L2-normalized text features of the graded prompts),
`probs = softmax(logit_scale * normalize(v) @ anchors.T)` and `score = sum_i probs_i * level_i`.
Everything here is a frozen buffer: the head is fixed once the anchors are computed.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdiqa_edge.errors import ConfigError

# The paper's prompt and levels (Hou & Song): "a photo of {level} quality", bad..perfect = 1..5.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {level} quality",)
LEVEL_NAMES: tuple[str, ...] = ("bad", "poor", "fair", "good", "perfect")
LEVELS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)


def check_template(template: str) -> str:
    """A prompt template must name the quality word as `{level}` and nothing else: without it the five
    prompts are one prompt, the five anchors one anchor, and every image scores 3 (no error, no signal)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"bad --template {template!r}: {exc}") from None
    if fields != {"level"}:
        what = "no {level}" if not fields else f"fields {', '.join(repr(f) for f in sorted(fields))}"
        raise ConfigError(f"--template {template!r} has {what}: write the quality word as {{level}} and "
                          "nothing else in braces, e.g. 'a photo of {level} quality'")
    return template


def prompts_for(templates: Sequence[str], level_names: Sequence[str] = LEVEL_NAMES) -> list[list[str]]:
    """The prompt strings, one list of templates per level."""
    if isinstance(templates, str) or not templates:
        raise ConfigError(f"prompt templates must be a non-empty list of strings, got {templates!r}")
    for template in templates:
        check_template(template)
    return [[template.format(level=name) for template in templates] for name in level_names]


@torch.no_grad()
def build_anchors(clip_model, tokenizer, templates: Sequence[str] = DEFAULT_TEMPLATES,
                  level_names: Sequence[str] = LEVEL_NAMES, device: str | torch.device = "cpu") -> torch.Tensor:
    """[levels, D] text anchors, built like open_clip's `build_zero_shot_classifier`.

    Encode every (level, template) prompt, L2-normalize, average over templates, re-normalize.
    """
    prompts = prompts_for(templates, level_names)
    flat = [p for per_level in prompts for p in per_level]
    tokens = tokenizer(flat).to(device)
    text = clip_model.encode_text(tokens, normalize=True).float()
    text = text.reshape(len(level_names), len(templates), -1).mean(dim=1)
    return F.normalize(text, dim=-1)


class QualityHead(nn.Module):
    """Frozen anchors [5, D] + CLIP's logit_scale -> softmax over quality levels -> expected level."""

    def __init__(self, anchors: torch.Tensor, logit_scale: float | torch.Tensor,
                 prompts: Sequence[Sequence[str]] | None = None, levels: Sequence[float] = LEVELS):
        super().__init__()
        anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().clone()
        if anchors.ndim != 2 or anchors.shape[0] != len(levels):
            raise ValueError(f"anchors must be [{len(levels)}, D], got {tuple(anchors.shape)}")
        self.register_buffer("anchors", anchors)
        self.register_buffer("logit_scale", torch.as_tensor(float(logit_scale), dtype=torch.float32))
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        self.prompts = [list(p) for p in prompts] if prompts is not None else None

    @property
    def embed_dim(self) -> int:
        return int(self.anchors.shape[1])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # The head runs in float32 even under autocast: 5 logits scaled by up to 100 need the precision.
        with torch.autocast(device_type=features.device.type, enabled=False):
            v = F.normalize(features.float(), dim=-1)
            return self.logit_scale * v @ self.anchors.t()

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.probs(features) * self.levels).sum(dim=-1)

    def meta(self) -> dict:
        """What a checkpoint's model.json records about this head."""
        return {
            "head": "quality",
            "prompts": self.prompts,
            "levels": [float(x) for x in self.levels.tolist()],
            "logit_scale": float(self.logit_scale),
        }

    def copy(self) -> QualityHead:
        """An independent head with the same anchors (the student reuses the teacher's head)."""
        return QualityHead(self.anchors.clone(), float(self.logit_scale), self.prompts, tuple(self.levels.tolist()))

    def extra_repr(self) -> str:
        return f"levels={len(self.levels)}, embed_dim={self.embed_dim}, logit_scale={float(self.logit_scale):.2f}"
