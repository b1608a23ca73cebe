"""The distillation loss and its cosine-annealed mixing weight."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.train.losses import DistillLoss, distill_loss, hard_loss, soft_loss
from kdiqa_edge.train.schedules import cosine_lambda, parse_variant


def test_lambda_at_start_middle_end():
    total = 1000
    assert cosine_lambda(0, total) == pytest.approx(1.0)
    assert cosine_lambda(total // 2, total) == pytest.approx(0.5)
    assert cosine_lambda(total, total) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lambda(total // 4, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    values = [cosine_lambda(t, total) for t in range(total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone from teacher to labels


@pytest.mark.parametrize("spec, at0, at_half, at_end", [
    ("full", 1.0, 0.5, 0.0), ("soft", 1.0, 1.0, 1.0), ("hard", 0.0, 0.0, 0.0),
    ("fixed:0.3", 0.3, 0.3, 0.3), ("regression", 0.0, 0.0, 0.0),
])
def test_variants_pin_lambda(spec, at0, at_half, at_end):
    variant = parse_variant(spec)
    assert variant.spec == spec
    assert [variant.lam(t, 10) for t in (0, 5, 10)] == pytest.approx([at0, at_half, at_end])
    assert variant.uses_teacher_head == (spec != "regression")


@pytest.mark.parametrize("bad", ["fixed:2", "fixed:x", "fixed:-0.1", "distill", ""])
def test_bad_variant_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        parse_variant(bad)


def _tensors(seed=0, n=4, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen),
            1 + 4 * torch.rand(n, generator=gen), 1 + 4 * torch.rand(n, generator=gen))


def test_terms_are_weighted_and_sum_to_the_formula():
    u, v, score, mos = _tensors()
    lam = 0.3
    terms = distill_loss(u, v, score, mos, lam)
    cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)
    expected = lam * (1 - cos).mean() + (1 - lam) * ((score - mos) ** 2).mean()
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"soft", "hard"}
    assert soft_loss(u, u).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_loss(u, -u).item() == pytest.approx(2.0, abs=1e-6)
    assert hard_loss(mos, mos).item() == 0.0
    assert set(distill_loss(None, None, score, mos, 0.0)) == {"hard"}


def test_soft_term_really_uses_the_teacher_features():
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    student = create_student("test_efficientnet", teacher.head, teacher.preprocess, pretrained=False)
    size = teacher.preprocess.size
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, size, size, generator=gen),
             "mos": 1 + 4 * torch.rand(4, generator=gen)}
    with torch.no_grad():
        features = teacher.encode(batch["image"])
    other = torch.randn(features.shape, generator=gen)

    def total(loss_fn, teacher_features, step=0):
        student.eval()  # same BatchNorm statistics on every call
        with torch.no_grad():
            terms = loss_fn(student, {**batch, "teacher_features": teacher_features}, step, 10)
            return sum(terms.values()).item()

    full = DistillLoss("full")
    assert total(full, features) != pytest.approx(total(full, other))
    # Late in the schedule the soft weight is small but not zero; at the end it is gone.
    assert total(full, features, step=9) != pytest.approx(total(full, other, step=9))
    assert total(full, features, step=10) == pytest.approx(total(full, other, step=10))
    hard = DistillLoss("hard")
    assert total(hard, features) == pytest.approx(total(hard, other))
    # The gradient reaches the student through the soft term alone.
    student.zero_grad()
    sum(DistillLoss("soft")(student, {**batch, "teacher_features": features}, 0, 10).values()).backward()
    assert student.proj.weight.grad is not None and student.proj.weight.grad.abs().sum() > 0
