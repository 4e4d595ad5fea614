"""Background writer: the teacher never waits on storage.

The producer (the teacher loop) hands over batches of rows of any size and goes straight back to
work: ``append`` only queues references. A writer thread packs the rows into whole chunks of the
array's chunk grid and writes each chunk once, so the store never does a read-modify-write of a
partial chunk.

One writer serves a whole build, shard after shard (:meth:`ChunkWriter.begin` starts the next
row range). A shard's done-flag is set by its ``on_done`` callback, which the writer thread runs
after the shard's last chunk is written: the flag never precedes the data, and the teacher moves
on to the next shard without waiting for the previous one's last write.

Two guarantees hold whatever the store does:

- memory is bounded: once ``depth`` chunks' worth of rows are queued and not yet written, the
  producer waits (back-pressure from a slow store instead of an unbounded queue);
- a write error is never lost: the thread stops, wakes a producer that is waiting, and the
  producer's next call (``append``, ``begin``, ``check`` or ``close``) raises the original
  exception.

Work that turns a producer's raw output into the stored arrays (scaling, statistics, dtype
conversion) can be handed over too, as a :class:`Deferred` block: the writer thread computes it
just before packing it, so it runs beside the producer's next batch instead of between two of
them. An error raised while computing it reaches the producer like a write error.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Block = dict[str, np.ndarray]


@dataclass(frozen=True)
class Deferred:
    """``rows`` rows whose arrays ``make()`` computes in the writer thread (see the module docs).

    ``make`` must not depend on anything the producer changes after handing it over."""

    rows: int
    make: Callable[[], Block]


def block_rows(block: Block | Deferred) -> int:
    """Rows in a block; every array of a block must have the same leading length."""
    if isinstance(block, Deferred):
        return block.rows
    lengths = {len(v) for v in block.values()}
    if len(lengths) != 1:
        raise ValueError(f"block arrays have different numbers of rows: {sorted(lengths)}")
    return lengths.pop()


@dataclass(frozen=True)
class _Range:
    rows: range
    on_done: Callable[[], None] | None


class ChunkWriter:
    """Writes row ranges through ``write(first_row, block)`` from a background thread.

    Every ``write`` call covers exactly one chunk of the grid ``[k * chunk_rows, (k + 1) *
    chunk_rows)`` clipped to the current range: whole chunks when the range starts on a chunk
    boundary (the build's shards always do), the last one possibly ending at the range's end.
    ``ChunkWriter(write, start, stop, chunk_rows)`` begins the range ``[start, stop)`` at once;
    with ``start=None`` call :meth:`begin` for each range. Appended arrays are kept by reference
    until written, so the producer must not modify them afterwards.
    """

    def __init__(self, write: Callable[[int, Block], None], start: int | None, stop: int | None, chunk_rows: int,
                 depth: int = 4):
        if chunk_rows < 1 or depth < 1:
            raise ValueError(f"chunk_rows and depth must be at least 1, not {chunk_rows} and {depth}")
        self._write, self._chunk = write, chunk_rows
        self._max_queued = depth * chunk_rows
        self._cond = threading.Condition()
        self._items: deque[Block | Deferred | _Range] = deque()
        self._range: range | None = None  # the producer's current range
        self._appended = 0  # rows of the current range handed over
        self._queued = 0  # rows handed over and not yet written
        self._closing = False
        self._aborted = False
        self._error: BaseException | None = None
        self.rows_written = 0
        self._thread = threading.Thread(target=self._run, name="softcache-writer", daemon=True)
        self._thread.start()
        if start is not None:
            self.begin(range(start, start if stop is None else stop))

    @property
    def native_id(self) -> int | None:
        """The writer thread's id in the operating system (to place it on cores)."""
        return self._thread.native_id

    # -- producer side ------------------------------------------------------------------------

    def begin(self, rows: range, on_done: Callable[[], None] | None = None) -> None:
        """Start the next range; ``on_done`` runs in the writer thread once all of it is written."""
        if rows.step != 1 or rows.stop < rows.start:
            raise ValueError(f"not a row range: {rows}")
        self._check_complete()
        with self._cond:
            self._raise_if_failed()
            self._items.append(_Range(rows, on_done))
            self._range, self._appended = rows, 0
            self._cond.notify_all()

    def append(self, block: Block | Deferred) -> None:
        """Queue the next rows (arrays, or a :class:`Deferred` computed in the writer thread);
        waits only while ``depth`` chunks are already queued."""
        n = block_rows(block)
        if self._range is None:
            raise RuntimeError("append before begin")
        if self._appended + n > len(self._range):
            raise ValueError(f"writer range [{self._range.start}, {self._range.stop}) got {self._appended + n} rows")
        with self._cond:
            while self._error is None and self._queued >= self._max_queued:
                self._cond.wait()
            self._raise_if_failed()
            if self._closing:
                raise RuntimeError("append after close")
            self._items.append(block)
            self._appended += n
            self._queued += n
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the writer thread's error, if it hit one."""
        with self._cond:
            self._raise_if_failed()

    def close(self) -> None:
        """Write what is queued, wait for the thread, and raise any error it hit."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._raise_if_failed()
        self._check_complete()

    def abort(self) -> None:
        """Stop without writing what is still queued (after an error in the producer)."""
        with self._cond:
            self._aborted = self._closing = True
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()

    def _check_complete(self) -> None:
        if self._range is not None and self._appended != len(self._range):
            raise RuntimeError(f"writer got rows up to {self._range.start + self._appended} "
                               f"but the range ends at {self._range.stop}")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        chunk: _Chunk | None = None  # the chunk being assembled from blocks smaller than it
        current: _Range | None = None
        row = 0  # first row of ``current`` not yet written
        try:
            while True:
                with self._cond:
                    while not self._items and not self._closing:
                        self._cond.wait()
                    if self._aborted or not self._items:
                        return
                    item = self._items.popleft()
                if isinstance(item, _Range):
                    current, row = item, item.rows.start
                    if not len(item.rows) and item.on_done is not None:
                        item.on_done()
                    continue
                if isinstance(item, Deferred):
                    made = item.make()
                    if block_rows(made) != item.rows:
                        raise ValueError(f"a deferred block promised {item.rows} rows but made {block_rows(made)}")
                    item = made
                assert current is not None  # ``append`` refuses rows before ``begin``
                n, offset = block_rows(item), 0
                while offset < n:
                    # rows up to the next boundary of the chunk grid, or to the end of the range
                    target = min(self._chunk - row % self._chunk, current.rows.stop - row)
                    if chunk is None and n - offset >= target:  # the block covers the chunk: no copy
                        head = item if offset == 0 and n == target else {k: v[offset : offset + target]
                                                                          for k, v in item.items()}
                        offset += target
                    else:
                        chunk = chunk or _Chunk(item, target)
                        offset += chunk.fill(item, offset)
                        if not chunk.full:
                            break
                        head, chunk = chunk.arrays, None
                    self._write(row, head)
                    row += target
                    with self._cond:
                        self.rows_written += target
                        self._queued -= target
                        self._cond.notify_all()
                    if row == current.rows.stop and current.on_done is not None:
                        current.on_done()
        except BaseException as exc:  # noqa: BLE001 - handed to the producer, raised there
            with self._cond:
                self._error = exc
                self._items.clear()
                self._cond.notify_all()


class _Chunk:
    """One chunk's rows, gathered from the blocks that hold them as each block arrives: the
    copies happen beside the producer's work, so once the last rows of a chunk arrive it is
    written at once (no concatenation of its parts between the producer's last block and the
    write). Arrays take the dtype and row shape of the chunk's first block."""

    def __init__(self, like: Block, rows: int):
        self.arrays = {k: np.empty((rows, *v.shape[1:]), dtype=v.dtype) for k, v in like.items()}
        self.rows, self.filled = rows, 0

    @property
    def full(self) -> bool:
        return self.filled == self.rows

    def fill(self, block: Block, offset: int) -> int:
        """Copy rows of ``block`` from ``offset`` until the chunk is full; returns how many."""
        if block.keys() != self.arrays.keys():
            raise ValueError(f"blocks of one chunk name different arrays: {sorted(block)} and {sorted(self.arrays)}")
        n = min(self.rows - self.filled, block_rows(block) - offset)
        for k, target in self.arrays.items():
            values = block[k]
            if values.shape[1:] != target.shape[1:] or values.dtype != target.dtype:
                raise ValueError(f"array {k!r}: a block of shape {values.shape[1:]} {values.dtype} follows "
                                 f"{target.shape[1:]} {target.dtype} in one chunk")
            target[self.filled : self.filled + n] = values[offset : offset + n]
        self.filled += n
        return n
