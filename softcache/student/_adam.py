"""``torch.optim.Adam`` for K stacked students: one flat buffer, one set of update operations.

Kept apart from :mod:`softcache.student.stacked` because it is plain arithmetic over a buffer and
knows nothing of models or groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StackedAdam:
    """``torch.optim.Adam`` (L2 weight decay, no amsgrad) over one flat buffer holding every
    parameter of K students, with a learning rate and weight decay per student; the arithmetic
    follows torch's single-tensor Adam. One buffer means one set of update operations per step,
    whatever the number of parameter tensors. ``student[i]`` says which student element ``i``
    belongs to; learning rate and weight decay are expanded to one value per element once."""

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor, student: torch.Tensor, lrs: Sequence[float],
                 weight_decays: Sequence[float], betas: tuple[float, float], eps: float):
        self.flat, self.grad, self.betas, self.eps = flat, grad, betas, eps
        self.lr = torch.tensor(list(lrs), dtype=flat.dtype, device=flat.device)[student]
        self.step_count = 0
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self._decay = None if not any(weight_decays) else torch.tensor(
            list(weight_decays), dtype=flat.dtype, device=flat.device)[student]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.step_count
        bias2_sqrt = (1 - beta2**self.step_count) ** 0.5
        p, grad = self.flat, self.grad
        if self._decay is not None:
            grad = grad + p * self._decay
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        # torch rounds lr / bias1 once; this rounds lr and 1 / bias1: a difference of an ulp
        p.add_(self.exp_avg.mul(self.lr).mul_(-1 / bias1).div_(denom))


def adam_settings(optimizer: torch.optim.Optimizer) -> tuple[float, float, tuple[float, float], float] | None:
    """(lr, weight_decay, betas, eps) of a plain Adam with one parameter group, else None."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    if g.get("amsgrad") or g.get("maximize") or g.get("decoupled_weight_decay") or isinstance(g["lr"], torch.Tensor):
        return None
    return float(g["lr"]), float(g["weight_decay"]), (float(g["betas"][0]), float(g["betas"][1])), float(g["eps"])
