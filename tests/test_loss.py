from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from softcache.student.loss import distillation_loss, rescale


def test_matches_hinton_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    got = distillation_loss(s, t / T, y, temperature=T, alpha=a)
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)


def test_rescale_to_another_temperature() -> None:
    z = torch.randn(4, 10)
    stored = z / 4.0
    torch.testing.assert_close(rescale(stored, 4.0, 2.0), z / 2.0)
    assert rescale(stored, 4.0, 4.0) is stored


def test_unknown_labels_drop_the_hard_term() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    unknown = torch.full((4,), -1)
    soft_only = distillation_loss(s, t, None, temperature=2.0, alpha=1.0)
    assert torch.isclose(distillation_loss(s, t, unknown, temperature=2.0, alpha=0.5), 0.5 * soft_only)
