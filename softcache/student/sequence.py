"""Stage 2 for token rows: batches of a language-model cache, its checks, and its evaluation.

A row of a ``sequence`` cache is ``L`` token ids, their loss mask and one soft label per position
(full ``z / T`` or top-k, see ``cache.manifest.StorageInfo``). Batches carry the tokens as the
student's input, the next-token targets as labels (``sequences.next_token_targets``) and the
mask, so :class:`~softcache.student.run.StudentRun` steps a causal LM exactly as it steps a
classifier, position by position (``loss.flatten_positions``).

Everything the loader serves comes from the cache: the teacher is never loaded and no dataset is
read. Ranks (``torch.distributed``) each take an interleaved slice of every global batch, so
``world_size`` processes see the batches one process sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from softcache.cache import layout
from softcache.cache.store import Cache, Split
from softcache.config import TrainConfig
from softcache.errors import CacheError
from softcache.sequences import next_token_targets
from softcache.student._batch import Batch, Soft, TopK, distributed_rank, epoch_permutation
from softcache.weights import output_logits

EVAL_ROWS = 64
"""Held-out rows per forward pass when scoring a student."""


def _read(split: Split, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(split.read(name)))


def check_tokens(cache: Cache, split: Split, tokens: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Ids a tampered cache could hold outside the vocabulary would index past every logit."""
    vocab = cache.num_classes
    for what, values in (("token ids", tokens), ("soft label ids", ids)):
        if values is not None and values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab):
            raise CacheError(f"{cache.location}: {split.name} {what} fall outside the vocabulary [0, {vocab}) "
                             "(damaged or edited cache)")


class SequenceLoader:
    """All token rows and soft labels of a split held in RAM as stored (float16 values widen per
    batch); each epoch is a seeded shuffle of rows, the same for every rank."""

    def __init__(self, cache: Cache, *, batch_size: int, shuffle_seed: int = 0, device: torch.device | str = "cpu",
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, split: str = "train"):
        chosen = cache.train if split == "train" else cache.eval
        if chosen is None:
            raise CacheError(f"{cache.location}: no {split!r} split")
        self.device = torch.device(device)
        self.tokens = _read(chosen, layout.TOKENS).to(torch.int64)
        self.mask = _read(chosen, layout.LOSS_MASK)
        self.values = _read(chosen, layout.SOFT)
        compact = cache.manifest.storage.mode != "full"
        self.ids = _read(chosen, layout.SOFT_IDS).to(torch.int64) if compact else None
        self.rest = _read(chosen, layout.SOFT_REST) if compact else None
        check_tokens(cache, chosen, self.tokens, self.ids)
        self.batch_size, self.shuffle_seed, self.shuffle = batch_size, shuffle_seed, shuffle
        self.rank, self.world_size = rank, world_size

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def probe(self) -> torch.Tensor:
        """Two rows of tokens, to check a student's output shape before training."""
        return self.tokens[:2]

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def soft_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Every stored value (and leftover mass) in blocks, for the non-finite scan."""
        for start in range(0, self.rows, 4096):
            yield start, self.values[start : start + 4096]
            if self.rest is not None:
                yield start, self.rest[start : start + 4096]

    def soft(self, rows: torch.Tensor) -> Soft:
        values = self.values[rows].to(self.device, torch.float32)
        if self.ids is None or self.rest is None:
            return values
        return TopK(self.ids[rows].to(self.device), values, self.rest[rows].to(self.device, torch.float32))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = epoch_permutation(self.rows, self.shuffle_seed, epoch) if self.shuffle else torch.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            rows = order[start : start + self.batch_size][self.rank :: self.world_size]
            tokens, mask = self.tokens[rows], self.mask[rows]
            yield Batch(rows=rows.to(self.device), inputs=tokens.to(self.device), soft=self.soft(rows),
                        labels=next_token_targets(tokens, mask).to(self.device), mask=(mask > 0).to(self.device))


def open_sequence_loader(cache: Cache, cfg: TrainConfig, device: torch.device) -> SequenceLoader:
    """The training split's loader for a :class:`TrainConfig`; ranks from ``torch.distributed``."""
    rank, world = distributed_rank()
    return SequenceLoader(cache, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed, device=device,
                          rank=rank, world_size=world)


TOKEN_SCORES = ("bits_per_token", "perplexity", "accuracy", "teacher_agreement")

Evaluation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Held-out token rows, their next-token targets (-1: none) and the teacher's prediction at each
position (-1 where the position does not count)."""


def evaluation(cache: Cache) -> Evaluation | None:
    """The cache's held-out split as an :data:`Evaluation`; None when it has none."""
    split = cache.eval
    if split is None:
        return None
    tokens = _read(split, layout.TOKENS).to(torch.int64)
    mask = _read(split, layout.LOSS_MASK)
    check_tokens(cache, split, tokens, None)
    predicted = torch.from_numpy(split.predictions(view=None)).to(torch.int64)
    return tokens, next_token_targets(tokens, mask), torch.where(mask > 0, predicted, -1)


@torch.no_grad()
def score(model: nn.Module, held_out: Evaluation, device: torch.device) -> dict[str, float | None]:
    """Held-out bits per token (and perplexity) over positions with a next token, next-token
    accuracy, and top-1 agreement with the teacher's stored predictions over positions that count."""
    tokens, targets, teacher = held_out
    model.eval()
    nats, known, hits, agree, counted = 0.0, 0, 0, 0, 0
    for start in range(0, len(tokens), EVAL_ROWS):
        logits = output_logits(model(tokens[start : start + EVAL_ROWS].to(device))).float().cpu()
        y, t = targets[start : start + EVAL_ROWS], teacher[start : start + EVAL_ROWS]
        flat = logits.reshape(-1, logits.shape[-1])
        nats += float(torch.nn.functional.cross_entropy(flat, y.reshape(-1), ignore_index=-1, reduction="sum"))
        pred = logits.argmax(-1)
        known += int((y >= 0).sum())
        hits += int(((pred == y) & (y >= 0)).sum())
        agree += int(((pred == t) & (t >= 0)).sum())
        counted += int((t >= 0).sum())
    mean = nats / known if known else None
    return {"bits_per_token": mean / math.log(2) if mean is not None else None,
            "perplexity": math.exp(mean) if mean is not None else None,
            "accuracy": hits / known if known else None,
            "teacher_agreement": agree / counted if counted else None}
