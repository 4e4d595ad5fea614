"""The torchrun process group of a sharded build: rank 0 opens the store first, and the others
follow only after it succeeded (the protocol is in ``softcache.cache.shards``).

This is the only part of a build that needs ``torch.distributed``, so it lives with the teacher
stage: the cache format and its I/O never import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

from softcache.cache.shards import ShardSpec
from softcache.config import dist_timeout_s
from softcache.errors import CacheError, SoftcacheError, UsageError

T = TypeVar("T")


class WorkerGroup:
    """The torchrun process group (gloo, CPU) when launched by torchrun; a no-op otherwise.

    Only the start of a build is collective: :meth:`first` runs on rank 0 before the other ranks
    and carries rank 0's outcome to them. The end is not: the last worker to finish finalizes,
    so a fast rank never waits (and never times out) on a slow one.
    """

    def __init__(self, shard: ShardSpec, timeout_s: float | None = None):
        self.shard = shard
        self.active = shard.source == "torchrun"
        self._timeout_s = timeout_s
        self._owner = False

    @property
    def timeout_s(self) -> float:
        """How long a collective waits: the one given, else ``$SOFTCACHE_DIST_TIMEOUT``, read only
        when asked (a build without torchrun never is, so a bad value cannot stop it)."""
        return self._timeout_s or dist_timeout_s()

    def __enter__(self) -> WorkerGroup:
        if self.active:
            import torch.distributed as dist

            if not dist.is_available():
                raise UsageError("this torch build has no torch.distributed; use --shard I/N instead of torchrun")
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(seconds=self.timeout_s))
                self._owner = True
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._owner:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owner = False

    def first(self, fn: Callable[[], T], then: Callable[[], T] | None = None) -> T:
        """Run ``fn`` on rank 0; after it succeeds the other ranks run ``then`` (default ``fn``).
        An error on rank 0 is raised on every rank, as the same kind of error."""
        if not self.active:
            return fn()
        if self.shard.index == 0:
            try:
                result = fn()
            except SoftcacheError as exc:
                self._broadcast(f"{'usage' if isinstance(exc, UsageError) else 'cache'}:{exc}")
                raise
            except BaseException as exc:
                self._broadcast(f"cache:rank 0 failed: {type(exc).__name__}: {exc}")
                raise
            self._broadcast("ok:")
            return result
        kind, _, message = self._broadcast("").partition(":")
        if kind == "usage":
            raise UsageError(message)
        if kind != "ok":
            raise CacheError(message)
        return (then or fn)()

    def _broadcast(self, text: str) -> str:
        """Rank 0's text to every rank, as bytes in tensors (no pickling)."""
        import torch
        import torch.distributed as dist

        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0)
        buf = data if self.shard.index == 0 else torch.empty(int(size.item()), dtype=torch.uint8)
        if int(size.item()):
            dist.broadcast(buf, src=0)
        return bytes(buf.tolist()).decode()
