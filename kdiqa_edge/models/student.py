"""Students: any timm image encoder, projected into the teacher's embedding space, scored by its head.

`Student = timm encoder (pooled features) -> Linear(num_features, D) -> the teacher's frozen QualityHead`
(same anchors, same logit_scale), so the student's features live where the teacher's do and the distillation
loss can compare them directly. The `regression` ablation drops the teacher altogether: encoder -> a plain
Linear regression head on the pooled features.

Weights: ImageNet-pretrained through timm's own pretrained mechanism (from the local Hugging Face / torch
hub cache, or downloaded), a local weights file (`--student-weights PATH`), or random init
(`--no-pretrained`, labelled "not pretrained" in every output). An offline machine without cached
weights gets one line naming both flags, not a minute of download retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdiqa_edge.errors import CheckpointError, ConfigError, WeightsUnavailable, first_line
from kdiqa_edge.models.checkpoint import register_checkpoint_kind
from kdiqa_edge.models.head import QualityHead
from kdiqa_edge.preprocess import PreprocessSpec

NOT_PRETRAINED = "not pretrained"
PAPER_STUDENTS = ("swin_tiny_patch4_window7_224", "resnet18", "mobilevit_s", "efficientnet_b0")
_HUB_HOST = ("huggingface.co", 443)


@dataclasses.dataclass(frozen=True)
class StudentBuild:
    """Everything needed to rebuild the student's architecture without any weights."""

    arch: str  # timm model name (a `name.tag` pretrained tag is allowed)
    head: str  # "quality" (the teacher's head) | "regression" (plain Linear, no teacher)
    pretrained: bool  # ImageNet weights were loaded into the encoder
    weights: str  # where the encoder's initial weights came from, or "not pretrained"
    timm_kwargs: dict  # extra timm.create_model arguments (img_size for fixed-size models)


class RegressionHead(nn.Module):
    """The `regression` ablation: score = Linear(features), starting at the middle of the 1..5 scale."""

    def __init__(self, in_features: int, bias: float = 3.0):
        super().__init__()
        self.fc = nn.Linear(in_features, 1)
        nn.init.constant_(self.fc.bias, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features).squeeze(-1)

    def meta(self) -> dict:
        return {"head": "regression", "prompts": None, "levels": None, "logit_scale": None}


class Student(nn.Module):
    """`encode(x)`: features [N, D] (before L2 norm); `head`; `preprocess`; `forward(x)`: score [N].

    With the quality head, D is the teacher's embedding size (the encoder's pooled features go through
    `proj`); with the regression head, D is the encoder's own feature size and there is no projection.
    """

    kind = "student"

    def __init__(self, encoder: nn.Module, head: nn.Module, preprocess: PreprocessSpec, build: StudentBuild):
        super().__init__()
        self.encoder = encoder
        width = encoder_width(encoder)
        self.proj = nn.Linear(width, head.embed_dim) if isinstance(head, QualityHead) else None
        self.head = head
        self.preprocess = preprocess
        self.build = build

    @property
    def pretrained(self) -> bool:
        return self.build.pretrained

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features if self.proj is not None else encoder_width(self.encoder)

    @property
    def label(self) -> str:
        """How outputs name this student, e.g. `resnet18` or `resnet18 (not pretrained)`."""
        return self.build.arch if self.pretrained else f"{self.build.arch} ({NOT_PRETRAINED})"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.proj(features) if self.proj is not None else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "arch": self.build.arch,
            "embed_dim": self.embed_dim,
            "pretrained": self.build.pretrained,
            "student": self.build.arch,
            "label": self.label,
            "weights": self.build.weights,
            "timm_kwargs": self.build.timm_kwargs,
        }


def encoder_width(encoder: nn.Module) -> int:
    """Size of the timm encoder's pooled (pre-logits) features."""
    return int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)


def create_student(arch: str, head: QualityHead | None, preprocess: PreprocessSpec, pretrained: bool = True,
                   weights: str | Path | None = None) -> Student:
    """A student around the teacher's `head` (a frozen copy is taken), or a regression student if None.

    `weights` (a local file) implies pretrained; `pretrained=False` is random init.
    """
    import timm

    load_kwargs, source = check_student(arch, pretrained, weights, verify=False)
    timm_kwargs = _size_kwargs(arch, preprocess.size)
    if not load_kwargs:
        encoder = timm.create_model(arch, num_classes=0, exportable=True, **timm_kwargs)
    else:
        encoder = _create_loaded(arch, source, timm_kwargs, load_kwargs)
    build = StudentBuild(arch, "quality" if head is not None else "regression", bool(load_kwargs), source,
                         timm_kwargs)
    return _assemble(encoder, head, preprocess, build)


