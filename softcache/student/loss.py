"""The distillation loss (Hinton et al. 2015) and temperature rescaling of cached logits.

A cache stores z / T_cache. Training at another temperature T2 needs z / T2, which is the stored
value times T_cache / T2: exact for full storage (up to the storage dtype's rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rescale(stored: torch.Tensor, cache_temperature: float, temperature: float) -> torch.Tensor:
    """Cached ``z / T_cache`` to ``z / temperature``; a no-op multiply is skipped so that
    training at the cache's own temperature sees the stored values bit for bit."""
    if temperature == cache_temperature:
        return stored
    return stored * (cache_temperature / temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_scaled: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``.

    ``teacher_scaled`` is teacher logits already divided by ``temperature``. The T^2 factor keeps
    the soft term's gradient scale independent of T. Labels of -1 (unknown) are ignored by the
    hard term; with no known label at all the hard term is dropped. A term whose weight is zero
    is never computed (not multiplied by 0: 0 * NaN is NaN), so a hard-label student (alpha 0)
    never reads the soft labels at all.
    """
    total = student_logits.new_zeros(())
    if alpha > 0:
        if teacher_scaled is None:
            raise ValueError("alpha > 0 needs teacher soft labels")
        log_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_scaled.to(student_logits.dtype), dim=-1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        total = total + alpha * temperature * temperature * kl
    if alpha < 1 and labels is not None and bool((labels >= 0).any()):
        ce = F.cross_entropy(student_logits, labels, ignore_index=-1, label_smoothing=label_smoothing)
        total = total + (1 - alpha) * ce
    return total
