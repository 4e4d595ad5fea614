"""The epoch plan of the streaming loader and the reading of chunk groups: which chunks a rank
reads in an epoch, in which groups, and how a group is decoded (each chunk of each streamed array
once, straight into one array per name) and shuffled. A row is whatever named arrays the loader
streams (a sample's soft labels and maybe inputs, a token row's tokens, mask and soft labels), so
one code path serves both row kinds. Picklable, so ``DataLoader`` workers read groups in other
processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from zarr.buffer.cpu import NDBuffer

from softcache.cache import store
from softcache.student._batch import views_of

_SEED_TAG = 0x50F7CA


def epoch_groups(num_chunks: int, *, seed: int, epoch: int, rank: int, world_size: int,
                 buffer_chunks: int, shuffle: bool) -> list[np.ndarray]:
    """The chunk groups rank ``rank`` reads in ``epoch``, in order (each group sorted so that
    adjacent chunks are read together)."""
    if shuffle:
        order = np.random.default_rng([_SEED_TAG, seed, epoch]).permutation(num_chunks)
    else:
        order = np.arange(num_chunks)
    mine = order[rank::world_size]
    return [np.sort(mine[i : i + buffer_chunks]) for i in range(0, len(mine), buffer_chunks)]


def chunk_runs(chunks: np.ndarray, chunk_rows: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges covering sorted ``chunks``, adjacent chunks merged into one range."""
    runs: list[tuple[int, int]] = []
    for c in chunks.tolist():
        start, stop = c * chunk_rows, min((c + 1) * chunk_rows, rows)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs


@dataclass
class RowBuffer:
    """One decoded group of chunks, rows in storage order: row ids, the streamed arrays by name
    (each ``(n, ...)`` in its stored dtype; a sample cache's soft labels already show the view
    this epoch shows), and the shuffled ``order`` in which the rows are served (None: storage
    order). Keeping the order apart, instead of permuting the arrays, saves a copy of the group."""

    epoch: int
    index: int
    rows: torch.Tensor
    arrays: dict[str, torch.Tensor]
    order: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.rows)

    def piece(self, start: int, stop: int) -> Piece:
        """Served rows ``start:stop`` (positions in the shuffled order), gathered."""
        if self.order is None:
            return Piece(self.rows[start:stop], {name: values[start:stop] for name, values in self.arrays.items()})
        sel = self.order[start:stop]  # index_select: a third of tensor indexing's per-call cost at small batches
        return Piece(self.rows.index_select(0, sel),
                     {name: values.index_select(0, sel) for name, values in self.arrays.items()})


@dataclass
class Piece:
    """Rows of one batch, or of the part of a batch taken from one group: row ids and the
    streamed arrays by name."""

    rows: torch.Tensor
    arrays: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def join(parts: list[Piece]) -> Piece:
        if len(parts) == 1:
            return parts[0]
        return Piece(torch.cat([p.rows for p in parts]),
                     {name: torch.cat([p.arrays[name] for p in parts]) for name in parts[0].arrays})


def read_rows(array: Any, runs: list[tuple[int, int]]) -> np.ndarray:
    """Rows of ``runs`` of a zarr array, decoded straight into one preallocated array (zarr's
    ``out=``), so a group costs its own size plus one chunk in flight, not two copies."""
    total = sum(b - a for a, b in runs)
    out = np.empty((total, *array.shape[1:]), dtype=array.dtype)
    at = 0
    for a, b in runs:
        array.get_basic_selection(slice(a, b), out=NDBuffer.from_numpy_array(out[at : at + b - a]))
        at += b - a
    return out