def check_student(arch: str, pretrained: bool = True, weights: str | Path | None = None,
                  verify: bool = True) -> tuple[dict, str]:
    """Fail fast, before any teacher work: an unknown timm name or tag, ImageNet weights that cannot be had,
    or (`verify`: one trial load) a weights file that is not this model's or does not load.

    Returns the timm.create_model arguments that load the weights, and a label of where they come from.
    """
    import timm

    base, _, tag = arch.partition(".")
    if not timm.is_model(base):
        raise ConfigError(f"unknown timm model {arch!r} for --student (e.g. {', '.join(PAPER_STUDENTS)})")
    if tag and arch not in timm.list_pretrained(f"{base}.*"):
        tags = ", ".join(name.partition(".")[2] for name in timm.list_pretrained(f"{base}.*")) or "none"
        raise ConfigError(f"unknown pretrained tag {tag!r} for --student {base}; timm's tags for it: {tags}")
    if not (pretrained or weights):
        return {}, NOT_PRETRAINED
    load_kwargs, source = _pretrained_kwargs(arch, weights)
    if verify:  # at the model's own input size: a trial of the keys, not of a resize
        _create_loaded(arch, source, {}, load_kwargs)
    return load_kwargs, source


def _create_loaded(arch: str, source: str, timm_kwargs: dict, load_kwargs: dict) -> nn.Module:
    """The encoder with its weights loaded through timm, refused in one line when they do not fit.

    With num_classes=0 timm drops the classifier and loads with strict=False, so a file of another model
    loads NOTHING and says so only in a log line: the student would train from random init while labelled
    pretrained. timm's own report of the missing keys (after its checkpoint filters) is what is checked.
    """
    import timm

    with _timm_load_report() as report:
        try:
            encoder = timm.create_model(arch, num_classes=0, exportable=True, **timm_kwargs, **load_kwargs)
        except Exception as exc:  # noqa: BLE001 - torch/timm raise many types for a foreign or corrupt file
            raise WeightsUnavailable(f"cannot load the {arch} weights from {source}: "
                                     f"{first_line(exc, typed=True)}") from None
    parameters = {name for name, _ in encoder.named_parameters()}
    missing = [name for name in report.missing if name in parameters]
    if missing:
        raise WeightsUnavailable(
            f"{source} does not hold {arch} weights: {len(missing)} of the encoder's {len(parameters)} weight "
            f"tensors are not in it (first {missing[0]}); pass that model's weights file, or --no-pretrained")
    return encoder


class _LoadReport(logging.Handler):
    """Collects the keys timm's pretrained loader reports missing (it logs them at INFO and goes on)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"Missing keys \((.*)\) discovered", record.getMessage(), re.DOTALL)
        if match:
            self.missing.extend(name.strip() for name in match.group(1).split(","))


@contextlib.contextmanager
def _timm_load_report():
    logger = logging.getLogger("timm.models._builder")
    report = _LoadReport()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the INFO lines are ours to read, not the user's to see
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def _assemble(encoder: nn.Module, head: QualityHead | None, preprocess: PreprocessSpec,
              build: StudentBuild) -> Student:
    if head is None:
        student_head: nn.Module = RegressionHead(encoder_width(encoder))
    else:
        student_head = head.copy()
        student_head.requires_grad_(False)  # buffers only today; frozen in code should that change
    return Student(encoder, student_head, preprocess, build)


def _size_kwargs(arch: str, size: int) -> dict:
    """Fixed-size models (Swin, ViT) are built for the teacher's input size when it differs."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[-2:]) != (size, size):
        return {"img_size": size}
    return {}


def _pretrained_kwargs(arch: str, weights: str | Path | None) -> tuple[dict, str]:
    """timm.create_model arguments that load ImageNet weights, and a label of where they come from."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsUnavailable(f"--student-weights file not found: {path}")
        if not path.is_file():
            raise WeightsUnavailable(f"--student-weights {path} is not a file")
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}, path.name
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsUnavailable(f"timm has no pretrained weights for {arch!r}: pass --student-weights PATH "
                                 f"or --no-pretrained (random init, {NOT_PRETRAINED})")
    label = f"timm:{cfg.hf_hub_id or cfg.url}"
    cached = _cached_weights(cfg)
    if cached is not None:
        # The file in the local cache, through timm's own loader: no network round trip at all.
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}}, label
    if not _hub_reachable():
        raise WeightsUnavailable(
            f"no cached ImageNet weights for {arch} and no network: pass a local weights file with "
            f"--student-weights PATH, or --no-pretrained (random init, {NOT_PRETRAINED})")
    return {"pretrained": True}, label


def _cached_weights(cfg) -> str | None:
    """A locally cached weights file for this pretrained config (Hugging Face hub or torch hub cache)."""
    if cfg.file and Path(cfg.file).is_file():
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if candidate.is_file():
            return str(candidate)
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a download could work at all (huggingface_hub would otherwise retry for ~a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@register_checkpoint_kind("student")
def _student_from_checkpoint(meta: dict, state_dict: dict) -> Student:
    import timm

    build = StudentBuild(meta["arch"], meta.get("head", "quality"), bool(meta.get("pretrained")),
                         meta.get("weights", ""), dict(meta.get("timm_kwargs") or {}))
    encoder = timm.create_model(build.arch, pretrained=False, num_classes=0, exportable=True,
                                **build.timm_kwargs)
    head = None
    if build.head == "quality":
        anchors = state_dict["head.anchors"]
        head = QualityHead(anchors, float(state_dict["head.logit_scale"]), meta.get("prompts"),
                           tuple(meta.get("levels") or range(1, anchors.shape[0] + 1)))
    model = _assemble(encoder, head, PreprocessSpec.from_dict(meta["preprocess"]), build)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"student checkpoint does not match its {build.arch} architecture: "
                              f"{first_line(exc)}") from None
    return model
