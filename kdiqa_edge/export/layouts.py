"""Trace-time rewrites of timm blocks whose data movement a runtime runs slowly: the same numbers, other ops.

MobileViT (v1) unfolds its feature map into patches, and folds it back, with two reshape-transpose pairs each
way: `[B*C*n_h, p_h, n_w, p_w] -> [.., n_w, p_h, ..]`, then `[B, C, N, P] -> [B, P, N, C]`. The first
moves runs of p_w = 2 elements. ONNX Runtime copies such runs of 8 bytes (float) with a fast path, and runs of
2 bytes (uint8, in an INT8 graph) one element at a time. Measured on mobilevit_s at 224 px (AMD EPYC, 2
threads): that Transpose takes 0.06 ms in the FP32 graph and 1.5 ms in the INT8 one, and the six of them
cost the INT8 model 6.3 ms of its 30 ms.

The rewrite reaches the same `[B*P, N, C]` patches from the channels-last view: `[B, H, W, C] -> [B, n_h,
p_h, n_w, p_w, C] -> [B, p_h, p_w, n_h, n_w, C]`, one transpose that moves whole rows of C channels. Its
first step, NCHW -> NHWC, cancels against the transpose ONNX Runtime puts after an NHWC QLinearConv. The
transformer sees identical patches.
"""

from __future__ import annotations

import contextlib
import math


def _mobilevit_forward(self, x):
    """timm's MobileVitBlock.forward, with the unfold and fold done channels-last (see the module doc)."""
    import torch
    import torch.nn.functional as F

    shortcut = x
    x = self.conv_1x1(self.conv_kxk(x))
    patch_h, patch_w = self.patch_size
    B, C, H, W = x.shape
    new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
    num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
    interpolate = new_h != H or new_w != W
    if interpolate:  # as timm: resize to whole patches, and back after the fold
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

    # [B, C, H, W] -> [B, n_h, p_h, n_w, p_w, C] -> [B, p_h, p_w, n_h, n_w, C] -> [B*P, N, C]
    x = x.permute(0, 2, 3, 1).reshape(B, num_patch_h, patch_h, num_patch_w, patch_w, C)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(B * self.patch_area, num_patch_h * num_patch_w, C)
    x = self.norm(self.transformer(x))
    # and back: [B*P, N, C] -> [B, n_h, p_h, n_w, p_w, C] -> [B, C, H, W]
    x = x.reshape(B, patch_h, patch_w, num_patch_h, num_patch_w, C).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(B, new_h, new_w, C).permute(0, 3, 1, 2)
    if interpolate:
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

    x = self.conv_proj(x)
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


@contextlib.contextmanager
def channels_last_patches():
    """For the length of a trace, timm's MobileVitBlock unfolds and folds channels-last (module doc)."""
    try:
        from timm.models import mobilevit
    except ImportError:
        yield
        return
    saved = mobilevit.MobileVitBlock.forward
    mobilevit.MobileVitBlock.forward = _mobilevit_forward
    try:
        yield
    finally:
        mobilevit.MobileVitBlock.forward = saved


@contextlib.contextmanager
def traced():
    """What the ONNX and ExecuTorch traces run under: nn.MultiheadAttention as plain ops (its fused kernel
    exports to neither) and MobileViT's patches channels-last. Core ML traces with rank-5 rearrangements
    instead (export/coreml.py)."""
    from kdiqa_edge.models.score import plain_attention

    with plain_attention(), channels_last_patches():
        yield