class ChunkSource:
    """Reads chunk groups of one split: the arrays named ``names`` (layout names, every one
    chunked by the same rows), row for row. The arrays in ``viewed`` have a view axis second
    (``views`` views, a sample cache's soft labels) and show one view per row and epoch; the
    others are served whole (a token row keeps every position). Picklable: the store is opened
    lazily in each process."""

    def __init__(self, url: str, split: str, *, rows: int, chunk_rows: int, names: tuple[str, ...],
                 viewed: tuple[str, ...] = (), views: int = 1, seed: int, rank: int, world_size: int,
                 buffer_chunks: int, shuffle: bool):
        self.url, self.split, self.rows, self.chunk_rows = url, split, rows, chunk_rows
        self.names, self.viewed, self.views = names, viewed, views
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer_chunks, self.shuffle = buffer_chunks, shuffle
        self.num_chunks = -(-rows // chunk_rows)
        self._arrays: dict[str, Any] | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1
        return state

    def _open(self) -> dict[str, Any]:
        if self._arrays is None or self._pid != os.getpid():
            group = store.open_group(self.url, "r")
            if self.split != "train":
                group = group[self.split]
            self._arrays = {name: group[name] for name in self.names}
            self._pid = os.getpid()
        return self._arrays

    def groups(self, epoch: int, rank: int | None = None) -> list[np.ndarray]:
        return epoch_groups(self.num_chunks, seed=self.seed, epoch=epoch, rank=self.rank if rank is None else rank,
                            world_size=self.world_size, buffer_chunks=self.buffer_chunks, shuffle=self.shuffle)

    def rank_rows(self, epoch: int, rank: int | None = None) -> int:
        return sum(b - a for g in self.groups(epoch, rank) for a, b in chunk_runs(g, self.chunk_rows, self.rows))

    def read(self, epoch: int, index: int, chunks: np.ndarray) -> RowBuffer:
        """Decode the chunks of one group (each once), pick this epoch's view, draw the row order."""
        arrays = self._open()
        runs = chunk_runs(chunks, self.chunk_rows, self.rows)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])
        decoded: dict[str, torch.Tensor] = {}
        for name, array in arrays.items():
            values = read_rows(array, runs)
            if name in self.viewed:
                values = values[np.arange(len(rows)), views_of(rows, epoch, self.views)] if self.views > 1 \
                    else values[:, 0]
            decoded[name] = torch.from_numpy(values)
        order = None
        if self.shuffle:
            perm = np.random.default_rng([_SEED_TAG, self.seed, epoch, self.rank, index]).permutation(len(rows))
            order = torch.from_numpy(perm)
        return RowBuffer(epoch, index, torch.from_numpy(rows), decoded, order)

    def blocks(self, names: tuple[str, ...]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """The arrays ``names`` (every view), ``(first_row, {name: values})`` in storage order,
        ``buffer_chunks`` chunks at a time: a pass over the whole store that holds one group of
        those arrays at a time, whatever the cache's size."""
        arrays = self._open()
        step = self.buffer_chunks
        for first in range(0, self.num_chunks, step):
            runs = chunk_runs(np.arange(first, min(first + step, self.num_chunks)), self.chunk_rows, self.rows)
            yield runs[0][0], {name: read_rows(arrays[name], runs) for name in names}

    def empty(self, epoch: int, index: int) -> RowBuffer:
        return RowBuffer(epoch, index, torch.zeros(0, dtype=torch.int64), {}, None)


class BufferStream(IterableDataset):
    """Every epoch from ``start_epoch`` on, as a stream of :class:`RowBuffer`.

    In worker ``w`` of ``n`` it yields groups ``w, w + n, ...`` and pads with empty buffers so that
    every worker yields the same number per epoch: the DataLoader's round-robin then returns the
    groups in plan order, whatever ``n`` is.
    """

    def __init__(self, source: ChunkSource, start_epoch: int):
        self.source, self.start_epoch = source, start_epoch

    def __iter__(self) -> Iterator[RowBuffer]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch
        while True:
            groups = self.source.groups(epoch)
            for j in range(-(-len(groups) // workers)):
                index = j * workers + worker
                if index < len(groups):
                    yield self.source.read(epoch, index, groups[index])
                else:
                    yield self.source.empty(epoch, index)
            epoch += 1
