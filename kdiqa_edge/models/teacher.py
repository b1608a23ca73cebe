"""The CLIP quality teacher: an open_clip image encoder + the frozen quality head.

The text tower is used once, to compute the anchors, and then dropped: a teacher checkpoint holds the
image encoder, the anchors and logit_scale, never the text tower.

Teachers are named like `--teacher ViT-B-32:openai` (any open_clip model with a pretrained tag; the
paper's teacher is the default), `--teacher ViT-B-32:random` (that architecture, random init: the real
sizes and speeds on a machine without the weights) or `--teacher tiny`, a registered random-init config
with 64 px inputs for tests and quick demos. A random-init teacher is NOT pretrained, and every output it
touches says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdiqa_edge.errors import CheckpointError, ConfigError, WeightsUnavailable, first_line
from kdiqa_edge.models.checkpoint import register_checkpoint_kind
from kdiqa_edge.models.head import DEFAULT_TEMPLATES, LEVEL_NAMES, QualityHead, build_anchors, prompts_for
from kdiqa_edge.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessSpec
from kdiqa_edge.registry import Registry

DEFAULT_TEACHER = "ViT-B-32:openai"
NOT_PRETRAINED = "not pretrained"
RANDOM_TAG = "random"  # `NAME:random`: the open_clip architecture NAME with random-init weights


@dataclasses.dataclass(frozen=True)
class ClipBuild:
    """Everything needed to rebuild a CLIP (or just its image tower) without downloading anything."""

    arch: str  # open_clip model name, or the registered config name ("tiny")
    model_cfg: dict  # open_clip model config: embed_dim, vision_cfg, text_cfg, quick_gelu
    pretrained: bool  # real pretrained weights were loaded
    source: str  # what the user asked for: "ViT-B-32:openai", "ViT-B-32:/path/w.safetensors", "tiny"


# Random-init configs registered by name (open_clip config dicts), for tests and offline demos.
TEACHER_CONFIGS: Registry[dict] = Registry("teacher config")

TEACHER_CONFIGS.register("tiny")({
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "quick_gelu": False,
})
TINY_SEED = 0  # a random-init teacher (tiny, NAME:random) is still the same teacher on every call


class CLIPTeacher(nn.Module):
    """`encode(x)`: CLIP image features (before L2 norm); `forward(x)`: quality score in [1, 5]."""

    kind = "teacher"

    def __init__(self, visual: nn.Module, head: QualityHead, preprocess: PreprocessSpec, build: ClipBuild):
        super().__init__()
        self.visual = visual
        self.head = head
        self.preprocess = preprocess
        self.build = build

    @property
    def pretrained(self) -> bool:
        return self.build.pretrained

    @property
    def label(self) -> str:
        """How outputs name this teacher, e.g. `ViT-B-32:openai` or `tiny (not pretrained)`."""
        return self.build.source if self.pretrained else f"{self.build.source} ({NOT_PRETRAINED})"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "arch": self.build.arch,
            "embed_dim": self.head.embed_dim,
            "pretrained": self.build.pretrained,
            "teacher": self.build.source,
            "label": self.label,
            "open_clip_cfg": self.build.model_cfg,
        }


def parse_teacher(name: str) -> tuple[str, str | None]:
    """`ViT-B-32:openai` -> ("ViT-B-32", "openai"); `tiny` -> ("tiny", None)."""
    arch, _, tag = name.partition(":")
    return arch, (tag or None)


def check_teacher(teacher: str = DEFAULT_TEACHER, weights: str | Path | None = None) -> None:
    """Refuse in one line, before any work, a teacher that cannot be built: an unknown name or tag, a tag or
    weights file a random-init config cannot take, a --teacher-weights path that is no file. Reads no
    weights."""
    import open_clip

    arch, tag = parse_teacher(teacher)
    if arch in TEACHER_CONFIGS:
        if tag is not None:  # `tiny:openai` would otherwise be the random-init tiny under a pretrained-looking name
            raise ConfigError(f"--teacher {teacher}: {arch} is a registered random-init config and takes no "
                              f"':{tag}' tag; use --teacher {arch}")
        if weights is not None:
            raise ConfigError(f"--teacher {arch} is a random-init config; --teacher-weights needs an open_clip model name")
        return
    if open_clip.get_model_config(arch) is None:
        raise ConfigError(f"unknown teacher model {arch!r}: use an open_clip name (e.g. {DEFAULT_TEACHER}) "
                          f"or one of: {', '.join(TEACHER_CONFIGS.names())}")
    if tag == RANDOM_TAG:
        if weights is not None:
            raise ConfigError(f"--teacher {teacher} is random init; drop ':{RANDOM_TAG}' to load --teacher-weights")
        return
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise WeightsUnavailable(f"--teacher-weights file not found: {path}")
        if not path.is_file():
            raise WeightsUnavailable(f"--teacher-weights {path} is not a file")
    elif tag is None:
        raise ConfigError(f"--teacher {arch} needs a pretrained tag (e.g. {arch}:openai), --teacher-weights "
                          f"PATH, or {arch}:{RANDOM_TAG} for random init")
    elif not open_clip.get_pretrained_cfg(arch, tag):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ConfigError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {tags}")


def create_clip(teacher: str = DEFAULT_TEACHER, weights: str | Path | None = None):
    """(open_clip CLIP model in eval mode, tokenizer, ClipBuild). Raises one-line errors when it cannot."""
    import open_clip

    check_teacher(teacher, weights)
    arch, tag = parse_teacher(teacher)
    if arch in TEACHER_CONFIGS:
        return _create_registered(arch)
    cfg = open_clip.get_model_config(arch)
    if tag == RANDOM_TAG:
        return _create_random(arch, cfg)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    # OpenAI's weights were trained with QuickGELU; open_clip only warns if the config disagrees.
    quick_gelu = bool(cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    cfg["quick_gelu"] = quick_gelu
    if weights is not None:
        model = _create_from_file(arch, Path(weights), quick_gelu)
        source = f"{arch}:{Path(weights).name}"
    else:
        model = _create_pretrained(arch, tag, quick_gelu)
        source = f"{arch}:{tag}"
    tokenizer = open_clip.get_tokenizer(arch)
    return model.eval(), tokenizer, ClipBuild(arch, cfg, True, source)


def _create_registered(name: str):
    import open_clip

    cfg = TEACHER_CONFIGS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = open_clip.CLIP(**{k: v for k, v in cfg.items()})
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model.eval(), tokenizer, ClipBuild(name, dict(cfg), False, name)


def _create_random(arch: str, cfg: dict):
    """open_clip's architecture `arch`, random init (seeded: the same teacher on every call)."""
    import open_clip

    cfg = {**cfg, "quick_gelu": bool(cfg.get("quick_gelu", False))}
    # _quiet_download_logs: open_clip warns "No pretrained weights loaded", which the label already says
    with torch.random.fork_rng(devices=[]), _quiet_download_logs():
        torch.manual_seed(TINY_SEED)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=cfg["quick_gelu"])
    return model.eval(), open_clip.get_tokenizer(arch), ClipBuild(arch, cfg, False, arch)


