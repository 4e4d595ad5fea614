"""Stage 2 loader beyond RAM: chunk-shuffled streaming.

Random rows from a chunked store cost a chunk decode each (256 random rows touch nearly every
chunk), so batches are never fancy-indexed from the store. Two modes remain:

``memory``
    soft labels read whole-chunk into one tensor, batches are tensor indexing
    (:class:`~softcache.student.loaders.MemoryLoader`); ``open_loader`` there picks the mode.
``stream``
    for caches larger than RAM (:class:`StreamLoader`), of either row kind. Per epoch the chunk
    order is shuffled; chunks are taken ``buffer_chunks`` at a time, each group decoded once
    (adjacent chunks in one read), its rows shuffled inside the group, and cut into batches. Rows
    left over at the end of a group start the next batch, so every row is served exactly once per
    epoch and every batch but the last is full.

Shuffle quality: in ``stream`` mode a batch draws from at most ``buffer_chunks`` chunks (plus a
few rows carried over from the previous group) instead of from the whole cache. That is a
uniform shuffle when ``buffer_chunks`` covers every chunk, and close to one whenever the rows of
a chunk are not correlated (the build writes rows in dataset order, so a dataset sorted by class
wants a bigger buffer). Larger buffers cost memory, not speed: each chunk is decoded once per
epoch either way.

A sample cache under compact storage (``topk:K`` or ``sample:N``) streams its values, ``soft_ids``
(and top-k's ``soft_rest``) as stored, each row showing the same view of all of them, and its
batches carry the same :class:`~softcache.student._batch.TopK` as the in-RAM loader's.

Token rows (a ``sequence`` cache) stream the same way: a row carries its tokens ``(L,)``, loss
mask ``(L,)`` and soft labels ``(L, W)``, with ``soft_ids`` ``(L, K)`` and ``soft_rest`` ``(L,)``
for top-k storage (``soft_ids`` alone for sampled counts); every position is kept (no view is picked) and batches are the ones
:class:`~softcache.student.sequence.SequenceLoader` makes (``_batch.token_batch``). Shuffle
quality matters more here: a chunk holds few rows of many tokens, and a buffer of a few chunks
gives an epoch's batches less variety than a shuffle of every row (measured on a 100-row cache
of 7 chunks, 5 seeds: students 0.05 bits per token worse with 2 chunks per group, 0.01 with 4).

Memory bound of ``stream`` mode: with ``G = buffer_chunks * chunk_rows * B``, ``B`` the stored
bytes of one row summed over every streamed array (a sample cache: ``V * C * itemsize`` of soft
labels, or under compact storage ``V * (K * (itemsize + id_itemsize) + 4)`` for top-k and
``V * K * (1 + id_itemsize)`` for sampled counts, plus its stored inputs when those are
streamed; a token row: ``L * (4 + 1 + W * itemsize)``
plus ``L * (K * id_itemsize + 4)`` for top-k, ``L * K * id_itemsize`` for sampled counts), at most ``(1 + readers + in_flight) * G`` plus one chunk
being decoded per reader: the group being cut into batches, the group being read by each of the
``readers`` (``max(1, workers)``), and ``in_flight`` groups read ahead (``prefetch``, times
``workers`` with workers). Chunks are decoded straight into the group's array, and the shuffle
is an index, so there is no second copy. The bound does not grow with the cache. A sample
cache's labels (8 bytes per row) and inputs given as a tensor stay in RAM; token rows keep
nothing per row outside the groups (their targets follow from the tokens).
:meth:`StreamLoader.memory_bound` computes it.

Determinism: the batches of an epoch depend only on (seed, epoch, rank, world size,
buffer_chunks, batch_size), not on the number of workers: groups are assigned to workers
round-robin and come back in the same round-robin order.

Workers: groups are read in ``DataLoader`` worker processes (``workers > 0``) that open the
store lazily, once per process, so nothing opened in the parent crosses a process boundary.
``fork`` (the Linux default before Python 3.14) is fast and works: zarr resets its I/O event
loop in a forked child and the store is reopened there; prefer ``spawn`` or ``forkserver`` when
the parent holds CUDA or other threads that must not be forked. Workers are started once per
training run, not per epoch: they stream epoch after epoch.

Ranks: each epoch's shuffled chunk order is dealt round-robin to ``world_size`` ranks, so ranks
read disjoint chunks whose union is the whole cache. Rank row counts then differ by up to one
chunk; ``even_batches=True`` cuts every rank to the smallest rank's batch count (lockstep for
data-parallel training, at the cost of a few rows per epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache.cache import layout, store
from softcache.cache.manifest import Manifest
from softcache.cache.store import Cache, Split
from softcache.errors import CacheError, UsageError
from softcache.student._batch import Batch, distributed_rank, stored_soft, token_batch, views_of
from softcache.student._chunks import BufferStream, ChunkSource, Piece, RowBuffer
from softcache.student._prefetch import Prefetcher

DEFAULT_BUFFER_CHUNKS = 4


def _as_is(item: RowBuffer) -> RowBuffer:
    return item


def _row_bytes(array: Any) -> int:
    return int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def token_arrays(manifest: Manifest) -> tuple[str, ...]:
    """The arrays a token row is served from: tokens, loss mask and soft labels, with the kept
    ids (and the leftover mass under top-k storage; see ``layout.soft_arrays``)."""
    return (layout.TOKENS, layout.LOSS_MASK, *layout.soft_arrays(manifest))


def data_parallel(batch_size: int, world_size: int) -> tuple[int, bool]:
    """A stream's batch size per rank and its ``even_batches`` when ``batch_size`` is the global
    batch of ``world_size`` data-parallel ranks: each rank cuts its share from its own chunks, and
    all stop at the smallest rank's batch count, so every rank takes the same number of steps."""
    return (max(1, batch_size // world_size), True) if world_size > 1 else (batch_size, False)


@dataclass(frozen=True)
class StreamOptions:
    """How a stream is cut and spread: which split, the shuffle, the read-ahead, the workers and
    ranks. Every field has the value one process on one split wants; ``StreamLoader`` takes them
    as keywords too (``StreamLoader(cache, batch_size=64, workers=2)``)."""

    split: str = "train"
    shuffle_seed: int = 0
    buffer_chunks: int = DEFAULT_BUFFER_CHUNKS
    device: torch.device | str = "cpu"
    shuffle: bool = True
    workers: int = 0
    start_method: str | None = None
    prefetch: int | None = None
    rank: int | None = None
    world_size: int | None = None
    even_batches: bool = False

    @classmethod
    def of(cls, options: StreamOptions | None, fields: dict[str, Any]) -> StreamOptions:
        """``options`` with ``fields`` replacing some of them; an unknown name is a one-line usage error."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"unknown stream option(s) {', '.join(unknown)}")
        return dataclasses.replace(options or cls(), **fields)


class StreamLoader:
    """Chunk-shuffled batches from a cache larger than RAM; yields the same :class:`Batch` as
    :class:`MemoryLoader`, with view ``views_of(row, epoch, V)`` like it, or for a ``sequence``
    cache the same token batches as :class:`~softcache.student.sequence.SequenceLoader` (which
    take everything from the cache: no ``inputs``, ``labels`` or ``replay``).

    ``split`` is ``train`` or ``eval``. ``inputs`` (a tensor in RAM, row-aligned with the split)
    are indexed by row; with ``inputs=None`` the cache's stored inputs are streamed with the soft
    labels. ``labels``
    default to the cache's (read once: 8 bytes per row). ``prefetch`` groups are read ahead by a
    background thread (``workers=0``) or per worker; by default 1 for remote stores, whose reads
    wait on the network, and 0 for local ones, whose reads are CPU work that a thread would only
    move onto a core the training step or other jobs are using. ``rank``/``world_size`` default to
    ``torch.distributed`` when it is initialised. Call :meth:`close` (or use ``with``) to stop
    background reading early; otherwise it stops when the loader is garbage-collected.
    """

    def __init__(self, cache: Cache | str, *, batch_size: int, inputs: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None,
                 replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 options: StreamOptions | None = None, **fields: Any):
        o = StreamOptions.of(options, fields)
        split, shuffle_seed, buffer_chunks, device, shuffle = o.split, o.shuffle_seed, o.buffer_chunks, o.device, o.shuffle
        workers, start_method, prefetch, rank, world_size = o.workers, o.start_method, o.prefetch, o.rank, o.world_size
        even_batches = o.even_batches
        if batch_size < 1 or buffer_chunks < 1 or workers < 0 or (prefetch is not None and prefetch < 0):
            raise UsageError("batch_size and buffer_chunks must be at least 1; workers and prefetch at least 0")
        opened = cache if isinstance(cache, Cache) else store.open_cache(cache)
        chosen = opened.train if split == "train" else opened.eval
        if chosen is None:
            raise CacheError(f"{opened.url}: no {split!r} split")
        split_data: Split = chosen
        default_rank, default_world = distributed_rank()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in [0, {world_size})")
        soft = split_data.array(layout.SOFT)
        rows, views = int(soft.shape[0]), int(soft.shape[1])
        self.sequence = opened.manifest.kind == "sequence"
        self.device = torch.device(device)
        self._split = split_data
        if self.sequence:
            if inputs is not None or labels is not None or replay is not None:
                raise UsageError("token rows are served from the cache alone: pass no inputs, labels or replay")
            names, viewed = token_arrays(opened.manifest), ()
        else:
            if inputs is None and not split_data.has_inputs:
                raise CacheError(f"cache split {split!r} has no stored inputs; pass the inputs")
            if inputs is not None and len(inputs) != rows:
                raise CacheError(f"{len(inputs)} inputs but {rows} cached rows")
            viewed = layout.soft_arrays(opened.manifest)  # compact storage: values, ids (and leftover) alike
            names = (*viewed, *((layout.INPUTS,) if inputs is None else ()))
        self.inputs = inputs.to(self.device) if inputs is not None else None
        self.replay = replay.to(self.device) if hasattr(replay, "to") else replay  # type: ignore[union-attr]
        self.views = views
        self.labels = None if self.sequence else \
            (labels if labels is not None else torch.from_numpy(split_data.labels())).to(self.device)
        if prefetch is None:
            prefetch = 2 if workers else int(_is_remote(opened.url))
        self.batch_size, self.workers, self.start_method, self.prefetch = batch_size, workers, start_method, prefetch
        self.even_batches = even_batches
        self.source = ChunkSource(opened.url, split, rows=rows, chunk_rows=int(soft.chunks[0]), names=names,
                                  viewed=viewed, views=views, seed=shuffle_seed, rank=rank,
                                  world_size=world_size, buffer_chunks=buffer_chunks, shuffle=shuffle)
        self._row_bytes = sum(_row_bytes(split_data.array(name)) for name in names)
        self._stream: Iterator[RowBuffer] | None = None
        self._stream_epoch: int | None = None

    @property
    def rows(self) -> int:
        return self.source.rows

    def buffer_bytes(self) -> int:
        """Bytes of one decoded group (every streamed array, every view): the unit of the memory
        bound."""
        return self.source.buffer_chunks * self.source.chunk_rows * self._row_bytes

    def memory_bound(self) -> int:
        """Upper bound of the bytes this loader's groups occupy at once (see the module docs)."""
        readers = max(1, self.workers)
        in_flight = self.prefetch * readers
        chunk = self.buffer_bytes() // self.source.buffer_chunks
        return (1 + readers + in_flight) * self.buffer_bytes() + readers * chunk

    def batches_in(self, epoch: int) -> int:
        """Batches this rank yields in ``epoch`` (exact)."""
        count = -(-self.source.rank_rows(epoch) // self.batch_size)
        if self.even_batches:
            count = min(self.source.rank_rows(epoch, r) // self.batch_size for r in range(self.source.world_size))
        return count

    def __len__(self) -> int:
        return self.batches_in(0)

    def probe(self) -> torch.Tensor:
        """Two rows of inputs (token ids for token rows), to check a student's output shape before
        training."""
        if self.inputs is not None:
            return self.inputs[:2]
        name = layout.TOKENS if self.sequence else layout.INPUTS
        first = torch.from_numpy(np.ascontiguousarray(self._split.read(name, slice(0, 2))))
        return first.to(torch.int64) if self.sequence else first

    def blocks(self, *names: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Streamed arrays in storage order, ``(first_row, {name: values})``, one group of chunks
        at a time in this process: a pass over the store within the loader's memory bound."""
        return self.source.blocks(names)

    def soft_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """The stored soft labels (and a top-k cache's leftover mass) in ``(first_row, values)``
        blocks, for :func:`~softcache.student._checks.nonfinite_rows`: one extra read of those
        arrays, within the loader's memory bound."""
        names = tuple(name for name in (layout.SOFT, layout.SOFT_REST) if name in self.source.names)
        for start, block in self.blocks(*names):
            for name in names:
                yield start, block[name]

    def id_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """The class (or token) ids of compact storage, as stored, in ``(first_row, ids)`` blocks
        (none for full storage): one extra read of that array, within the loader's memory bound."""
        if layout.SOFT_IDS in self.source.names:
            for start, block in self.blocks(layout.SOFT_IDS):
                yield start, block[layout.SOFT_IDS]

    def _stream_at(self, epoch: int) -> Iterator[RowBuffer]:
        if self._stream is not None and self._stream_epoch == epoch:
            return self._stream
        self.close()
        dataset = BufferStream(self.source, epoch)
        if self.workers > 0:
            stream: Iterator[RowBuffer] = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                multiprocessing_context=self.start_method, prefetch_factor=max(1, self.prefetch)))
        elif self.prefetch > 0:
            stream = Prefetcher(iter(dataset), self.prefetch)
        else:
            stream = iter(dataset)
        self._stream, self._stream_epoch = stream, epoch
        return stream

    def close(self) -> None:
        """Stop background reading (threads or worker processes)."""
        stream, self._stream, self._stream_epoch = self._stream, None, None
        if isinstance(stream, Prefetcher):
            stream.close()
        elif stream is not None and hasattr(stream, "_shutdown_workers"):
            stream._shutdown_workers()  # type: ignore[attr-defined]

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch``; consecutive epochs continue one background stream."""
        stream = self._stream_at(epoch)
        groups = len(self.source.groups(epoch))
        per_epoch = -(-groups // self.workers) * self.workers if self.workers > 0 else groups
        limit = self.batches_in(epoch) if self.even_batches else None
        finished = False
        try:
            yield from self._cut(stream, epoch, per_epoch, limit)
            finished = True
        finally:
            if finished:
                self._stream_epoch = epoch + 1
            else:  # abandoned mid-epoch: the stream is somewhere inside this epoch
                self.close()

    def _cut(self, stream: Iterator[RowBuffer], epoch: int, buffers: int, limit: int | None) -> Iterator[Batch]:
        """Cut the epoch's groups into batches; a batch may span the end of one group and the
        start of the next, so only the epoch's last batch can be short."""
        size, served = self.batch_size, 0
        carry: list[Piece] = []
        carried = 0
        for _ in range(buffers):
            buf = next(stream)
            if buf.epoch != epoch:
                raise RuntimeError(f"stream out of step: expected epoch {epoch}, got {buf.epoch}")
            at, length = 0, len(buf)
            while at < length:
                take = min(size - carried, length - at)
                carry.append(buf.piece(at, at + take))
                carried += take
                at += take
                if carried == size:
                    if limit is not None and served >= limit:
                        return
                    yield self._batch(Piece.join(carry), epoch)
                    served += 1
                    carry, carried = [], 0
            del buf  # the group is released before the next one is read
        if carried and (limit is None or served < limit):
            yield self._batch(Piece.join(carry), epoch)

    def _batch(self, piece: Piece, epoch: int) -> Batch:
        arrays = piece.arrays
        if self.sequence:
            return token_batch(piece.rows, arrays[layout.TOKENS], arrays[layout.LOSS_MASK], arrays[layout.SOFT],
                               arrays.get(layout.SOFT_IDS), arrays.get(layout.SOFT_REST), self.device)
        rows = piece.rows.to(self.device)
        if self.replay is not None:
            view = views_of(rows, epoch, self.views) if self.views > 1 else torch.zeros_like(rows)
            inputs = self.replay(rows, view)
        elif self.inputs is not None:
            inputs = self.inputs.index_select(0, rows)
        else:
            inputs = arrays[layout.INPUTS].to(self.device)
        soft = stored_soft(arrays[layout.SOFT], arrays.get(layout.SOFT_IDS), arrays.get(layout.SOFT_REST), self.device)
        return Batch(rows=rows, inputs=inputs, soft=soft, labels=self.labels.index_select(0, rows))  # type: ignore[union-attr]
