"""The distillation loss: L = lambda * (1 - cos(u, v)) + (1 - lambda) * MSE(score, mos).

u are the student's features (after its projection into the teacher's embedding space), v the cached
teacher features of the same images, score the student's predicted quality (1..5) and mos the label.
The loss returns its named, already weighted terms: their sum is the total that is back-propagated.

A batch with unlabeled images (distill --unlabeled) carries `rated` (bool per image): the soft term is over
every image, the hard term over the rated ones only (masked per sample: an unrated image's NaN mos never
reaches the loss nor its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdiqa_edge.train.schedules import Variant, parse_variant


def soft_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(u, v) over the batch (direction only: the head L2-normalizes anyway)."""
    u = student_features.float()
    v = teacher_features.to(device=u.device, dtype=torch.float32)
    return (1.0 - F.cosine_similarity(u, v, dim=-1)).mean()


def hard_loss(score: torch.Tensor, mos: torch.Tensor, rated: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between predicted score and MOS, both on the 1..5 scale, over the `rated` images (all if None).

    A batch without a rated image gives 0, still tied to `score` (every process runs the same graph)."""
    mos = mos.to(device=score.device, dtype=torch.float32)
    if rated is None:
        return F.mse_loss(score.float(), mos)
    rated = rated.to(device=score.device, dtype=torch.bool)
    # where(), not indexing: the same shapes every step; an unrated NaN mos is replaced before the subtraction,
    # so its row's gradient is 0, not NaN
    error = torch.where(rated, score.float() - torch.where(rated, mos, 0.0), 0.0)
    return error.square().sum() / rated.sum().clamp(min=1)


def distill_loss(
    student_features: torch.Tensor | None,
    teacher_features: torch.Tensor | None,
    score: torch.Tensor,
    mos: torch.Tensor,
    lam: float,
    rated: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted terms {"soft": lam * (1 - cos), "hard": (1 - lam) * MSE}; their sum is the loss.

    With lam == 0 the soft term is skipped (hard-only and regression runs need no teacher features);
    with lam == 1 the hard term is still computed, weighted 0, so that it shows in the logs.
    """
    terms = {"hard": (1.0 - lam) * hard_loss(score, mos, rated)}
    if lam > 0.0:
        if student_features is None or teacher_features is None:
            raise ValueError("lambda > 0 needs both student and teacher features")
        terms = {"soft": lam * soft_loss(student_features, teacher_features), **terms}
    return terms


class DistillLoss:
    """`loss_fn(model, batch, step, total_steps)` for the training engine, for one ablation variant.

    The batch carries normalized images `image`, labels `mos` and, for the variants that use them, the
    cached teacher features `teacher_features`, and with unlabeled images `rated`. lambda(step) itself is a plain function of the step
    (`self.variant.lam`): the recipe logs it beside the terms.
    """

    def __init__(self, variant: str | Variant = "full"):
        self.variant = parse_variant(variant)

    def __call__(self, model, batch, step: int, total_steps: int) -> dict[str, torch.Tensor]:
        lam = self.variant.lam(step, total_steps)
        features = model.encode(batch["image"])
        score = model.head(features)
        teacher_features = batch.get("teacher_features") if lam > 0.0 else None
        return distill_loss(features if lam > 0.0 else None, teacher_features, score, batch["mos"], lam,
                            batch.get("rated"))
