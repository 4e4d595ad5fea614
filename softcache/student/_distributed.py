"""Data-parallel stage 2 under torchrun: each rank trains the same students on its own slice of
every global batch, and together the ranks take the step one process takes on the whole batch.

Why the ranks follow one process's loss curve (to float round-off):

- Rows: the in-memory loaders (``MemoryLoader``, ``SequenceLoader``) give rank ``r`` the rows
  ``[r::world]`` of every global batch, so the ranks together see exactly the batches one process
  sees (a rank's slice of a short last batch may be empty; it still takes part in the step). The
  streaming loader deals whole chunks to ranks instead: same rows per epoch, another batch order,
  so its curve is its own; it is cut to the smallest rank's batch count so ranks step in lockstep.
- Loss: each term of the loss is a mean over the global batch's rows (positions that count; the
  hard term over those with a known label). The counts differ from rank to rank (token rows
  count their masked positions), so they are summed across ranks first, once per batch for
  every student (:meth:`DataParallel.share`), and each rank's loss is its rows' *sum* over the
  global counts (``loss.distillation_loss(counts=...)``): the ranks' losses add up to the global
  mean, and so do their gradients.
- Gradients: summed across ranks before the optimizer step, with the loss riding in the same
  buffer (one collective per student step, :meth:`Share.reduce`). Every rank then applies the
  same update to the same initial weights (students are seeded), so they stay equal without
  being broadcast. ``DistributedDataParallel`` is not used: it *averages* gradients, which equals
  the global gradient only when every rank holds the same number of rows and positions, and it
  would wrap every student of a sweep in hooks and buckets to do what one ``all_reduce`` does.
- Students whose parameters get no gradient on any rank are left without one, as in one process
  (so Adam's weight decay does not move them either).

Not reproduced across ranks: grouped (stacked) students, which compute their gradients in closed
form (grouping is off under a world size > 1), and batch-norm statistics, which stay per rank.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
from torch import nn

from softcache.config import dist_timeout_s
from softcache.errors import CacheError, SoftcacheError, UsageError
from softcache.student._batch import Batch, distributed_rank

T = TypeVar("T")

_GROUPS = itertools.count()
"""Process groups this process has made: every rank makes them in the same order (one per
training call), so the count names the same group on every rank."""


def launched_world() -> int:
    """The world size torchrun launched this process into (1 when not launched by it)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={text!r} is not a number") from None


def main_process() -> bool:
    """True on the one process that prints and writes results: rank 0, or a lone process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """The device this rank trains on, inside torchrun's process group for the duration.

    Launched by torchrun (``WORLD_SIZE`` > 1) with no group yet, the group is made here (gloo on
    CPU; on CUDA nccl for CUDA tensors and gloo for CPU ones) and destroyed on exit; a group the
    caller made is used and left alone, and each call makes its own (a script may train several
    times in one launch). A CUDA device without an index becomes the rank's own GPU
    (``LOCAL_RANK``). Collectives time out after ``$SOFTCACHE_DIST_TIMEOUT`` seconds, as a build's do.
    """
    dist = torch.distributed
    owner = False
    if launched_world() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise UsageError("this torch build has no torch.distributed; train in one process instead of torchrun")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=dist_timeout_s())
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        # a fresh key space per group: torch names every new default group alike, and a second
        # group in the same launch would otherwise read the first one's stale peer addresses
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=dist.PrefixStore(f"softcache-train/{next(_GROUPS)}", store),
                                rank=rank, world_size=world)
        owner = True
    try:
        yield device
    finally:
        if owner:
            dist.destroy_process_group()


def batch_counts(batch: Batch) -> torch.Tensor:
    """``(rows, known)`` of this rank's slice: the positions that count (rows for samples) and
    those of them with a known label, as :func:`~softcache.student.loss.flatten_positions` sees them."""
    labels = batch.labels if batch.mask is None else batch.labels[batch.mask.bool()]
    return torch.stack([torch.tensor(labels.numel(), device=labels.device), (labels >= 0).sum()]).to(torch.float64)


@dataclass(frozen=True)
class Share:
    """This rank's part of one global batch: the global ``counts`` ``(rows, known)`` every rank
    divides its loss sums by (``distillation_loss(counts=...)``)."""

    counts: tuple[float, float]

    def reduce(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """Sum ``model``'s gradients and ``loss`` over the ranks in one collective; return the
        global loss. A parameter keeps no gradient only if it got none on every rank."""
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=loss.device)
        flat = torch.cat([*grads, present, loss.detach().reshape(1).to(dtype)])
        torch.distributed.all_reduce(flat)
        start = 0
        for p, got in zip(params, flat[-1 - len(params) : -1].tolist()):
            grad = flat[start : start + p.numel()].view(p.shape).to(p.dtype)
            start += p.numel()
            p.grad = grad if got > 0 else None
        return flat[-1].to(loss.dtype)


class DataParallel:
    """The ranks of this training pass (world size 1 without ``torch.distributed``: a no-op)."""

    def __init__(self) -> None:
        self.rank, self.world = distributed_rank()

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, batch: Batch) -> Share:
        """The global counts of the batch this rank holds a slice of (one small collective)."""
        counts = batch_counts(batch)
        torch.distributed.all_reduce(counts)
        rows, known = counts.tolist()
        return Share((rows, known))

    def slowest(self, seconds: Sequence[float]) -> list[float]:
        """Each figure as the slowest rank's (students' training times), so every rank reports the same."""
        if not self.active or not seconds:
            return list(seconds)
        values = torch.tensor(list(seconds), dtype=torch.float64)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values.tolist()

    def first(self, fn: Callable[[], T], then: Callable[[], T]) -> T:
        """``fn`` on rank 0 (writing the results), and once it has succeeded ``then`` on the
        other ranks; an error on rank 0 is raised on every rank, as the same kind of error."""
        if not self.active:
            return fn()
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as exc:
                kind = "usage" if isinstance(exc, UsageError) else "cache"
                text = str(exc) if isinstance(exc, SoftcacheError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
                _broadcast_text(f"{kind}:{text}")
                raise
            _broadcast_text("ok:")
            return result
        kind, _, text = _broadcast_text("").partition(":")
        if kind != "ok":
            raise (UsageError if kind == "usage" else CacheError)(text)
        return then()


def _broadcast_text(text: str, limit: int = 4096) -> str:
    """Rank 0's ``text`` on every rank, as UTF-8 bytes in a tensor (no pickled objects between
    processes, unlike ``broadcast_object_list``)."""
    data = text.encode()[:limit]
    buffer = torch.zeros(limit + 1, dtype=torch.uint8)
    size = torch.tensor([len(data)], dtype=torch.int64)
    torch.distributed.broadcast(size, src=0)
    if data:
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    torch.distributed.broadcast(buffer, src=0)
    return bytes(buffer[: int(size)].tolist()).decode(errors="replace")
