"""Stage 2 for token rows: batches of a language-model cache, its checks, and its evaluation.

A row of a ``sequence`` cache is ``L`` token ids, their loss mask and one soft label per position
(full ``z / T``, top-k or sampled counts, see ``cache.manifest.StorageInfo``). Batches carry the tokens as the
student's input, the next-token targets as labels (``sequences.next_token_targets``) and the
mask, so :class:`~softcache.student.run.StudentRun` steps a causal LM exactly as it steps a
classifier, position by position (``loss.flatten_positions``).

Everything the loader serves comes from the cache: the teacher is never loaded and no dataset is
read. Ranks (``torch.distributed``) each take an interleaved slice of every global batch, so
``world_size`` processes see the batches one process sees. A cache larger than the memory budget
streams chunk-shuffled instead (:class:`~softcache.student.stream.StreamLoader`, which serves the
same batches of token rows): :func:`open_sequence_loader` chooses, as ``loaders.open_loader`` does
for samples.
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
from softcache.student._batch import Batch, distributed_rank, epoch_permutation, token_batch
from softcache.student.loaders import choose_mode
from softcache.student.stream import StreamLoader, data_parallel
from softcache.weights import output_logits

EVAL_ROWS = 64
"""Held-out rows per forward pass when scoring a student."""


def _read(split: Split, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(split.read(name)))


def check_tokens(cache: Cache, split: Split, tokens: torch.Tensor | np.ndarray,
                 ids: torch.Tensor | np.ndarray | None) -> None:
    """Ids a tampered cache could hold outside the vocabulary would index past every logit.
    Takes the ids as stored (numpy finds the extremes of any integer dtype, torch not of uint16)."""
    vocab = cache.num_classes
    for what, given in (("token ids", tokens), ("soft label ids", ids)):
        values = np.asarray(given) if given is not None else None
        if values is not None and values.size and (int(values.min()) < 0 or int(values.max()) >= vocab):
            raise CacheError(f"{cache.location}: {split.name} {what} fall outside the vocabulary [0, {vocab}) "
                             "(damaged or edited cache)")


class SequenceLoader:
    """All token rows and soft labels of a split held in RAM as stored (narrow ids and float16
    values widen per batch); each epoch is a seeded shuffle of rows, the same for every rank."""

    def __init__(self, cache: Cache, *, batch_size: int, shuffle_seed: int = 0, device: torch.device | str = "cpu",
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, split: str = "train"):
        chosen = cache.train if split == "train" else cache.eval
        if chosen is None:
            raise CacheError(f"{cache.location}: no {split!r} split")
        self.device = torch.device(device)
        self.tokens = _read(chosen, layout.TOKENS)
        self.mask = _read(chosen, layout.LOSS_MASK)
        self.values = _read(chosen, layout.SOFT)
        stored = layout.soft_arrays(cache.manifest)
        self.ids = _read(chosen, layout.SOFT_IDS) if layout.SOFT_IDS in stored else None
        self.rest = _read(chosen, layout.SOFT_REST) if layout.SOFT_REST in stored else None
        check_tokens(cache, chosen, self.tokens, self.ids)
        self.batch_size, self.shuffle_seed, self.shuffle = batch_size, shuffle_seed, shuffle
        self.rank, self.world_size = rank, world_size

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def probe(self) -> torch.Tensor:
        """Two rows of tokens, to check a student's output shape before training."""
        return self.tokens[:2].to(torch.int64)

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def soft_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Every stored value (and leftover mass) in blocks, for the non-finite scan."""
        for start in range(0, self.rows, 4096):
            yield start, self.values[start : start + 4096]
            if self.rest is not None:
                yield start, self.rest[start : start + 4096]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = epoch_permutation(self.rows, self.shuffle_seed, epoch) if self.shuffle else torch.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            rows = order[start : start + self.batch_size][self.rank :: self.world_size]
            yield token_batch(rows, self.tokens[rows], self.mask[rows], self.values[rows],
                              self.ids[rows] if self.ids is not None else None,
                              self.rest[rows] if self.rest is not None else None, self.device)


def open_sequence_loader(cache: Cache, cfg: TrainConfig, device: torch.device) -> SequenceLoader | StreamLoader:
    """The training split's loader for a :class:`TrainConfig` (``loader``, ``memory_budget``; the
    stream's ``buffer_chunks``, ``workers``, ``start_method``); ranks from ``torch.distributed``.
    ``batch_size`` is the global batch: streamed ranks each cut their share from their own chunks
    and step in lockstep (:func:`~softcache.student.stream.data_parallel`), in another order than
    one process.

    Either way the token and soft-label ids are checked against the vocabulary before any step:
    in RAM as they are loaded; streamed, in one pass over those two arrays, a group of chunks at
    a time (``_checks.check_finite`` reads the values and leftover mass the same way, so the
    checks read each array they need once, within the loader's memory bound)."""
    rank, world = distributed_rank()
    if choose_mode(cache.train, cfg.loader, cfg.memory_budget) == "memory":
        return SequenceLoader(cache, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed, device=device,
                              rank=rank, world_size=world)
    batch_size, even = data_parallel(cfg.batch_size, world)
    loader = StreamLoader(cache, batch_size=batch_size, shuffle_seed=cfg.shuffle_seed, device=device,
                          buffer_chunks=cfg.buffer_chunks, workers=cfg.workers, start_method=cfg.start_method,
                          rank=rank, world_size=world, even_batches=even)
    names = tuple(name for name in (layout.TOKENS, layout.SOFT_IDS) if name in loader.source.names)
    for _, block in loader.blocks(*names):
        check_tokens(cache, cache.train, block[layout.TOKENS], block.get(layout.SOFT_IDS))
    return loader


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
