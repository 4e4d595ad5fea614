"""Token sequences as softcache sees them: the rows of a language-model cache.

A sequence dataset is a map-style torch ``Dataset`` whose items are a 1-D integer tensor of token
ids, or a mapping with ``input_ids`` and optionally ``loss_mask``. :class:`TokenRows` holds such
rows as whole ``(N, L)`` tensors (what :func:`pack_documents` makes from a corpus), so a build
slices them without a per-item loop; any other sequence dataset is read into one once.

``loss_mask[t]`` says whether the prediction made at position ``t`` (of token ``t + 1``) counts:
rows shorter than ``L`` are padded with id 0 and mask 0. The teacher's distribution at the last
position is stored and distilled although its next token lies in the next row, so the
cross-entropy target there is unknown (-1): see :func:`next_token_targets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softcache.errors import CacheError, UsageError


class TokenRows(Dataset):
    """Rows of ``L`` token ids with their loss mask, plus what the manifest records about them.

    ``tokenizer`` (name, sha256 ``digest`` of its file, ``vocab_size``, ``special_ids``) and
    ``packing`` (how documents became rows) are plain JSON; ``info`` is the dataset's own
    description (split, corpus digest, ...), recorded like any dataset's."""

    def __init__(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
                 info: dict[str, Any] | None = None, tokenizer: dict[str, Any] | None = None,
                 packing: dict[str, Any] | None = None):
        if tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise UsageError(f"token rows must be a 2-D integer tensor, not {tuple(tokens.shape)} {tokens.dtype}")
        self.tokens = tokens.to(torch.int64)
        mask = torch.ones_like(self.tokens, dtype=torch.uint8) if loss_mask is None else loss_mask.to(torch.uint8)
        if mask.shape != self.tokens.shape:
            raise UsageError(f"loss mask of shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}")
        self.loss_mask = mask
        self.inputs = self.tokens  # what fingerprints and batches slice (data.py)
        self.info = dict(info or {})
        self.tokenizer = dict(tokenizer) if tokenizer else None
        self.packing = dict(packing) if packing else None

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "loss_mask": self.loss_mask[index]}


def is_sequence_item(item: Any) -> bool:
    """True for what a sequence dataset yields: a 1-D integer tensor/array or an ``input_ids`` mapping."""
    if isinstance(item, Mapping):
        return "input_ids" in item
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return item.ndim == 1 and not (item.dtype.is_floating_point if isinstance(item, torch.Tensor)
                                       else np.issubdtype(item.dtype, np.floating))
    return False


def is_sequence_dataset(dataset: Dataset) -> bool:
    if isinstance(dataset, TokenRows):
        return True
    return len(dataset) > 0 and is_sequence_item(dataset[0])  # type: ignore[arg-type]


def as_token_rows(dataset: Dataset, length: int | None = None, what: str = "sequence") -> TokenRows:
    """``dataset`` as :class:`TokenRows` of ``length`` positions (default: its longest item).

    Rows shorter than ``length`` are padded (mask 0). A longer one, an item that is not token
    ids, or a loss mask of another size is bad data: a one-line :class:`CacheError` naming the
    item (``what`` says which corpus: "held-out sequence")."""
    if isinstance(dataset, TokenRows):
        if length is None or dataset.length == length:
            return dataset
        if dataset.length > length:
            raise CacheError(f"{what} rows have {dataset.length} tokens, longer than the declared length {length}")
        extra = (0, length - dataset.length)
        pad = torch.nn.functional.pad
        return TokenRows(pad(dataset.tokens, extra), pad(dataset.loss_mask, extra), info=dataset.info,
                         tokenizer=dataset.tokenizer, packing=dataset.packing)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise CacheError(f"the {what} corpus is empty: no token sequences to cache")
    ids, masks = [], []
    for i in range(n):
        item = dataset[i]
        if not is_sequence_item(item):
            raise CacheError(f"{what} item {i} is a {type(item).__name__}, not a 1-D integer tensor or a mapping "
                             "with 'input_ids'")
        raw = item["input_ids"] if isinstance(item, Mapping) else item
        row = torch.as_tensor(np.asarray(raw)).reshape(-1)
        mask = torch.as_tensor(np.asarray(item["loss_mask"])).reshape(-1) if isinstance(item, Mapping) and \
            item.get("loss_mask") is not None else torch.ones_like(row)
        if mask.shape != row.shape:
            raise CacheError(f"{what} item {i}: loss_mask has {len(mask)} entries for {len(row)} tokens")
        ids.append(row.to(torch.int64))
        masks.append(mask.to(torch.uint8))
    longest = max(len(r) for r in ids)
    width = longest if length is None else length
    if longest > width:
        i = next(k for k, r in enumerate(ids) if len(r) > width)
        raise CacheError(f"{what} item {i} has {len(ids[i])} tokens, longer than the declared length {width}")
    tokens = torch.zeros(n, width, dtype=torch.int64)
    mask = torch.zeros(n, width, dtype=torch.uint8)
    for i, (r, m) in enumerate(zip(ids, masks)):
        tokens[i, : len(r)], mask[i, : len(r)] = r, m
    return TokenRows(tokens, mask, info=getattr(dataset, "info", None), tokenizer=getattr(dataset, "tokenizer", None),
                     packing=getattr(dataset, "packing", None) or {"method": "as-given"})


def check_ids(tokens: torch.Tensor, vocab_size: int, what: str = "token ids") -> None:
    """Every id within ``[0, vocab_size)``; else a one-line error naming the first bad row."""
    bad = ((tokens < 0) | (tokens >= vocab_size)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        row = int(bad[0])
        value = tokens[row][(tokens[row] < 0) | (tokens[row] >= vocab_size)][0]
        raise CacheError(f"{what}: row {row} holds id {int(value)}, outside the vocabulary [0, {vocab_size})"
                         f"{f' ({len(bad)} rows in all)' if len(bad) > 1 else ''}")


def pack_documents(documents: Sequence[np.ndarray], length: int, separator: int | None) -> np.ndarray:
    """Documents (1-D id arrays) joined end to end, each followed by ``separator`` when given,
    and cut into rows of ``length`` tokens; the last partial row is dropped. Rows cross document
    boundaries, as in GPT-style pretraining: nothing is padded, every position counts."""
    if length < 2:
        raise UsageError(f"sequence length must be at least 2, not {length}")
    parts: list[np.ndarray] = []
    for doc in documents:
        parts.append(np.asarray(doc, dtype=np.int64))
        if separator is not None:
            parts.append(np.asarray([separator], dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rows = len(stream) // length
    return stream[: rows * length].reshape(rows, length)


def next_token_targets(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets per position: the next token where position ``t`` counts and ``t + 1``
    is a real token of the row, else -1 (ignored). ``(B, L)`` int64."""
    targets = torch.full_like(tokens, -1, dtype=torch.int64)
    keep = (loss_mask[:, :-1] > 0) & (loss_mask[:, 1:] > 0)
    targets[:, :-1] = torch.where(keep, tokens[:, 1:].to(torch.int64), -1)
    return targets
