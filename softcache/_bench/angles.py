"""How far a stored soft label steers a student from full distillation: gradient angles.

For held-out batches, the teacher's logits are stored under each mode as a build stores them
(``teacher.label.block_arrays``) and widened as the loaders widen them
(``student._batch.stored_soft``); the reference is full distillation from the live teacher's
float32 distribution. The angle between the gradients of the two losses, w.r.t. the student's
parameters over one batch and w.r.t. each position's logits, says how much of the direction a
mode keeps: a sampled target is noisy at a single position, and the batch's gradient averages
the noise out. Used by :mod:`softcache._bench.storage`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softcache.cache import layout
from softcache.config import StudentConfig
from softcache.errors import UsageError
from softcache.student._batch import Batch, Soft, stored_soft
from softcache.student.loss import distillation_loss, flatten_positions
from softcache.teacher.plan import storage_info
from softcache.teacher.label import RowBlock, block_arrays, teacher_logits
from softcache.weights import output_logits

CPU = torch.device("cpu")


def held_out_batches(inputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, batch_size: int,
                     count: int) -> list[Batch]:
    """``count`` batches of ``batch_size`` held-out rows in a fixed shuffle (as many as the rows
    allow, at least one); ``rows`` numbers each row's place among them (what keys its draws)."""
    n = len(inputs)
    if n == 0:
        raise UsageError("no held-out rows to measure gradient angles on")
    size = min(batch_size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    out = []
    for b in range(max(1, min(count, n // size))):
        picked = order[b * size : (b + 1) * size]
        out.append(Batch(rows=torch.arange(b * size, b * size + len(picked)), inputs=inputs[picked], soft=None,
                         labels=labels[picked], mask=None if mask is None else mask[picked] > 0))
    return out


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two vectors in degrees (float64: near 0 the cosine needs the digits)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a @ b / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def row_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle between ``a[i]`` and ``b[i]`` for every row, in degrees."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-300).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def gradients(logits: torch.Tensor, soft: Soft, batch: Batch, params: list[nn.Parameter], temperature: float,
              alpha: float, leftover: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss a student trains on, for one batch and target: its gradient w.r.t. the parameters
    (flattened, concatenated) and w.r.t. the logits of every position that counts ``(n, C)``."""
    labels = batch.labels
    if logits.ndim == 3:  # token rows: every position that counts is one prediction
        logits, soft, labels = flatten_positions(logits, soft, labels, batch.mask)  # type: ignore[assignment]
    loss = distillation_loss(logits, soft, labels, temperature=temperature, alpha=alpha,
                             leftover=leftover)  # type: ignore[arg-type]
    by_logit, *by_param = torch.autograd.grad(loss, [logits, *params], retain_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(by_param, params)])
    return flat, by_logit


def stored_targets(logits: torch.Tensor, block: RowBlock, first_row: int, temperature: float,
                   modes: tuple[str, ...]) -> dict[str, Soft]:
    """Each mode's target for a held-out block, from the teacher's logits ``(n, P, C)``: stored as
    a build stores rows ``first_row ..``, widened as the loaders widen them (one view of a
    classified sample, every position of a token row)."""
    out: dict[str, Soft] = {}
    for mode in modes:
        arrays = block_arrays(logits, block, first_row, temperature, "float16",
                              storage_info(mode, "float16", logits.shape[-1]))

        def stored(name: str) -> torch.Tensor:
            return torch.from_numpy(arrays[name] if block.sequence else np.ascontiguousarray(arrays[name][:, 0]))

        ids, rest = (stored(name) if name in arrays else None for name in (layout.SOFT_IDS, layout.SOFT_REST))
        out[mode] = stored_soft(stored(layout.SOFT), ids, rest, CPU)
    return out


def measure_angles(teacher: nn.Module, held_out: list[Batch], temperature: float, sequence: bool, model: nn.Module,
                   modes: tuple[str, ...], student: StudentConfig) -> dict[str, dict[str, Any]]:
    """Per mode, mean angles over the held-out batches between the gradients of the mode's loss and
    of full distillation from the live teacher: w.r.t. the parameters and (mean over positions)
    the logits for the soft term alone (alpha 1), which is all storage changes, and w.r.t. the
    parameters for ``student``'s own loss (its alpha and leftover)."""
    model.eval()  # no dropout: every target meets the same logits
    params = [p for p in model.parameters() if p.requires_grad]
    per: dict[str, dict[str, list[float]]] = {m: {"param": [], "logit": [], "at_alpha": []} for m in modes}
    for batch in held_out:
        block = RowBlock(inputs=batch.inputs, labels=None, sample_index=batch.rows.numpy(), sequence=sequence)
        logits_t = teacher_logits(teacher, block, CPU)
        reference = (logits_t if sequence else logits_t[:, 0]) / temperature
        targets = stored_targets(logits_t, block, int(batch.rows[0]), temperature, modes)
        logits = output_logits(model(batch.inputs))
        for term, alpha in (("soft", 1.0), ("at_alpha", student.alpha)):
            full_param, full_logit = gradients(logits, reference, batch, params, temperature, alpha, student.leftover)
            for mode, soft in targets.items():
                param, by_logit = gradients(logits, soft, batch, params, temperature, alpha, student.leftover)
                if term == "soft":
                    per[mode]["param"].append(angle_deg(param, full_param))
                    per[mode]["logit"].append(float(row_angles_deg(by_logit, full_logit).mean()))
                else:
                    per[mode]["at_alpha"].append(angle_deg(param, full_param))
    return {mode: {"param_angle_deg": statistics.fmean(a["param"]),
                   "param_angle_deg_std": statistics.stdev(a["param"]) if len(a["param"]) > 1 else 0.0,
                   "logit_angle_deg": statistics.fmean(a["logit"]),
                   "param_angle_deg_at_alpha": statistics.fmean(a["at_alpha"])} for mode, a in per.items()}
