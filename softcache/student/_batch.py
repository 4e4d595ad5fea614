"""What every loader yields, and the two rules both loaders follow so that they agree row for row:
the epoch's row order and the view each row shows. Kept apart from the loaders themselves so
that the streaming loader and the choice of loader can share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from softcache.cache.manifest import LOGPROB_STEP
from softcache.sequences import next_token_targets


@dataclass
class TopK:
    """A compact teacher distribution at the cache temperature: the kept classes' ``ids`` and
    log-probabilities ``logp`` ``(..., K)``, and the probability mass ``rest`` ``(...)`` of all
    the others (see ``cache.manifest.StorageInfo``). A slot of probability 0 (``logp`` -inf)
    holds no class: the loss skips it."""

    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor

    @staticmethod
    def sampled(ids: torch.Tensor, counts: torch.Tensor) -> TopK:
        """The target of sampled storage: ``counts / draws`` on the drawn ids (the draws are the
        counts' sum, which is the cache's N), -inf on the unused slots, nothing left over."""
        counts = counts.to(torch.float32)
        logp = (counts / counts.sum(-1, keepdim=True).clamp(min=1)).log()
        return TopK(ids, logp, torch.zeros(counts.shape[:-1], dtype=torch.float32, device=counts.device))

    def select(self, index: torch.Tensor) -> TopK:
        """The entries at ``index`` of the leading (flattened) axis."""
        return TopK(self.ids[index], self.logp[index], self.rest[index])

    def flatten(self) -> TopK:
        k = self.ids.shape[-1]
        return TopK(self.ids.reshape(-1, k), self.logp.reshape(-1, k), self.rest.reshape(-1))


Soft = torch.Tensor | TopK
"""The teacher's side of a batch: ``z / T_cache`` per class (full storage), or a :class:`TopK`."""


@dataclass
class Batch:
    """Rows of one training step: their row numbers in the cache, inputs, soft labels (the
    teacher's ``z / T_cache`` or a :class:`TopK`; None for a loader without soft labels) and hard
    labels (-1 unknown). Token rows have ``(B, L)`` inputs and labels (the next-token targets)
    and a ``mask`` of the positions that count."""

    rows: torch.Tensor
    inputs: torch.Tensor
    soft: Soft | None
    labels: torch.Tensor
    mask: torch.Tensor | None = None


def token_batch(rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                ids: torch.Tensor | None, rest: torch.Tensor | None, device: torch.device) -> Batch:
    """A batch of token rows from their arrays as stored (narrow ids, float16 values or uint8
    counts), widened by :func:`stored_soft`: the tokens are the student's input, the next-token
    targets its labels. Both loaders of token rows (in RAM and streamed) build their batches
    here, so they serve the same batch."""
    tokens, mask = tokens.to(device, torch.int64), mask.to(device)
    return Batch(rows=rows.to(device), inputs=tokens, soft=stored_soft(values, ids, rest, device),
                 labels=next_token_targets(tokens, mask), mask=mask > 0)


def stored_soft(values: torch.Tensor, ids: torch.Tensor | None, rest: torch.Tensor | None,
                device: torch.device) -> Soft:
    """The teacher's side of a batch from its soft-label arrays as stored, widened here: float
    values alone are full storage (``z / T_cache``); ids with a leftover ``rest`` are top-k
    storage (uint8 values: quantised log-probabilities, ``manifest.LOGPROB_STEP`` nats a step),
    ids without one sampled counts (:meth:`TopK.sampled`). Every loader, of either row
    kind, widens its gathered rows here and nowhere else, so they serve the same targets."""
    widened = values.to(device, torch.float32)
    if ids is None:
        return widened
    if rest is None:
        return TopK.sampled(ids.to(device, torch.int64), widened)
    if values.dtype == torch.uint8:  # quantised log-probabilities: steps of LOGPROB_STEP nats below 0
        widened = widened.mul_(-LOGPROB_STEP)
    return TopK(ids.to(device, torch.int64), widened, rest.to(device, torch.float32))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a function of (seed, epoch) only, so runs and workers agree."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def views_of(rows: np.ndarray | torch.Tensor, epoch: int, views: int) -> np.ndarray | torch.Tensor:
    """Which stored view each row shows in ``epoch``: every view in turn, whichever loader serves it."""
    return (rows + epoch) % views


def distributed_rank() -> tuple[int, int]:
    """This process's rank and the world size under ``torch.distributed`` (0, 1 without it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
