"""Stage 2 input: pairing the user's inputs with cached soft labels, row by row, and the choice
of loader.

Random row access into a chunked store touches nearly every chunk per batch, so nothing here
fancy-indexes the store: in ``memory`` mode soft labels are read whole-chunk into RAM and batches
are tensor indexing (:class:`MemoryLoader`); caches larger than RAM stream chunk-shuffled instead
(:class:`~softcache.student.stream.StreamLoader`). :func:`open_loader` chooses between the two,
``auto`` by a fixed memory budget so that the same machine always picks the same mode (and so the
same batch order).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from softcache.cache import layout
from softcache.cache.store import Cache, Split
from softcache.data import check_matches
from softcache.errors import CacheError, UsageError
from softcache.student._batch import Batch, distributed_rank, epoch_permutation, stored_soft, views_of
from softcache.student.stream import StreamLoader, StreamOptions, data_parallel, token_arrays

LoaderMode = Literal["auto", "memory", "stream"]
MEMORY_BUDGET_ENV = "SOFTCACHE_MEMORY_BUDGET"

SCAN_ROWS = 65_536
"""Rows checked at once when scanning soft labels held in RAM: bounds the scan's scratch memory
(one flag per value) without slowing it."""


class MemoryLoader:
    """All inputs and soft labels held as tensors; each epoch is a seeded shuffle.

    ``soft`` is ``(N, V, C)``; epoch ``e`` shows row ``r`` through view ``(r + e) % V`` so
    every stored view is used in turn (with one view this is always view 0). With ``replay``
    (augmented views, see ``views.ViewReplay``) the batch's inputs are that same view re-created
    from the raw inputs, so inputs and soft labels always belong to one view.

    Compact storage (see ``cache.layout``) passes its arrays as stored: ``soft`` ``(N, V, W)``
    holds the values (top-k log-probabilities or sampled counts), ``ids`` ``(N, V, W)`` the
    class ids and, under top-k, ``rest`` ``(N, V)`` the leftover mass; each row shows one view
    of all three alike, and batches carry a :class:`~softcache.student._batch.TopK`.

    The arrays may be held in the cache's storage dtype (``open_loader`` passes float16 values,
    narrow ids and uint8 counts as stored): a batch is gathered first and widened after
    (``_batch.stored_soft``, as the streamed loader does), which is exact and moves a batch's
    bytes instead of converting the whole cache. Batches are float32 and int64 either way.
    Compact arrays stay in host memory, as token rows' do (``sequence.SequenceLoader``): their
    narrow unsigned ids are gathered by the CPU kernels that token rows already rely on, and only
    the widened batch moves to the device.

    Under ``torch.distributed`` each rank yields its interleaved slice ``[rank::world]`` of every
    global batch of ``batch_size`` rows (possibly empty for a short last batch), so the ranks
    together see the batches one process sees (``student._distributed``).
    """

    def __init__(self, inputs: torch.Tensor, soft: torch.Tensor | None, labels: torch.Tensor, *,
                 batch_size: int, shuffle_seed: int = 0, device: torch.device | str = "cpu", shuffle: bool = True,
                 replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 ids: torch.Tensor | None = None, rest: torch.Tensor | None = None):
        if soft is not None and len(soft) != len(inputs):
            raise CacheError(f"{len(inputs)} inputs but {len(soft)} cached rows")
        if (ids is not None or rest is not None) and (soft is None or ids is None or ids.shape != soft.shape
                                                       or (rest is not None and rest.shape != soft.shape[:2])):
            raise CacheError("compact soft labels need values and ids of one shape (and a leftover per view)")
        self.device = torch.device(device)
        self.replay = replay.to(self.device) if hasattr(replay, "to") else replay  # type: ignore[union-attr]
        self.inputs = inputs.to(self.device)
        # compact arrays stay on the host, as token rows' do: only their widened batches move
        self.host = ids is not None
        self.soft = soft.to(self.device) if soft is not None and not self.host else soft
        self.ids, self.rest = ids, rest
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle_seed, self.shuffle = batch_size, shuffle_seed, shuffle
        self.rank, self.world_size = distributed_rank()

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def soft_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The stored values (and a top-k cache's leftover mass) in ``(first_row, values)``
        blocks, for :func:`nonfinite_rows`."""
        yield from _blocks(self.soft, self.rest)

    def id_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The class ids of compact storage, as stored, in ``(first_row, ids)`` blocks (none for
        full storage), for the check that every id is a class."""
        yield from _blocks(self.ids)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        n = len(self.inputs)
        host = epoch_permutation(n, self.shuffle_seed, epoch) if self.shuffle else torch.arange(n)
        order = host.to(self.device)
        views = self.soft.shape[1] if self.soft is not None else 1
        for start in range(0, n, self.batch_size):
            mine = slice(start, start + self.batch_size)
            rows = order[mine][self.rank :: self.world_size]
            view = views_of(rows, epoch, views) if views > 1 else None
            soft = None
            if self.soft is not None:  # gathered where the soft labels are held, then widened on the device
                at = host[mine][self.rank :: self.world_size] if self.host else rows
                at_view = views_of(at, epoch, views) if self.host and views > 1 else view
                soft = stored_soft(*(_pick(a, at, at_view) for a in (self.soft, self.ids, self.rest)),  # type: ignore[arg-type]
                                   self.device)
            if self.replay is not None:
                inputs = self.replay(rows, view if view is not None else torch.zeros_like(rows))
            else:
                inputs = self.inputs.index_select(0, rows)
            yield Batch(rows=rows, inputs=inputs, soft=soft, labels=self.labels.index_select(0, rows))


def _pick(array: torch.Tensor | None, rows: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor | None:
    """``rows`` of an ``(N, V, ...)`` array, each at its ``view``; with one view (``view`` None) a
    plain row gather of the ``(N, ...)`` slice, much cheaper than indexing by (row, view)."""
    if array is None:
        return None
    return array[:, 0].index_select(0, rows) if view is None else array[rows, view]


def _blocks(*arrays: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, values)`` blocks of :data:`SCAN_ROWS` rows of each array given."""
    for array in arrays:
        if array is not None:
            for start in range(0, len(array), SCAN_ROWS):
                yield start, array[start : start + SCAN_ROWS]


