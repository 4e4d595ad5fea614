"""Stage 2 loaders beyond RAM: chunk-shuffled streaming, and the automatic choice of loader.

Random rows from a chunked store cost a chunk decode each (256 random rows touch nearly every
chunk), so batches are never fancy-indexed from the store. Two modes remain:

``memory``
    soft labels read whole-chunk into one tensor, batches are tensor indexing
    (:class:`~softcache.student.loaders.MemoryLoader`). Chosen by ``auto`` when they fit the memory budget.
``stream``
    for caches larger than RAM (:class:`StreamLoader`). Per epoch the chunk order is shuffled;
    chunks are taken ``buffer_chunks`` at a time, each group decoded once (adjacent chunks in
    one read), its rows shuffled inside the group, and cut into batches. Rows left over at the
    end of a group start the next batch, so every row is served exactly once per epoch and
    every batch but the last is full.

Shuffle quality: in ``stream`` mode a batch draws from at most ``buffer_chunks`` chunks (plus a
few rows carried over from the previous group) instead of from the whole cache. That is a
uniform shuffle when ``buffer_chunks`` covers every chunk, and close to one whenever the rows of
a chunk are not correlated (the build writes rows in dataset order, so a dataset sorted by class
wants a bigger buffer). Larger buffers cost memory, not speed: each chunk is decoded once per
epoch either way.

Memory bound of ``stream`` mode: with ``G = buffer_chunks * chunk_rows * V * C * itemsize``
(plus the same for streamed inputs), at most ``(1 + readers + in_flight) * G`` plus one chunk
being decoded per reader: the group being cut into batches, the group being read by each of the
``readers`` (``max(1, workers)``), and ``in_flight`` groups read ahead (``prefetch``, times
``workers`` with workers). Chunks are decoded straight into the group's array, and the shuffle
is an index, so there is no second copy. The bound does not grow with the cache. Labels (8 bytes
per row) and inputs given as a tensor stay in RAM. :meth:`StreamLoader.memory_bound` computes it.

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

import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from zarr.buffer.cpu import NDBuffer

from softcache.cache import store
from softcache.errors import CacheError, UsageError
from softcache.student.loaders import Batch, MemoryLoader, views_of
from softcache.cache.store import Cache, Split

LoaderMode = Literal["auto", "memory", "stream"]
DEFAULT_BUFFER_CHUNKS = 4
MEMORY_BUDGET_ENV = "SOFTCACHE_MEMORY_BUDGET"
_SEED_TAG = 0x50F7CA


# -- sizes and the choice of mode ------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``500MB``, ``2GiB``, ``1.5g`` (decimal units, and binary with ``i``)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def default_memory_budget() -> int:
    """``$SOFTCACHE_MEMORY_BUDGET``, else the smaller of 4 GiB and half the machine's RAM.

    A fixed cap rather than "what is free now" keeps the mode, and so the batch order, the same
    from run to run on the same machine.
    """
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        return parse_size(env)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return min(4 * 2**30, ram // 2)


def memory_bytes(split: Split, *, with_inputs: bool) -> int:
    """Bytes ``memory`` mode holds for ``split``: float32 soft labels, plus stored inputs if read."""
    soft = split.array(store.SOFT)
    total = int(np.prod(soft.shape)) * 4
    if with_inputs and split.has_inputs:
        total += int(np.prod(split.array(store.INPUTS).shape)) * 4
    return total


def choose_mode(split: Split, mode: LoaderMode = "auto", memory_budget: int | str | None = None,
                *, with_inputs: bool = False) -> Literal["memory", "stream"]:
    """``memory`` when the soft labels (and stored inputs, if they come from the cache) fit."""
    if mode not in ("auto", "memory", "stream"):
        raise UsageError(f"loader must be auto, memory or stream, not {mode!r}")
    if mode != "auto":
        return mode
    budget = default_memory_budget() if memory_budget is None else parse_size(memory_budget)
    return "memory" if memory_bytes(split, with_inputs=with_inputs) <= budget else "stream"


# -- the epoch plan --------------------------------------------------------------------------


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
    """One decoded group of chunks, rows in storage order: row ids, soft labels ``(n, C)`` in the
    stored dtype (the view this epoch shows), stored inputs when those are streamed, and the
    shuffled ``order`` in which the rows are served (None: storage order). Keeping the order
    apart, instead of permuting the arrays, saves a copy of the group."""

    epoch: int
    index: int
    rows: torch.Tensor
    soft: torch.Tensor
    inputs: torch.Tensor | None
    order: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.rows)

    def piece(self, start: int, stop: int) -> Piece:
        """Served rows ``start:stop`` (positions in the shuffled order), gathered."""
        sel: slice | torch.Tensor = slice(start, stop) if self.order is None else self.order[start:stop]
        return Piece(self.rows[sel], self.soft[sel], self.inputs[sel] if self.inputs is not None else None)


@dataclass
class Piece:
    """Rows of one batch, or of the part of a batch taken from one group."""

    rows: torch.Tensor
    soft: torch.Tensor
    inputs: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def join(parts: list[Piece]) -> Piece:
        if len(parts) == 1:
            return parts[0]
        inputs = torch.cat([p.inputs for p in parts]) if parts[0].inputs is not None else None  # type: ignore[misc]
        return Piece(torch.cat([p.rows for p in parts]), torch.cat([p.soft for p in parts]), inputs)


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
    """Reads chunk groups of one split. Picklable: the store is opened lazily in each process."""

    def __init__(self, url: str, split: str, *, rows: int, chunk_rows: int, views: int, stream_inputs: bool,
                 seed: int, rank: int, world_size: int, buffer_chunks: int, shuffle: bool):
        self.url, self.split, self.rows, self.chunk_rows, self.views = url, split, rows, chunk_rows, views
        self.stream_inputs, self.seed, self.rank, self.world_size = stream_inputs, seed, rank, world_size
        self.buffer_chunks, self.shuffle = buffer_chunks, shuffle
        self.num_chunks = -(-rows // chunk_rows)
        self._arrays: tuple[Any, Any] | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1
        return state

    def _open(self) -> tuple[Any, Any]:
        if self._arrays is None or self._pid != os.getpid():
            group = store.open_group(self.url, "r")
            if self.split != "train":
                group = group[self.split]
            self._arrays = (group[store.SOFT], group[store.INPUTS] if self.stream_inputs else None)
            self._pid = os.getpid()
        return self._arrays

    def groups(self, epoch: int, rank: int | None = None) -> list[np.ndarray]:
        return epoch_groups(self.num_chunks, seed=self.seed, epoch=epoch, rank=self.rank if rank is None else rank,
                            world_size=self.world_size, buffer_chunks=self.buffer_chunks, shuffle=self.shuffle)

    def rank_rows(self, epoch: int, rank: int | None = None) -> int:
        return sum(b - a for g in self.groups(epoch, rank) for a, b in chunk_runs(g, self.chunk_rows, self.rows))

    def read(self, epoch: int, index: int, chunks: np.ndarray) -> RowBuffer:
        """Decode the chunks of one group (each once), pick this epoch's view, draw the row order."""
        soft_arr, input_arr = self._open()
        runs = chunk_runs(chunks, self.chunk_rows, self.rows)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])
        soft = read_rows(soft_arr, runs)
        soft = soft[np.arange(len(rows)), views_of(rows, epoch, self.views)] if self.views > 1 else soft[:, 0]
        inputs = torch.from_numpy(read_rows(input_arr, runs)) if input_arr is not None else None
        order = None
        if self.shuffle:
            perm = np.random.default_rng([_SEED_TAG, self.seed, epoch, self.rank, index]).permutation(len(rows))
            order = torch.from_numpy(perm)
        return RowBuffer(epoch, index, torch.from_numpy(rows), torch.from_numpy(soft), inputs, order)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every row, every view, in storage order, ``buffer_chunks`` chunks at a time: a pass
        over the whole store that holds one group at a time, whatever the cache's size."""
        soft_arr, _ = self._open()
        step = self.buffer_chunks
        for first in range(0, self.num_chunks, step):
            runs = chunk_runs(np.arange(first, min(first + step, self.num_chunks)), self.chunk_rows, self.rows)
            yield runs[0][0], read_rows(soft_arr, runs)

    def empty(self, epoch: int, index: int) -> RowBuffer:
        return RowBuffer(epoch, index, torch.zeros(0, dtype=torch.int64), torch.zeros(0), None, None)


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