def _create_pretrained(arch: str, tag: str, quick_gelu: bool):
    import open_clip

    try:
        with _quiet_download_logs():
            return open_clip.create_model(arch, pretrained=tag, force_quick_gelu=quick_gelu)
    except (RuntimeError, OSError) as exc:
        reason = "not in the local cache and the download failed" if "download" in str(exc).lower() \
            else first_line(exc, limit=160)
        raise WeightsUnavailable(
            f"cannot get the pretrained weights {arch}:{tag} ({reason}). Offline, pass a local weights file "
            f"with --teacher-weights PATH, or use --teacher tiny (random init, {NOT_PRETRAINED}) for a demo"
        ) from None


@contextlib.contextmanager
def _quiet_download_logs():
    """open_clip and huggingface_hub log every failed retry; the one-line error says it all."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _create_from_file(arch: str, path: Path, quick_gelu: bool):
    import open_clip

    try:  # the path is a file: check_teacher said so
        return open_clip.create_model(arch, pretrained=str(path), force_quick_gelu=quick_gelu, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types for a wrong or foreign file
        # typed: a garbage file's unpickler error says only "101" (a KeyError)
        raise CheckpointError(f"cannot load {path} as {arch} weights: {first_line(exc, typed=True)}") from None


def preprocess_of(clip_model) -> PreprocessSpec:
    """The PreprocessSpec matching open_clip's preprocessing for this model."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip_model)  # empty for a model built from a config
    size = cfg.get("size", getattr(clip_model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessSpec(
        size=int(size),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
        mean=tuple(float(m) for m in cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", OPENAI_CLIP_STD)),
    )


def teacher_from_clip(clip_model, tokenizer, build: ClipBuild, templates: Sequence[str] = DEFAULT_TEMPLATES,
                      level_names: Sequence[str] = LEVEL_NAMES) -> CLIPTeacher:
    """Compute the anchors once with the text tower, then keep only the image tower and the head."""
    prompts = prompts_for(templates, level_names)  # checks the templates before any text-tower work
    anchors = build_anchors(clip_model, tokenizer, templates, level_names)
    head = QualityHead(anchors, float(clip_model.logit_scale.detach().exp()), prompts)
    return CLIPTeacher(clip_model.visual, head, preprocess_of(clip_model), build)


def load_teacher(teacher: str = DEFAULT_TEACHER, weights: str | Path | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> CLIPTeacher:
    """A teacher by name (`ViT-B-32:openai`, `tiny`) or from a local weights file; eval mode, on CPU."""
    clip_model, tokenizer, build = create_clip(teacher, weights)
    return teacher_from_clip(clip_model, tokenizer, build, templates).eval()


def _build_visual(build: ClipBuild) -> nn.Module:
    """The image tower alone, random init; weights come from the checkpoint."""
    import open_clip

    cfg = build.model_cfg
    try:
        from open_clip.model import _build_vision_tower  # skips building a text tower we would discard
    except ImportError:  # pragma: no cover - older/newer open_clip
        return open_clip.CLIP(**cfg).visual
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))


@register_checkpoint_kind("teacher")
def _teacher_from_checkpoint(meta: dict, state_dict: dict) -> CLIPTeacher:
    build = ClipBuild(meta["arch"], meta["open_clip_cfg"], bool(meta["pretrained"]), meta["teacher"])
    anchors = state_dict["head.anchors"]
    head = QualityHead(anchors, float(state_dict["head.logit_scale"]), meta.get("prompts"),
                       tuple(meta.get("levels") or range(1, anchors.shape[0] + 1)))
    model = CLIPTeacher(_build_visual(build), head, PreprocessSpec.from_dict(meta["preprocess"]), build)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"teacher checkpoint does not match its {meta['arch']} config: "
                              f"{first_line(exc, limit=500)}") from None
    return model


