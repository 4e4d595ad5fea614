"""Reading ahead in a background thread, so that store reads overlap with training steps."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


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