def _as_is(item: RowBuffer) -> RowBuffer:
    return item


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead; errors re-raised in order.

    Reading the store overlaps with training (zarr decoding and file reads release the GIL).
    The thread stops when :meth:`close` is called or the prefetcher is garbage-collected.
    """

    _DONE = object()

    def __init__(self, source: Iterator[Any], depth: int):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, self._queue, self._stop),
                                        name="softcache-prefetch", daemon=True)
        self._thread.start()

    @staticmethod
    def _run(source: Iterator[Any], out: queue.Queue[Any], stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():  # checked before each read, so close() never waits for an extra one
                try:
                    item = next(source)
                except StopIteration:
                    put(Prefetcher._DONE)
                    return
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is Prefetcher._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and wait for the read in progress, so no read outlives the loader."""
        self._stop.set()
        while True:  # free a slot so a thread blocked on a full queue sees the stop at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def __del__(self) -> None:
        self._stop.set()


def _row_bytes(array: Any) -> int:
    return int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamLoader:
    """Chunk-shuffled batches from a cache larger than RAM; yields the same :class:`Batch` as
    :class:`MemoryLoader`, with view ``views_of(row, epoch, V)`` like it.

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

    def __init__(self, cache: Cache | str, *, split: str = "train", inputs: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, batch_size: int, shuffle_seed: int = 0,
                 buffer_chunks: int = DEFAULT_BUFFER_CHUNKS, device: torch.device | str = "cpu", shuffle: bool = True,
                 workers: int = 0, start_method: str | None = None, prefetch: int | None = None, rank: int | None = None,
                 world_size: int | None = None, even_batches: bool = False,
                 replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if batch_size < 1 or buffer_chunks < 1 or workers < 0 or (prefetch is not None and prefetch < 0):
            raise UsageError("batch_size and buffer_chunks must be at least 1; workers and prefetch at least 0")
        opened = cache if isinstance(cache, Cache) else store.open_cache(cache)
        chosen = opened.train if split == "train" else opened.eval
        if chosen is None:
            raise CacheError(f"{opened.url}: no {split!r} split")
        split_data: Split = chosen
        default_rank, default_world = _distributed_rank()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in [0, {world_size})")
        soft = split_data.array(store.SOFT)
        rows, views = int(soft.shape[0]), int(soft.shape[1])
        if inputs is None and not split_data.has_inputs:
            raise CacheError(f"cache split {split!r} has no stored inputs; pass the inputs")
        if inputs is not None and len(inputs) != rows:
            raise CacheError(f"{len(inputs)} inputs but {rows} cached rows")
        self.device = torch.device(device)
        self.inputs = inputs.to(self.device) if inputs is not None else None
        self.replay = replay.to(self.device) if hasattr(replay, "to") else replay  # type: ignore[union-attr]
        self.views = views
        self.labels = (labels if labels is not None else torch.from_numpy(split_data.labels())).to(self.device)
        if prefetch is None:
            prefetch = 2 if workers else int(_is_remote(opened.url))
        self.batch_size, self.workers, self.start_method, self.prefetch = batch_size, workers, start_method, prefetch
        self.even_batches = even_batches
        self.source = ChunkSource(opened.url, split, rows=rows, chunk_rows=int(soft.chunks[0]),
                                  views=views, stream_inputs=inputs is None, seed=shuffle_seed, rank=rank,
                                  world_size=world_size, buffer_chunks=buffer_chunks, shuffle=shuffle)
        self._row_bytes = _row_bytes(soft) + (_row_bytes(split_data.array(store.INPUTS)) if inputs is None else 0)
        self._stream: Iterator[RowBuffer] | None = None
        self._stream_epoch: int | None = None

    @property
    def rows(self) -> int:
        return self.source.rows

    def buffer_bytes(self) -> int:
        """Bytes of one decoded group (every view): the unit of the memory bound."""
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

    def soft_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """The stored soft labels in ``(first_row, values)`` blocks, for
        :func:`~softcache.student.loaders.nonfinite_rows`: one extra read of the store, within the
        loader's memory bound (one group at a time, in this process)."""
        return self.source.blocks()

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
            at = 0
            while at < len(buf):
                take = min(size - carried, len(buf) - at)
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
        rows = piece.rows.to(self.device)
        if self.replay is not None:
            view = views_of(rows, epoch, self.views) if self.views > 1 else torch.zeros_like(rows)
            inputs = self.replay(rows, view)
        elif self.inputs is not None:
            inputs = self.inputs[rows]
        else:
            inputs = piece.inputs.to(self.device)  # type: ignore[union-attr]
        return Batch(rows=rows, inputs=inputs, soft=piece.soft.to(self.device, torch.float32), labels=self.labels[rows])


