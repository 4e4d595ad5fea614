"""The loss of stacked students (``softcache.student.stacked``) from a compact teacher: top-k
log-probabilities with their leftover mass, or sampled counts (``_batch.TopK``).

The teacher's ids, masses and leftover are one per row, shared by the K students; each student
brings its own temperature, alpha, label smoothing and leftover treatment. The soft term is
:func:`~softcache.student.loss.topk_kl` per student with its gradient written out in closed
form, broadcast over the student axis; the hard term is ``loss.stacked_loss``'s own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softcache.config import StudentConfig
from softcache.student._batch import TopK
from softcache.student.loss import LossSettings, _cross, leftover_entropy, stacked_loss


@dataclass(frozen=True)
class CompactSettings:
    """Each student's treatment of a compact teacher, as ``(K, 1)`` columns made once per group:
    its leftover (``to_label``, ``renormalize``; else bucket) and whether its own step takes the
    closed-form path of :class:`~softcache.student.loss._CompactLoss` (``fused``: T 1, no label
    smoothing, bucket or label; see ``loss.distillation_loss``). That path's gradient takes the
    kept and leftover masses to sum to exactly 1, autograd of ``loss.topk_kl`` their stored sum
    (float16 log-probabilities round it): mirroring which a student uses keeps it where it would
    be alone, to float round-off."""

    to_label: torch.Tensor
    renormalize: torch.Tensor
    fused: torch.Tensor

    @staticmethod
    def make(configs: Sequence[StudentConfig], like: torch.Tensor) -> CompactSettings:
        def col(flags: Sequence[bool]) -> torch.Tensor:
            return torch.tensor(list(flags), dtype=torch.bool, device=like.device).view(-1, 1)

        return CompactSettings(
            to_label=col([c.leftover == "label" for c in configs]),
            renormalize=col([c.leftover == "renormalize" for c in configs]),
            fused=col([c.temperature == 1 and c.label_smoothing == 0 and c.leftover != "renormalize"
                       for c in configs]),
        )


def compact_soft_term(logits: torch.Tensor, teacher: TopK, labels: torch.Tensor, settings: LossSettings,
                      compact: CompactSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft term of :func:`~softcache.student.loss.distillation_loss` from a compact teacher
    (:func:`~softcache.student.loss.topk_kl`, each student with its own leftover) for ``logits``
    ``(K, B, C)``, per student, and its gradient with respect to the logits in closed form; the
    teacher's ``(B, W)`` ids, log-probabilities and ``(B,)`` leftover are shared by every student.

    Per row, with ``q = softmax(z / T)``, kept ids ``I`` (slots of mass 0 hold none), their
    teacher mass ``p`` (total ``P``) and leftover ``r``: the gradient with respect to ``z / T``
    is ``P q - p`` from the kept ids, plus from the leftover ``r q - r onehot(y)`` when it goes
    to the label ``y``, or ``r q - r q / q_rest`` outside ``I`` when it is the bucket (``q_rest``
    the student's mass outside ``I``; nothing where ``loss.topk_kl`` clamps ``q_rest``); times
    ``alpha T / B``. A ``fused`` student (:class:`CompactSettings`) takes ``P + r`` as 1, as its
    own step does. A student is isolated as in :func:`~softcache.student.loss.stacked_loss`:
    its term is selected, never multiplied by a zero weight."""
    k, b, _ = logits.shape
    n = max(1, b)
    scaled = logits / settings.temp
    log_q = scaled - scaled.logsumexp(-1, keepdim=True)
    q = log_q.exp()
    ids = teacher.ids.long().expand(k, -1, -1)
    lq = log_q.gather(-1, ids)
    q_ids = lq.exp()
    logp = teacher.logp.to(logits.dtype).expand(k, -1, -1)
    logp = torch.where(compact.renormalize.unsqueeze(-1), logp - logp.logsumexp(-1, keepdim=True), logp)
    live = logp > -math.inf
    p = torch.where(live, torch.where(live, logp, 0.0).exp(), 0.0)
    rest = torch.where(compact.renormalize, 0.0, teacher.rest.to(logits.dtype))  # renormalize drops it
    total = q_ids.sum(-1)
    log_q_rest = torch.log1p(-total.clamp(max=1 - 1e-6))
    y = labels.clamp(min=0).long().expand(k, -1).unsqueeze(-1)
    lq_y = log_q.gather(-1, y).squeeze(-1)
    to_label = compact.to_label & (labels >= 0)  # rows without a label fall back to the bucket
    row = _cross(logp, lq).sum(-1) + leftover_entropy(logp, ids, rest, labels.expand(k, -1), to_label) - \
        rest * torch.where(to_label, lq_y, log_q_rest)
    loss = torch.where(settings.soft_on.view(k), settings.soft_weight.view(k) * row.sum(-1) / n, 0.0)
    bucket = ~to_label
    unclamped = total <= 1 - 1e-6
    ratio = torch.where(compact.fused, torch.where(bucket, rest / (1 - total).clamp(min=1e-6), 0.0),
                        torch.where(bucket & unclamped, rest / (1 - total), 0.0))
    mass = p.sum(-1) + torch.where(to_label | unclamped, rest, 0.0)
    grad = q * (torch.where(compact.fused, 1.0, mass) - ratio).unsqueeze(-1)
    grad.scatter_add_(-1, ids, ratio.unsqueeze(-1) * q_ids - p)
    grad.scatter_add_(-1, y, -torch.where(to_label, rest, 0.0).unsqueeze(-1))
    grad = torch.where(settings.soft_on, grad * (settings.alpha * settings.temp / n), 0.0)
    return loss, grad


def compact_stacked_loss(logits: torch.Tensor, teacher: TopK, labels: torch.Tensor, settings: LossSettings,
                         compact: CompactSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~softcache.student.loss.stacked_loss` with a compact teacher: the soft term of
    :func:`compact_soft_term` and the hard term of ``stacked_loss`` itself, which computes no
    soft term when no student's ``alphas`` is positive and weighs the hard term by each
    student's own ``1 - alpha`` (the ``alpha`` column)."""
    loss, grad = logits.new_zeros(logits.shape[0]), torch.zeros_like(logits)
    if any(a > 0 for a in settings.alphas):
        loss, grad = compact_soft_term(logits, teacher, labels, settings, compact)
    if any(a < 1 for a in settings.alphas):
        hard_only = dataclasses.replace(settings, alphas=tuple(0.0 for _ in settings.alphas))
        hard_loss, hard_grad = stacked_loss(logits, None, labels, hard_only)
        loss, grad = loss + hard_loss, grad + hard_grad
    return loss, grad
