"""Scores of cached images under a model (evaluation, the teacher's predictions). Under DDP each process
scores a share and the shares are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from kdiqa_edge.train.distributed import SINGLE_PROCESS, DistContext, all_gather_object
from kdiqa_edge.train.loader import BatchLoader, DeviceTransform
from kdiqa_edge.train.step import autocast_for


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, indices: Sequence[int], preprocess=None,
            device: torch.device | str = "cpu", batch_size: int = 128, amp: bool = True,
            ctx: DistContext = SINGLE_PROCESS) -> np.ndarray:
    """Scores of `images[indices]` (float64, in index order). Under DDP each process scores a share."""
    device = torch.device(device)
    indices = np.asarray(indices, dtype=np.int64)
    mine = np.arange(len(indices))[ctx.rank::ctx.world_size]
    transform = DeviceTransform(preprocess or model.preprocess, device, channels_last=device.type == "cuda")
    autocast, _ = autocast_for(device, amp)
    loader = BatchLoader(images, np.zeros(len(images), np.float32), pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    scores = []
    for batch in loader([indices[mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]):
        with autocast():
            scores.append(model(transform(batch)["image"]).float().cpu())
    model.train(was_training)
    local = (mine, torch.cat(scores).double().numpy() if scores else np.zeros(0))
    result = np.empty(len(indices), dtype=np.float64)
    for positions, values in all_gather_object(ctx, local):
        result[positions] = values
    return result