# -- one entry point for stage 2 -------------------------------------------------------------


def open_loader(cache: Cache, *, inputs: torch.Tensor | None, batch_size: int, shuffle_seed: int = 0,
                device: torch.device | str = "cpu", mode: LoaderMode = "auto", memory_budget: int | str | None = None,
                buffer_chunks: int = DEFAULT_BUFFER_CHUNKS, workers: int = 0,
                start_method: str | None = None,
                replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                labels: torch.Tensor | None = None,
                ) -> MemoryLoader | StreamLoader:
    """The training split's loader in the mode asked for, or the one that fits the budget.

    ``inputs=None`` means the inputs are the ones stored in the cache: read whole in ``memory``
    mode, streamed with the soft labels in ``stream`` mode. ``replay(rows, views)`` re-creates
    augmented views from the raw inputs (``augment.cache_replay``), in either mode. ``labels``
    (one per row, -1 when unknown) replace the cache's, e.g. the labels of the user's own data.
    """
    split = cache.train
    chosen = choose_mode(split, mode, memory_budget, with_inputs=inputs is None)
    if labels is None:
        labels = torch.from_numpy(split.labels())
    elif len(labels) != split.rows:
        raise CacheError(f"{len(labels)} labels but {split.rows} cached rows")
    if chosen == "memory":
        if inputs is None:
            if not split.has_inputs:
                raise CacheError("this cache has no stored inputs; pass the training data")
            inputs = torch.from_numpy(split.inputs())
        soft = torch.from_numpy(split.soft_labels(view=None))
        return MemoryLoader(inputs, soft, labels, batch_size=batch_size, shuffle_seed=shuffle_seed, device=device,
                            replay=replay)
    return StreamLoader(cache, inputs=inputs, labels=labels, batch_size=batch_size, shuffle_seed=shuffle_seed,
                        buffer_chunks=buffer_chunks, device=device, workers=workers, start_method=start_method,
                        replay=replay)
