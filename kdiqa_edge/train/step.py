"""The train step's parts: the model and its loss as one module, AdamW, the cosine schedule, mixed
precision and torch.compile. A bare step loop (benchmarks/bench_finetune.py) uses the same ones.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn


class OptimizerSettings(Protocol):
    """What the optimizer reads of a run's config (train.loop.TrainConfig has them)."""

    lr: float
    weight_decay: float


LossFn = Callable[[nn.Module, dict, int, int], Mapping[str, torch.Tensor]]
ScalarsFn = Callable[[int, int], Mapping[str, float]]


def cosine_factor(step: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier: 1 at step 0, cosine down to min_ratio at the last step."""
    progress = min(step / max(total_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: OptimizerSettings, fused: bool = False):
    """AdamW; 1-D tensors (biases, norm gains, logit scales, class/position embeddings' scales) get no decay."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)


def autocast_for(device: torch.device, amp: bool):
    """(autocast context factory, dtype or None). Mixed precision only on CUDA."""
    if not (amp and device.type == "cuda"):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return functools.partial(torch.autocast, device_type="cuda", dtype=dtype), dtype


def compile_encoder(model: nn.Module) -> nn.Module:
    """torch.compile the image encoder in place (state_dict keys unchanged).

    Not the whole train step: the loss takes the step number, and dynamo would recompile for every new
    Python int. The encoder is where the time goes; the head is a few tiny ops.
    """
    for name in ("visual", "encoder", "backbone"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            child.compile()
            return model
    model.compile()
    return model


class LossStep(nn.Module):
    """The model and its loss as one module, so DDP (and torch.compile) see the whole train forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, step: int, total_steps: int) -> dict[str, torch.Tensor]:
        return dict(self.loss_fn(self.model, batch, step, total_steps))
