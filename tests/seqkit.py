"""A small deterministic dataset of (C, L) sequences, importable as a SPEC (``seqkit:load``).

Ten classes of noisy sine waves: class k oscillates k + 1 times over the sequence, so shifting,
flipping or cropping a sequence changes it visibly, and no sequence is all zeros.
"""

from __future__ import annotations

import math

import torch

from softcache.digits import LabelledTensors


def load(rows: int = 240, length: int = 40, channels: int = 1, seed: int = 0) -> LabelledTensors:
    """``rows`` sequences shaped (channels, length); ``channels=0`` drops the channel axis,
    giving bare (length,) samples (a shape the spatial augmentations refuse)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % 10
    t = torch.arange(length, dtype=torch.float32) / length
    phase = torch.rand(rows, max(channels, 1), 1, generator=gen) * 2 * math.pi
    waves = torch.sin(2 * math.pi * (labels.float()[:, None, None] + 1) * t + phase)
    inputs = waves + 0.1 * torch.randn(waves.shape, generator=gen) + 0.5
    if channels == 0:
        inputs = inputs[:, 0]
    info = {"name": "seqkit.load", "rows": rows, "length": length, "channels": channels, "seed": seed}
    return LabelledTensors(inputs.contiguous(), labels, [str(k) for k in range(10)], info)
