"""Datasets as softcache sees them: loading from a SPEC, fingerprinting, batching.

A dataset is any map-style torch ``Dataset`` whose items are ``(input, label)`` or just
``input``, each input a tensor or array. Datasets that expose whole ``inputs``/``labels`` tensors
(:class:`LabelledTensors`, what ``digits.load`` returns) are sliced directly, so there is no
per-sample Python loop on the hot path. Float64 inputs (numpy's default) are cast to float32, the
dtype of every model softcache builds and of the inputs the cache's views are computed from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import DatasetSource, Spec
from softcache.sequences import is_sequence_item
from softcache.spec import call_spec

FINGERPRINT_SAMPLES = 256
"""Rows hashed for a fingerprint: evenly spaced, so any reordering or swapped data is caught
at a cost that does not grow with the dataset."""


class LabelledTensors(TensorDataset):
    """A TensorDataset of (inputs, labels) that also carries class names and a description.

    Exposing whole tensors lets softcache hash and batch the data without a per-sample loop.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, classes: list[str] | None, info: dict[str, Any]):
        super().__init__(inputs, labels)
        self.inputs = inputs
        self.labels = labels
        self.classes = classes
        self.info = info


def load_dataset(spec: Spec | str | Dataset) -> tuple[Dataset, Spec | None]:
    """Return the dataset and the spec that recreates it (None for a live object).

    The first item is read here, so a dataset whose items softcache cannot use is refused in one
    line naming its SPEC before a teacher is loaded or anything is written."""
    if isinstance(spec, Dataset):
        return spec, None
    spec = Spec.parse(spec)
    dataset = call_spec(spec)
    if isinstance(dataset, torch.nn.Module) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UsageError(f"data spec {spec} returned {type(dataset).__name__}, not a map-style Dataset")
    if len(dataset) and not isinstance(getattr(dataset, "inputs", None), torch.Tensor):
        first = dataset[0]
        if not is_sequence_item(first):
            _split_item(first, f"data spec {spec}: item 0")
    return dataset, spec


def _split_item(item: Any, where: str = "dataset item") -> tuple[torch.Tensor, int]:
    """One item as (input, label); an item of another form is a one-line UsageError saying what
    it is (a dict's keys included), rather than torch's error about inferring a dtype."""
    if isinstance(item, (tuple, list)):
        x, y = item[0], item[1] if len(item) > 1 else -1
    else:
        x, y = item, -1
    if isinstance(x, Mapping):
        keys = ", ".join(repr(k) for k in list(x)[:10]) + (", ..." if len(x) > 10 else "")
        what = type(x).__name__ if x is item else f"{type(item).__name__} whose input is a {type(x).__name__}"
        raise UsageError(f"{where} is a {what} with keys [{keys}]; softcache needs items (input, label) or input, "
                         "each input a tensor or array: return those from the dataset's __getitem__")
    try:
        tensor = torch.as_tensor(x)
        label = int(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{where} ({type(x).__name__} input, {type(y).__name__} label) is not (tensor or array, "
                         f"integer label): {first}") from None
    return _as_input(tensor), label


def _as_input(inputs: torch.Tensor) -> torch.Tensor:
    """Float64 (numpy's default float) becomes float32, what the models and the views use."""
    return inputs.to(torch.float32) if inputs.dtype == torch.float64 else inputs


def batches(dataset: Dataset, indices: Sequence[int] | range, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches in ``indices`` order; labels are -1 when unknown."""
    inputs, labels = getattr(dataset, "inputs", None), getattr(dataset, "labels", None)
    if (isinstance(inputs, torch.Tensor) and isinstance(indices, range) and indices.step == 1 and len(indices)
            and (not isinstance(labels, torch.Tensor) or len(labels) >= indices.stop)):
        # every batch's view made in one call: slicing two tensors a batch in Python cost ~0.1 ms
        # between two teacher calls (the caches cold after each call), 0.3% of a 1,000-class build
        part = slice(indices.start, indices.stop)
        xs = inputs[part].split(batch_size)
        ys = labels[part].split(batch_size) if isinstance(labels, torch.Tensor) else [torch.full((len(x),), -1) for x in xs]
        for x, y in zip(xs, ys):
            yield _as_input(x), y
        return
    if isinstance(inputs, torch.Tensor):
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            sel = slice(idx.start, idx.stop) if isinstance(idx, range) and idx.step == 1 else torch.as_tensor(list(idx))
            y = labels[sel] if isinstance(labels, torch.Tensor) else torch.full((len(idx),), -1)
            yield _as_input(inputs[sel]), y
        return
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=_collate)
    yield from loader


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_split_item(item) for item in items]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.long)


def materialize(dataset: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and labels as two tensors (for data that fits in memory). A dataset that
    already holds them as tensors (``LabelledTensors``) gives them as they are, not a copy made
    batch by batch (at 65,536 x 256 features that copy was a sixth of ``train()``'s fixed cost)."""
    inputs, labels = getattr(dataset, "inputs", None), getattr(dataset, "labels", None)
    if isinstance(inputs, torch.Tensor) and len(inputs) and len(inputs) == len(dataset):  # type: ignore[arg-type]
        known = isinstance(labels, torch.Tensor) and len(labels) == len(inputs)
        return (_as_input(inputs).contiguous(),
                labels.contiguous() if known else torch.full((len(inputs),), -1))  # type: ignore[union-attr]
    parts = list(batches(dataset, range(len(dataset)), batch_size))  # type: ignore[arg-type]
    if not parts:
        raise CacheError("dataset is empty")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fingerprint(dataset: Dataset) -> str:
    """sha256 over the length and a fixed, evenly spaced sample of (input, label) rows."""
    n = len(dataset)  # type: ignore[arg-type]
    picks = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, FINGERPRINT_SAMPLES)).astype(np.int64)) if n else []
    digest = hashlib.sha256(f"n={n}".encode())
    inputs, labels = getattr(dataset, "inputs", None), getattr(dataset, "labels", None)
    if isinstance(inputs, torch.Tensor):
        idx = torch.as_tensor(picks, dtype=torch.long)
        xs = inputs[idx].to(torch.float32).contiguous()
        ys = labels[idx] if isinstance(labels, torch.Tensor) else torch.full((len(idx),), -1)
    else:
        pairs = [_split_item(dataset[int(i)]) for i in picks]
        xs = torch.stack([p[0].to(torch.float32) for p in pairs]) if pairs else torch.zeros(0)
        ys = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    digest.update(np.asarray(picks, dtype=np.int64).tobytes())
    digest.update(xs.numpy().tobytes())
    digest.update(ys.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def describe(dataset: Dataset, spec: Spec | None) -> DatasetSource:
    info = getattr(dataset, "info", None)
    return DatasetSource(
        spec=spec,
        num_samples=len(dataset),  # type: ignore[arg-type]
        fingerprint=fingerprint(dataset),
        info=dict(info) if isinstance(info, dict) else {},
    )


def check_matches(dataset: Dataset, recorded: DatasetSource, what: str = "dataset") -> None:
    """Refuse data that is not what the cache was built from: rows are paired by position,
    so a different length or content would silently mislabel every sample."""
    n = len(dataset)  # type: ignore[arg-type]
    if n != recorded.num_samples:
        raise CacheError(f"{what} has {n} samples but the cache was built from {recorded.num_samples}")
    if fingerprint(dataset) != recorded.fingerprint:
        raise CacheError(f"{what} fingerprint does not match the cache (same length, different content or order)")
