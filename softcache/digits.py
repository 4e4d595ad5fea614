"""The embedded default data: scikit-learn's bundled handwritten digits (no download).

1797 real 8x8 grey images, scaled to [0, 1]. The split is stratified and seeded, and the
dataset describes itself in ``info`` so the manifest records exactly which rows were used.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from softcache.data import LabelledTensors
from softcache.errors import UsageError

__all__ = ["CLASS_NAMES", "LabelledTensors", "load"]

CLASS_NAMES = [str(i) for i in range(10)]


def load(split: Literal["train", "test", "all"] = "train", seed: int = 0, test_size: int = 597) -> LabelledTensors:
    """Digits as a dataset; ``split`` picks the rows of a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise UsageError(f"digits split must be train, test or all, not {split!r}")
    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    index = np.arange(len(y))
    if split != "all":
        train_idx, test_idx = train_test_split(index, test_size=test_size, stratify=y, random_state=seed)
        index = np.sort(train_idx if split == "train" else test_idx)
    info = {
        "name": "sklearn.datasets.load_digits",
        "split": split,
        "split_seed": seed,
        "test_size": test_size,
        "stratified": True,
        "rows": int(len(index)),
    }
    return LabelledTensors(torch.from_numpy(x[index]), torch.from_numpy(y[index]), CLASS_NAMES, info)
