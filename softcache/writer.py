"""Background writer: the teacher never waits on storage.

Rows arrive in order in batches of any size; they are packed into chunk-sized buffers and each
full chunk is handed to a thread that writes it. The queue is bounded, so a slow store applies
back-pressure instead of filling memory, and a write error is raised in the producer at its
next ``append`` (or at ``close``), not lost in the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

Block = dict[str, np.ndarray]


class ChunkWriter:
    """Packs rows ``[start, stop)`` into whole chunks and writes them off the main thread.

    ``write(start_row, block)`` is called from the writer thread with whole-chunk blocks
    (the last one may end at ``stop``, the end of the range).
    """

    def __init__(self, write: Callable[[int, Block], None], start: int, stop: int, chunk_rows: int, depth: int = 4):
        self._write, self._stop, self._chunk = write, stop, chunk_rows
        self._next = start  # first row of the chunk being filled
        self._pending: list[Block] = []
        self._pending_rows = 0
        self._queue: queue.Queue[tuple[int, Block] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="softcache-writer", daemon=True)
        self._thread.start()
        self.rows_written = 0

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            try:
                self._write(*item)
                self.rows_written += len(next(iter(item[1].values())))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: tuple[int, Block] | None) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def append(self, block: Block) -> None:
        """Add the next rows (every array with the same leading length)."""
        self._raise_if_failed()
        self._pending.append(block)
        self._pending_rows += len(next(iter(block.values())))
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        while self._pending_rows:
            target = min(self._chunk, self._stop - self._next)
            if self._pending_rows < target and not final:
                return
            take = min(target, self._pending_rows)
            merged = {k: np.concatenate([b[k] for b in self._pending]) for k in self._pending[0]}
            head = {k: v[:take] for k, v in merged.items()}
            rest = {k: v[take:] for k, v in merged.items()}
            self._pending = [rest] if len(next(iter(rest.values()))) else []
            self._pending_rows -= take
            self._put((self._next, head))
            self._next += take

    def close(self) -> None:
        """Write what is left, wait for the thread, and raise any error it hit."""
        try:
            self._flush(final=True)
            if self._next != self._stop and self._error is None:
                raise RuntimeError(f"writer got rows up to {self._next} but the range ends at {self._stop}")
        finally:
            self._put_final()
        self._raise_if_failed()

    def _put_final(self) -> None:
        try:
            self._queue.put(None, timeout=60)
        except queue.Full:
            pass
        self._thread.join()

    def abort(self) -> None:
        """Stop without writing what is pending (after an error in the producer)."""
        self._pending, self._pending_rows = [], 0
        self._error = self._error or RuntimeError("aborted")
        self._put_final()
