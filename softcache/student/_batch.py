"""What every loader yields, and the two rules both loaders follow so that they agree row for row:
the epoch's row order and the view each row shows. Kept apart from the loaders themselves so
that the streaming loader and the choice of loader can share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """Rows of one training step: their row numbers in the cache, inputs, soft labels (the
    teacher's ``z / T_cache``; None for a loader without soft labels) and hard labels (-1 unknown)."""

    rows: torch.Tensor
    inputs: torch.Tensor
    soft: torch.Tensor | None
    labels: torch.Tensor


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a function of (seed, epoch) only, so runs and workers agree."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def views_of(rows: np.ndarray | torch.Tensor, epoch: int, views: int) -> np.ndarray | torch.Tensor:
    """Which stored view each row shows in ``epoch``: every view in turn, whichever loader serves it."""
    return (rows + epoch) % views
