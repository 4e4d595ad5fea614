"""Reference architectures for 8x8 single-channel images (the embedded digits data).

Each factory is a SPEC target (``softcache.models:mlp,hidden=32``). Students carry no
BatchNorm so that many copies can be stacked and trained as one vectorised model.
"""

from __future__ import annotations

from torch import nn


def teacher_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """BatchNorm CNN, about 29k parameters at width 32: the digits teacher."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


def mlp(hidden: int = 32, num_classes: int = 10, in_features: int = 64, depth: int = 1) -> nn.Module:
    """The 64-32-10 MLP student (``depth`` hidden layers of ``hidden`` units)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def tiny_cnn(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """About 1.9k parameters at 8 channels: a conv student without BatchNorm. It keeps the 2x2
    spatial map (no global pooling): on 8x8 digits, where a stroke is matters."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 4, num_classes),
    )
