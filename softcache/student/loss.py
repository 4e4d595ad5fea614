"""The distillation loss (Hinton et al. 2015), in its two forms side by side, and temperature
rescaling of cached logits.

:func:`distillation_loss` is the loss of one student, differentiated by autograd.
:func:`stacked_loss` is the same loss for K students stacked into one model
(``softcache.student.stacked``), per student, with its gradient written out in closed form:
the two must agree, so they live together.

A cache stores z / T_cache. Training at another temperature T2 needs z / T2, which is the stored
value times T_cache / T2: exact for full storage (up to the storage dtype's rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from softcache import config
from softcache.student._batch import Soft, TopK

Leftover = Literal["bucket", "label", "renormalize"]
"""What a student does with a top-k cache's leftover mass (the classes the cache did not keep):

``bucket``
    (default) the leftover is one more class, "everything else": the student's mass outside the
    kept ids is matched to it. Exact KL on the coarsened distribution; needs no label.
``label``
    the leftover mass goes to the true label (the next token), as if the teacher had put it
    there; rows without a label fall back to ``bucket``.
``renormalize``
    the kept probabilities are scaled to sum to 1 and the leftover dropped: the student learns
    zero mass outside the teacher's top-k and pays for it on every held-out token there. Never
    a default; only when named.
"""


Retemper = config.Retemper
"""What a student asking for another temperature than a compact cache's does. Full storage keeps
``z / T_cache`` and is rescaled exactly (:func:`rescale`); a compact cache cannot be:

``refuse``
    (default) training stops before the first step with one line naming the cache's temperature.
``uniform-tail``
    :func:`retemper`: each kept probability is raised to the power ``T_cache / T`` and the
    leftover mass is taken as spread evenly over the classes not kept, then everything is
    renormalised. Exact on the kept classes' ratios; the tail's shape is a guess (a real tail is
    skewed, so at ``T > T_cache`` this flattens it too little). Sampled counts have no tail: their
    estimated probabilities are powered, which is biased for small counts.