class SoftLabelDataset(Dataset):
    """A torch Dataset of ``(input, soft_labels, label)`` pairing ``dataset`` with a cache split.

    The pairing is by row position, so the dataset is checked against the length and
    fingerprint recorded at build time before anything is served. Soft labels are read once,
    whole-chunk, into memory; ``__getitems__`` serves a batch with one indexing operation. The
    soft labels are full storage's ``z / T``: a compact cache's values mean nothing without their
    ids, so it is refused (its batches come from :func:`open_loader`).
    """

    def __init__(self, split: Split, dataset: Dataset, view: int = 0):
        mode = split.manifest.storage.mode
        if mode != "full":
            raise UsageError(f"SoftLabelDataset serves full soft labels, not this cache's {mode} storage (values "
                             "with their class ids); read its batches through open_loader or train")
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


# -- the choice of loader --------------------------------------------------------------------

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


def memory_bytes(split: Split, *, with_inputs: bool = False) -> int:
    """Bytes ``memory`` mode holds for ``split``: float32 soft labels (compact storage: its
    values, ids and leftover mass as stored), plus stored inputs if read; token rows are held as
    stored (tokens, loss mask, soft labels, top-k ids and leftover mass)."""
    if split.manifest.kind == "sequence":
        return sum(int(split.array(name).nbytes) for name in token_arrays(split.manifest))
    if split.manifest.storage.mode == "full":
        total = int(np.prod(split.array(layout.SOFT).shape)) * 4
    else:
        total = sum(int(split.array(name).nbytes) for name in layout.soft_arrays(split.manifest))
    if with_inputs and split.has_inputs:
        total += int(np.prod(split.array(layout.INPUTS).shape)) * 4
    return total


def choose_mode(split: Split, mode: LoaderMode = "auto", memory_budget: int | str | None = None,
                *, with_inputs: bool = False) -> Literal["memory", "stream"]:
    """``memory`` when the soft labels (and stored inputs, if they come from the cache; a token row's
    every array) fit."""
    if mode not in ("auto", "memory", "stream"):
        raise UsageError(f"loader must be auto, memory or stream, not {mode!r}")
    if mode != "auto":
        return mode
    budget = default_memory_budget() if memory_budget is None else parse_size(memory_budget)
    return "memory" if memory_bytes(split, with_inputs=with_inputs) <= budget else "stream"


def open_loader(cache: Cache, *, inputs: torch.Tensor | None, batch_size: int, mode: LoaderMode = "auto",
                memory_budget: int | str | None = None,
                replay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                labels: torch.Tensor | None = None, **options: Any) -> MemoryLoader | StreamLoader:
    """The training split's loader in the mode asked for, or the one that fits the budget.

    ``inputs=None`` means the inputs are the ones stored in the cache: read whole in ``memory``
    mode, streamed with the soft labels in ``stream`` mode. ``replay(rows, views)`` re-creates
    augmented views from the raw inputs (``views.cache_replay``), in either mode. ``labels``
    (one per row, -1 when unknown) replace the cache's, e.g. the labels of the user's own data.

    Across ranks ``batch_size`` is the global batch in either mode: ``memory`` ranks take
    interleaved slices of each batch (the batches of one process); ``stream`` ranks each cut
    ``batch_size // world`` rows per batch from their own chunks (another batch order), and all
    stop at the smallest rank's batch count, so they step in lockstep.
    """
    opts = StreamOptions.of(None, options)  # the stream's options; the in-RAM loader uses its seed and device
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
        # as stored; each batch is widened to float32 (ids to int64)
        soft = {name: torch.from_numpy(split.read(name)) for name in layout.soft_arrays(cache.manifest)}
        return MemoryLoader(inputs, soft[layout.SOFT], labels, batch_size=batch_size, shuffle_seed=opts.shuffle_seed,
                            device=opts.device, replay=replay, ids=soft.get(layout.SOFT_IDS),
                            rest=soft.get(layout.SOFT_REST))
    world = distributed_rank()[1] if opts.world_size is None else opts.world_size
    if world > 1:  # data-parallel: batch_size stays the global batch, and every rank takes as many steps
        batch_size, even = data_parallel(batch_size, world)
        opts = StreamOptions.of(opts, {"even_batches": even})
    return StreamLoader(cache, inputs=inputs, labels=labels, batch_size=batch_size, replay=replay, options=opts)
