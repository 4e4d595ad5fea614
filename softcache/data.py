"""Datasets as softcache sees them: loading from a SPEC, fingerprinting, batching.

A dataset is any map-style torch ``Dataset`` whose items are ``(input, label)`` or just
``input``. Datasets that expose whole ``inputs``/``labels`` tensors (like ``digits.load``) are
sliced directly, so there is no per-sample Python loop on the hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import DatasetSource, Spec
from softcache.spec import call_spec

FINGERPRINT_SAMPLES = 256
"""Rows hashed for a fingerprint: evenly spaced, so any reordering or swapped data is caught
at a cost that does not grow with the dataset."""


def load_dataset(spec: Spec | str | Dataset) -> tuple[Dataset, Spec | None]:
    """Return the dataset and the spec that recreates it (None for a live object)."""
    if isinstance(spec, Dataset):
        return spec, None
    spec = Spec.parse(spec)
    dataset = call_spec(spec)
    if isinstance(dataset, torch.nn.Module) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UsageError(f"data spec {spec} returned {type(dataset).__name__}, not a map-style Dataset")
    return dataset, spec


def _split_item(item: Any) -> tuple[torch.Tensor, int]:
    if isinstance(item, (tuple, list)):
        x, y = item[0], item[1] if len(item) > 1 else -1
    else:
        x, y = item, -1
    return torch.as_tensor(x), int(y)


def batches(dataset: Dataset, indices: Sequence[int] | range, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches in ``indices`` order; labels are -1 when unknown."""
    inputs, labels = getattr(dataset, "inputs", None), getattr(dataset, "labels", None)
    if isinstance(inputs, torch.Tensor):
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            sel = slice(idx.start, idx.stop) if isinstance(idx, range) and idx.step == 1 else torch.as_tensor(list(idx))
            y = labels[sel] if isinstance(labels, torch.Tensor) else torch.full((len(idx),), -1)
            yield inputs[sel], y
        return
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=_collate)
    yield from loader


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_split_item(item) for item in items]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.long)


def materialize(dataset: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and labels as two tensors (for data that fits in memory)."""
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