"""


def retemper(teacher: TopK, classes: int, cache_temperature: float, temperature: float) -> TopK:
    """A compact teacher distribution at ``cache_temperature`` moved to ``temperature`` by the
    ``uniform-tail`` approximation (see :data:`Retemper`): with ``a = T_cache / T``, a kept
    class weighs ``p_k^a``, each of the ``m`` classes not kept ``(rest / m)^a``."""
    if temperature == cache_temperature:
        return teacher
    power = cache_temperature / temperature
    logp = teacher.logp.to(torch.float32) * power  # -inf (an unused slot) stays -inf
    kept = (teacher.logp > -math.inf).sum(-1).to(torch.float32)
    others = (classes - kept).clamp(min=1)
    rest = teacher.rest.to(torch.float32)
    log_tail = torch.where(rest > 0, others.log() * (1 - power) + rest.clamp(min=1e-30).log() * power, -math.inf)
    log_total = torch.logaddexp(logp.logsumexp(-1), log_tail)
    return TopK(teacher.ids, logp - log_total.unsqueeze(-1), (log_tail - log_total).exp())


def rescale(stored: torch.Tensor, cache_temperature: float, temperature: float) -> torch.Tensor:
    """Cached ``z / T_cache`` to ``z / temperature``; a no-op multiply is skipped so that
    training at the cache's own temperature sees the stored values bit for bit."""
    if temperature == cache_temperature:
        return stored
    return stored * (cache_temperature / temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_scaled: Soft | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    leftover: Leftover = "bucket",
    counts: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``.

    ``teacher_scaled`` is teacher logits already divided by ``temperature``, or a top-k
    distribution stored at that temperature (:func:`topk_kl`, with ``leftover``). The T^2 factor
    keeps the soft term's gradient scale independent of T. Labels of -1 (unknown) are ignored by
    the hard term; with no known label at all the hard term is dropped. A term whose weight is
    zero is never computed (not multiplied by 0: 0 * NaN is NaN), so a hard-label student
    (alpha 0) never reads the soft labels at all.

    ``counts`` ``(rows, known)`` are for data-parallel training, where these rows are one rank's
    share of a global batch: the global batch's rows (positions that count) and those of them
    with a known label. Each term is then this share's sum divided by the global count, so the
    ranks' losses, and their gradients, add up to the global batch's mean; whether the hard term
    exists is decided by the global ``known``, so every rank decides alike. Without ``counts``
    the terms are means over these rows, as always.
    """
    total = student_logits.new_zeros(())
    log_student = None
    if alpha > 0:
        if teacher_scaled is None:
            raise ValueError("alpha > 0 needs teacher soft labels")
        # at T = 1 the soft term's log-softmax is the hard term's too (the same kernel on the
        # same values: bit for bit what cross_entropy computes), so it is computed once
        if isinstance(teacher_scaled, TopK) and temperature == 1 and label_smoothing == 0 and \
                leftover in ("bucket", "label"):
            return _fused_compact(student_logits, teacher_scaled, labels, alpha, leftover, counts)
        log_student = F.log_softmax(student_logits if temperature == 1 else student_logits / temperature, dim=-1)
        if isinstance(teacher_scaled, TopK):
            kl = topk_kl(log_student, teacher_scaled, labels, leftover, count=None if counts is None else counts[0])
        else:
            log_teacher = F.log_softmax(teacher_scaled.to(student_logits.dtype), dim=-1)
            if counts is None:
                kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
            else:
                kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) / max(1.0, counts[0])
        total = total + alpha * temperature * temperature * kl
    if alpha < 1 and labels is not None and (bool((labels >= 0).any()) if counts is None else counts[1] > 0):
        shared = log_student is not None and temperature == 1 and label_smoothing == 0
        if counts is None:
            ce = F.nll_loss(log_student, labels, ignore_index=-1) if shared else \
                F.cross_entropy(student_logits, labels, ignore_index=-1, label_smoothing=label_smoothing)
        else:
            ce = (F.nll_loss(log_student, labels, ignore_index=-1, reduction="sum") if shared else
                  F.cross_entropy(student_logits, labels, ignore_index=-1, label_smoothing=label_smoothing,
                                  reduction="sum")) / counts[1]
        total = total + (1 - alpha) * ce
    return total


def _xlogy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``p * log_p`` with 0 where ``p`` is 0 (so a zero mass never multiplies a -inf)."""
    return torch.where(p > 0, p * log_p, 0.0)


def _cross(logp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``p * (log p - log q)`` per slot, 0 where ``p`` is 0 (or not a number). The slots left out
    compute with ``log p`` 0, so that no NaN reaches the gradient through the branch not taken."""
    live = logp > -math.inf
    safe = torch.where(live, logp, 0.0)
    return torch.where(live, safe.exp() * (safe - lq), 0.0)


def leftover_entropy(logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, labels: torch.Tensor | None,
                     to_label: torch.Tensor | bool) -> torch.Tensor:
    """The leftover's part of ``sum p log p`` per row, the constant that makes the soft term a KL.
    Where the leftover goes to a label the teacher already kept (``to_label``), the two masses are
    one class, ``(p_y + r) log(p_y + r)``, not two terms (which would undercount the teacher's
    entropy and could report a negative KL). A constant: no gradient changes."""
    own = _xlogy(rest, rest.clamp(min=1e-30).log())
    if labels is None or to_label is False:
        return own
    live = logp > -math.inf
    hit = (ids == labels.unsqueeze(-1)) & live & (labels >= 0).unsqueeze(-1)
    p_y = torch.where(hit, torch.where(live, logp, 0.0).exp(), 0.0).sum(-1)
    merged = p_y + rest
    fix = _xlogy(merged, merged.clamp(min=1e-30).log()) - _xlogy(p_y, p_y.clamp(min=1e-30).log()) - own
    return own + torch.where(hit.any(-1) & to_label, fix, 0.0)


def topk_kl(log_student: torch.Tensor, teacher: TopK, labels: torch.Tensor | None,
            leftover: Leftover = "bucket", count: float | None = None) -> torch.Tensor:
    """KL from a top-k teacher distribution to the student's ``log_student`` ``(n, C)``, mean
    over the n rows, with the leftover mass treated as ``leftover`` says (see :data:`Leftover`);
    with ``count``, the sum over the rows divided by ``count`` instead (a rank's share of a global
    batch of ``count`` rows, see :func:`distillation_loss`).

    A slot of probability 0 (an unused slot of sampled counts, ``logp`` -inf) adds exactly 0 to
    the loss and to its gradient: its term is selected away, never multiplied by 0 (0 * -inf is
    NaN). Sampled counts leave nothing over (``rest`` 0), so ``leftover`` does not change them.

    Touches K of the C student entries per row (one gather) plus the log-sum of the rest."""
    lq = log_student.gather(-1, teacher.ids.long())
    logp = teacher.logp.to(log_student.dtype)
    n = max(1, log_student.shape[0] if count is None else count)
    if leftover == "renormalize":
        logp = logp - logp.logsumexp(-1, keepdim=True)
        return _cross(logp, lq).sum() / n
    rest = teacher.rest.to(log_student.dtype)
    kept = _cross(logp, lq).sum(-1)
    # the student's mass outside the kept ids, as a log: log(1 - sum q_k), clamped off log(0)
    log_q_rest = torch.log1p(-lq.exp().sum(-1).clamp(max=1 - 1e-6))
    if leftover == "label" and labels is not None:
        known = labels >= 0
        lq_label = log_student.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
        log_q_rest = torch.where(known, lq_label, log_q_rest)
    elif leftover not in ("bucket", "label"):
        raise ValueError(f"leftover must be bucket, label or renormalize, not {leftover!r}")
    constant = leftover_entropy(logp, teacher.ids, rest, labels, leftover == "label")
    return (kept + constant - rest * log_q_rest).sum() / n


class _CompactLoss(torch.autograd.Function):
    """:func:`distillation_loss` from a compact (top-k or sampled) teacher at T = 1, with its
    gradient in closed form: the same values as the autograd path to float32 rounding, in about
    three passes over the ``(n, C)`` logits (a log-sum-exp, the softmax, one scaled copy) where
    autograd makes a dozen (two log-softmaxes and their backward, dense zero-filled buffers for
    each gather). That is what keeps a distilling step close to a cross-entropy step at an 8k
    vocabulary.

    Per row, with ``q = softmax(z)``, kept ids K, their teacher mass ``p`` and leftover ``r``:
    the soft term's gradient is ``q_j - p_j`` on K and ``q_j (1 - r / q_rest)`` elsewhere
    (bucket), or ``q - p`` with ``r`` taken at the label (label); the hard term's is
    ``q - onehot(y)``. Each is divided by its count of rows (``n_soft``, ``n_hard``)."""

    @staticmethod
    def forward(ctx, z, ids, logp, rest, labels, alpha, n_soft, n_hard, to_label):  # type: ignore[override]
        lse = torch.logsumexp(z, -1)
        lq = z.gather(-1, ids) - lse.unsqueeze(-1)
        p = logp.exp()
        kept = _cross(logp, lq).sum(-1)
        q_kept = lq.exp()
        total = q_kept.sum(-1)
        log_q_rest = torch.log1p(-total.clamp(max=1 - 1e-6))
        known = labels >= 0
        y = labels.clamp(min=0).unsqueeze(-1)
        lq_y = (z.gather(-1, y).squeeze(-1) - lse)
        other = torch.where(known, lq_y, log_q_rest) if to_label else log_q_rest
        constant = leftover_entropy(logp, ids, rest, labels, to_label)
        loss = alpha * (kept + constant - rest * other).sum() / n_soft
        hard = alpha < 1 and n_hard > 0
        if hard:
            loss = loss + (1 - alpha) * torch.where(known, -lq_y, 0.0).sum() / n_hard
        ctx.save_for_backward(z, lse, ids, p, rest, known, y, q_kept, total)
        ctx.settings = (alpha, n_soft, n_hard if hard else 0, to_label)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        z, lse, ids, p, rest, known, y, q_kept, total = ctx.saved_tensors
        alpha, n_soft, n_hard, to_label = ctx.settings
        a, b = alpha / n_soft, ((1 - alpha) / n_hard if n_hard else 0.0)
        bucket = ~known if to_label else torch.ones_like(known)
        ratio = torch.where(bucket, rest / (1 - total).clamp(min=1e-6), 0.0)
        grad = (z - lse.unsqueeze(-1)).exp_().mul_((a * (1 - ratio) + b * known).unsqueeze(-1))
        grad.scatter_add_(-1, ids, a * (ratio.unsqueeze(-1) * q_kept - p))
        at_label = -(b + a * torch.where(bucket, 0.0, rest)) * known
        grad.scatter_add_(-1, y, at_label.unsqueeze(-1))
        return grad.mul_(grad_out), None, None, None, None, None, None, None, None


def _fused_compact(logits: torch.Tensor, teacher: TopK, labels: torch.Tensor | None, alpha: float,
                   leftover: Leftover, counts: tuple[float, float] | None) -> torch.Tensor:
    n = logits.shape[0]
    labels = labels if labels is not None else torch.full((n,), -1, dtype=torch.int64, device=logits.device)
    n_soft = max(1.0, float(n if counts is None else counts[0]))
    n_hard = float(int((labels >= 0).sum()) if counts is None else counts[1])
    return _CompactLoss.apply(logits.float(), teacher.ids.long(), teacher.logp.float(), teacher.rest.float(),
                              labels.long(), alpha, n_soft, n_hard, leftover == "label")


def flatten_positions(logits: torch.Tensor, soft: Soft | None, labels: torch.Tensor,
                      mask: torch.Tensor | None) -> tuple[torch.Tensor, Soft | None, torch.Tensor]:
    """Token rows ``(B, L, C)`` as the ``(n, C)`` positions that count (``mask``), so every loss
    of this module applies per position: the soft term averages over those positions, the hard
    term over those with a next token (label >= 0)."""
    c = logits.shape[-1]
    # every position counts (packed corpora): no selection, which would copy the logits
    keep = mask.reshape(-1).nonzero().squeeze(-1) if mask is not None and not bool(mask.all()) else None
    flat = logits.reshape(-1, c)
    target = labels.reshape(-1)
    if isinstance(soft, TopK):
        soft = soft.flatten()
    elif soft is not None:
        soft = soft.reshape(-1, soft.shape[-1])
    if keep is None:
        return flat, soft, target
    picked = soft.select(keep) if isinstance(soft, TopK) else (soft[keep] if soft is not None else None)
    return flat[keep], picked, target[keep]


# -- the stacked form -------------------------------------------------------------------------


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    # z - logsumexp: the same values as log_softmax, and much faster for a short last dimension
    return z - z.logsumexp(-1, keepdim=True)


@dataclass(frozen=True)
class LossSettings:
    """Each student's T, alpha and label smoothing, as ``(K, 1, 1)`` columns made once per group
    (building small tensors every step would cost more than the arithmetic they feed)."""

    temperatures: tuple[float, ...]
    alphas: tuple[float, ...]
    label_smoothing: tuple[float, ...]
    cache_temperature: float
    temp: torch.Tensor
    scale: torch.Tensor  # T_cache / T: stored z / T_cache to z / T
    alpha: torch.Tensor
    soft_weight: torch.Tensor  # alpha T^2, the soft term's weight in the loss
    eps: torch.Tensor
    soft_on: torch.Tensor  # alpha > 0: the student learns from the teacher
    hard_on: torch.Tensor  # alpha < 1: the student learns from the labels

    @staticmethod
    def make(temperatures: Sequence[float], alphas: Sequence[float], label_smoothing: Sequence[float],
             cache_temperature: float, like: torch.Tensor) -> LossSettings:
        def col(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)

        return LossSettings(
            tuple(temperatures), tuple(alphas), tuple(label_smoothing), cache_temperature,
            temp=col(temperatures), scale=col([cache_temperature / t for t in temperatures]), alpha=col(alphas),
            soft_weight=col([a * t * t for a, t in zip(alphas, temperatures)]), eps=col(label_smoothing),
            soft_on=col(alphas) > 0, hard_on=col(alphas) < 1,
        )


def stacked_loss(logits: torch.Tensor, soft: torch.Tensor | None, labels: torch.Tensor,
                 settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-student :func:`distillation_loss` of ``logits`` ``(K, B, C)`` and its
    gradient with respect to the logits, in closed form.

    Soft term ``alpha T^2 KL(p_t || softmax(z/T))`` over the batch has gradient
    ``alpha T (softmax(z/T) - p_t) / B``; the hard term, cross-entropy with label smoothing
    ``eps`` over the ``n`` rows with a known label, has ``(softmax(z) - q) / n`` with
    ``q = (1 - eps) onehot(y) + eps / C``. As in the single-student loss, a term whose weight is
    zero contributes nothing and the hard term is dropped when no label in the batch is known.

    Students are isolated: a term is selected per student (``torch.where``), never multiplied by
    a zero weight, so a NaN in one student's term (0 * NaN is NaN) cannot reach another student's
    loss or gradient, and each student's row is computed as it would be in a group of one.
    """
    k, b, c = logits.shape
    loss = logits.new_zeros(k)
    grad = torch.zeros_like(logits)
    if any(a > 0 for a in settings.alphas):
        if soft is None:
            raise ValueError("alpha > 0 needs teacher soft labels")
        log_teacher = _log_softmax(soft.to(logits.dtype).unsqueeze(0) * settings.scale)
        p_teacher = log_teacher.exp()
        log_student = _log_softmax(logits / settings.temp)
        kl = (p_teacher * (log_teacher - log_student)).sum((1, 2)) / b
        loss = loss + torch.where(settings.soft_on.view(k), settings.soft_weight.view(k) * kl, 0.0)
        grad = grad + torch.where(settings.soft_on, (settings.alpha * settings.temp / b) * (log_student.exp() - p_teacher),
                                  0.0)
    known = labels >= 0
    n_known = int(known.sum())
    if any(a < 1 for a in settings.alphas) and n_known:
        log_p = _log_softmax(logits)
        mask = known.to(logits.dtype).view(1, b, 1)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), c).to(logits.dtype).unsqueeze(0)
        target = ((1 - settings.eps) * onehot + settings.eps / c) * mask
        ce = -(target * log_p).sum((1, 2)) / n_known
        loss = loss + torch.where(settings.hard_on.view(k), (1 - settings.alpha.view(k)) * ce, 0.0)
        grad = grad + torch.where(settings.hard_on, ((1 - settings.alpha) / n_known) * (log_p.exp() * mask - target), 0.0)
    return loss, grad
