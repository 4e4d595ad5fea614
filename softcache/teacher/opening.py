"""A new cache's store, created in a thread of its own while the teacher labels the first blocks.

A single worker starting a new cache labels every row whatever the store holds (anything there
is replaced, or refused), so its teacher need not wait for the store: removing an old cache and
creating the root group and every array took 40-90 ms at 1,000 classes, the largest part of what
a build added to its teacher before the first call. The build's writer waits for the store
before its first write, and the teacher's loop calls :meth:`StoreOpening.check` after every call,
so a refused target (a cache already there, say) stops the build at once with its own error.
The opening also hashes the teacher's weights first (``BuildPlan.sealed``): the cache key the
store is created under needs that digest, and it took another 24 ms at 1,000 classes.
A store that other workers share, or one a build resumes, is opened before the teacher starts
(:meth:`StoreOpening.opened`): what it holds decides what is labelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from softcache.cache import shards as distributed

Opener = Callable[[], "tuple[distributed.TargetState, Any]"]


class StoreNotOpened(Exception):
    """Raised in the writer thread when the store could not be opened; the build raises the
    opening's own error instead (one exception object is never raised in two threads)."""


class StoreOpening:
    """``shards.open_target``'s ``(state, root group)``, opened in a thread (``StoreOpening(opener)``)
    or already open (:meth:`opened`); see the module docstring."""

    def __init__(self, open_store: Opener | None = None, then: Callable[[], None] | None = None):
        self._result: tuple[distributed.TargetState, Any] | None = None
        self._error: BaseException | None = None
        self._splits: dict[str, Any] = {}
        self._then = then
        self.planned = open_store is not None
        """The store is created by this build from its plan (so it holds the planned arrays)."""
        self._thread: threading.Thread | None = None
        if open_store is not None:
            self._thread = threading.Thread(target=self._run, args=(open_store,), name="softcache-open", daemon=True)
            self._thread.start()

    @classmethod
    def opened(cls, state: distributed.TargetState, group: Any) -> StoreOpening:
        """A store opened before the teacher starts (joined, resumed or shared with other workers)."""
        done = cls()
        done._result = (state, group)
        return done

    def _run(self, open_store: Opener) -> None:
        try:
            self._result = open_store()
        except BaseException as exc:  # noqa: BLE001 - raised in the threads that need the store
            self._error = exc

    def check(self) -> None:
        """Raise the opening's error if it failed; once the store is open, run ``then`` (in the
        calling thread: the teacher's, which keeps the threads the opening started off its core,
        ``TeacherCore.sweep``). Never waits."""
        if self._error is not None:
            raise self._error
        if self._then is not None and self._result is not None:
            then, self._then = self._then, None
            then()

    def result(self) -> tuple[distributed.TargetState, Any]:
        """``(state, root group)`` of ``shards.open_target``, once the store is open."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def split(self, name: str) -> Any:
        """The group of split ``name`` (looked up once), for the writer thread: waits for the
        store, and raises :class:`StoreNotOpened` if it could not be opened."""
        if name not in self._splits:
            self.wait()
            if self._error is not None:
                raise StoreNotOpened(f"the store could not be opened: {type(self._error).__name__}")
            assert self._result is not None
            self._splits[name] = distributed.split_group(self._result[1], name)
        return self._splits[name]

    def wait(self) -> None:
        """Wait for the opening to end, whatever its outcome (before a failed build returns)."""
        if self._thread is not None:
            self._thread.join()
