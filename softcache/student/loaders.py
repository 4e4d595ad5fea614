"""Stage 2 input: pairing the user's inputs with cached soft labels, row by row.

Random row access into a chunked store touches nearly every chunk per batch, so nothing here
fancy-indexes the store: soft labels are read whole-chunk into RAM and batches are tensor
indexing. Caches larger than RAM stream chunk-shuffled instead (``softcache.student.stream``), which
also chooses between the two modes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from softcache.data import check_matches
from softcache.errors import CacheError
from softcache.cache.store import Split


@dataclass
class Batch:
    rows: torch.Tensor
    inputs: torch.Tensor
    soft: torch.Tensor | None
    labels: torch.Tensor


SCAN_ROWS = 65_536
"""Rows checked at once when scanning soft labels held in RAM: bounds the scan's scratch memory
(one flag per value) without slowing it."""


@dataclass
class NonFinite:
    """Rows whose soft labels hold a NaN or an infinity: how many, and the first few."""

    count: int = 0
    first: list[int] = field(default_factory=list)


def nonfinite_rows(blocks: Iterable[tuple[int, np.ndarray | torch.Tensor]], keep: int = 5) -> NonFinite:
    """Scan ``(first_row, values)`` blocks of soft labels, a row being bad when any of its values
    (any view, any class) is not finite: such a row turns a student's loss into NaN, so a cache
    holding one must be refused before any student trains on it."""
    found = NonFinite()
    for start, values in blocks:
        block = torch.as_tensor(values)
        # quick test first: NaN and infinities propagate through a sum, which costs a fraction of
        # an element-wise test; a sum that merely overflows falls through to the exact test
        if bool(block.sum(dtype=torch.float32 if block.dtype == torch.float16 else None).isfinite()):
            continue
        bad = (~block.reshape(len(block), -1).isfinite().all(1)).nonzero().flatten()
        found.count += len(bad)
        if len(found.first) < keep:
            found.first.extend((bad[: keep - len(found.first)] + start).tolist())
    return found


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a function of (seed, epoch) only, so runs and workers agree."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


class MemoryLoader:
    """All inputs and soft labels held as tensors; each epoch is a seeded shuffle.

    ``soft`` is ``(N, V, C)``; epoch ``e`` shows row ``r`` through view ``(r + e) % V`` so
    every stored view is used in turn (with one view this is always view 0). With ``replay``
    (augmented views, see ``augment.ViewReplay``) the batch's inputs are that same view re-created
    from the raw inputs, so inputs and soft labels always belong to one view.
    """

    def __init__(self, inputs: torch.Tensor, soft: torch.Tensor | None, labels: torch.Tensor, *,
                 batch_size: int, shuffle_seed: int = 0, device: torch.device | str = "cpu", shuffle: bool = True,
                 replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if soft is not None and len(soft) != len(inputs):
            raise CacheError(f"{len(inputs)} inputs but {len(soft)} cached rows")
        self.device = torch.device(device)
        self.replay = replay.to(self.device) if hasattr(replay, "to") else replay  # type: ignore[union-attr]
        self.inputs = inputs.to(self.device)
        self.soft = soft.to(self.device) if soft is not None else None
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle_seed, self.shuffle = batch_size, shuffle_seed, shuffle

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def soft_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The soft labels in ``(first_row, values)`` blocks, for :func:`nonfinite_rows`."""
        if self.soft is not None:
            for start in range(0, len(self.soft), SCAN_ROWS):
                yield start, self.soft[start : start + SCAN_ROWS]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        n = len(self.inputs)
        order = epoch_permutation(n, self.shuffle_seed, epoch) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        views = self.soft.shape[1] if self.soft is not None else 1
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            view = views_of(rows, epoch, views) if views > 1 else torch.zeros_like(rows)
            soft = self.soft[rows, view] if self.soft is not None else None
            inputs = self.replay(rows, view) if self.replay is not None else self.inputs[rows]
            yield Batch(rows=rows, inputs=inputs, soft=soft, labels=self.labels[rows])  # type: ignore[arg-type]


class SoftLabelDataset(Dataset):
    """A torch Dataset of ``(input, soft_labels, label)`` pairing ``dataset`` with a cache split.

    The pairing is by row position, so the dataset is checked against the length and
    fingerprint recorded at build time before anything is served. Soft labels are read once,
    whole-chunk, into memory; ``__getitems__`` serves a batch with one indexing operation.
    """

    def __init__(self, split: Split, dataset: Dataset, view: int = 0):
        source = split.manifest.source if split.name == "train" else split.manifest.eval.source  # type: ignore[union-attr]
        if source.kind != "dataset":
            raise CacheError("this cache was synthesized; its inputs are stored in the cache, not in a dataset")
        check_matches(dataset, source)
        self.dataset = dataset
        self.soft = torch.from_numpy(split.soft_labels(view=view))
        self.labels = torch.from_numpy(split.labels())

    def __len__(self) -> int:
        return len(self.soft)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return torch.as_tensor(x), self.soft[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        inputs = getattr(self.dataset, "inputs", None)
        if isinstance(inputs, torch.Tensor):
            return list(zip(inputs[idx], self.soft[idx], self.labels[idx]))
        return [self[i] for i in indices]


def views_of(rows: np.ndarray | torch.Tensor, epoch: int, views: int) -> np.ndarray | torch.Tensor:
    """Which stored view each row shows in ``epoch`` (the same rule as MemoryLoader)."""
    return (rows + epoch) % views
