"""Labelling: what stage 1 stores for a block of rows, given the teacher's logits.

Labelling is split in two so that the teacher never waits for the rest: :func:`teacher_logits`
is the teacher's call, and :func:`stored_arrays` (scaling by 1/T, the statistics at T=1, the
storage dtype) is CPU work on logits the teacher no longer touches, which the build hands to
its background writer (``cache.writer.Deferred``) to run beside the teacher's next call. The
stored values are the same bit for bit whichever thread computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from softcache.cache import layout
from softcache.cache.manifest import Manifest, StorageInfo
from softcache.errors import CacheError
from softcache.weights import output_logits


def teacher_stats(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Confidence statistics at T=1 (the teacher's own calibration), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top2[..., 0] - top2[..., 1] if top2.shape[-1] > 1 else top2[..., 0]
    return {
        "stats/max_prob": top2[..., 0].numpy(),
        "stats/entropy": (-(p * logp).nan_to_num().sum(-1)).numpy(),
        "stats/margin": margin.numpy(),
        "stats/prediction": p.argmax(-1).to(torch.int32).numpy(),
    }


def check_finite(logits: torch.Tensor, first_row: int) -> None:
    bad = (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad):
        rows = [first_row + int(i) for i in bad[:10]]
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CacheError(f"teacher produced NaN/Inf logits for rows {rows}{more}; nothing was marked complete")


@dataclass
class RowBlock:
    """What a producer hands the build for consecutive rows: inputs, labels, sample ids,
    and optional view parameters ``(n, V, P)`` and views already applied ``(n, V, ...)``.

    A block of token rows (``sequence``) has ``(n, L)`` token ids as inputs, no labels, and its
    ``tokens``/``loss_mask`` arrays in ``extra``."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    sample_index: np.ndarray
    views: torch.Tensor | None = None
    view_params: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    sequence: bool = False


@torch.no_grad()
def teacher_logits(teacher: nn.Module, block: RowBlock, device: torch.device) -> torch.Tensor:
    """The teacher's float32 logits ``(n, V, C)`` for every view of a block (``(n, L, C)`` for
    every position of token rows), on the CPU: the only part of labelling that needs the teacher
    (and so the only part the teacher's loop waits for)."""
    if block.sequence:
        return output_logits(teacher(block.inputs.to(device))).float().cpu()
    views = block.views if block.views is not None else block.inputs.unsqueeze(1)
    n, v = views.shape[:2]
    return output_logits(teacher(views.reshape(n * v, *views.shape[2:]).to(device))).float().cpu().reshape(n, v, -1)


def compact(scaled: torch.Tensor, storage: StorageInfo) -> dict[str, np.ndarray]:
    """The stored form of ``z / T`` ``(..., C)`` float32 under ``storage``.

    ``full`` keeps every value. ``topk`` keeps the ``k`` most probable classes' ids and
    log-probabilities at T, largest first, and the probability mass of all the others, computed
    in float32 from the full distribution before anything is rounded."""
    if storage.mode == "full":
        return {layout.SOFT: scaled.numpy().astype(storage.dtype)}
    logp = torch.log_softmax(scaled, dim=-1)
    values, ids = logp.topk(int(storage.k or 0), dim=-1)
    rest = (1.0 - values.exp().sum(-1)).clamp_(min=0.0)
    return {layout.SOFT: values.numpy().astype(storage.dtype), layout.SOFT_IDS: ids.numpy().astype(storage.id_dtype),
            layout.SOFT_REST: rest.numpy()}


def block_arrays(logits: torch.Tensor, block: RowBlock, first_row: int, temperature: float,
                 dtype: str, storage: StorageInfo | None = None) -> dict[str, np.ndarray]:
    """The arrays to store for a block, from its teacher logits ``(n, V, C)``: soft labels
    ``z / T`` in the storage form (``storage``, default full in ``dtype``), statistics at T=1,
    and the block's own arrays. Pure CPU work on tensors the teacher no longer touches, so the
    build runs it in the writer thread."""
    n, v = logits.shape[:2]
    check_finite(logits.reshape(n, -1), first_row)
    out = compact(logits / temperature, storage or StorageInfo(dtype=dtype))  # type: ignore[arg-type]
    out[layout.INDEX] = block.sample_index.astype(np.int64)
    if block.labels is not None:
        out[layout.LABELS] = block.labels.to(torch.int64).numpy()
    out.update({k: a.reshape(n, v) for k, a in teacher_stats(logits.reshape(n * v, -1)).items()})
    if block.view_params is not None:
        out[layout.VIEW_PARAMS] = block.view_params.astype(np.float32)
    out.update(block.extra)
    return out


def label_block(teacher: nn.Module, block: RowBlock, first_row: int, temperature: float, dtype: str,
                device: torch.device) -> dict[str, np.ndarray]:
    """Run the teacher on every view of a block and return the arrays to store for it."""
    return block_arrays(teacher_logits(teacher, block, device), block, first_row, temperature, dtype)


def stored_arrays(logits: torch.Tensor, block: RowBlock, first_row: int, manifest: Manifest,
                  store_inputs: bool) -> dict[str, np.ndarray]:
    """What the build stores for a block: :func:`block_arrays` plus, when the cache keeps them,
    the block's raw inputs."""
    arrays = block_arrays(logits, block, first_row, manifest.temperature, manifest.storage.dtype, manifest.storage)
    if store_inputs and not block.sequence:  # the raw inputs; augmented views are re-created from them and view_params
        arrays[layout.INPUTS] = block.inputs.to(torch.float32).numpy()
    return arrays
