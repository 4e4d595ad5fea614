"""Training a teacher by plain supervised learning, so examples and pipelines can make one.

The bundled digits teacher (:data:`TEACHER_SPEC`) is what ``softcache demo`` and the shipped
pipelines distil from: a small BatchNorm CNN that reaches about 99% test accuracy in seconds.
It lives in stage 1 (a teacher is what stage 1 needs) and uses nothing of stage 2's training
code: cross-entropy, Adam and a seeded shuffle per epoch are all a teacher needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softcache.data import materialize
from softcache.digits import load
from softcache.weights import load_model, probe_model

TEACHER_SPEC = "softcache.models:teacher_cnn"
"""The digits teacher's architecture, as recorded in the weights files and caches made from it."""


def fit_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float = 3e-3,
                   batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Train ``model`` (already on its device) on ``inputs``/``labels`` with cross-entropy and
    Adam; epoch ``e`` visits the rows in an order seeded by ``(seed, e)``, so a run repeats."""
    device = next(model.parameters()).device
    inputs, labels = inputs.to(device), labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, len(inputs), batch_size):
            rows = order[start : start + batch_size].to(device)
            model.train()
            loss = F.cross_entropy(model(inputs[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``inputs`` whose top class is the label."""
    model.eval()
    device = next(model.parameters()).device
    predicted = torch.cat([model(inputs[i : i + batch_size].to(device)).argmax(-1).cpu()
                           for i in range(0, len(inputs), batch_size)])
    return float((predicted == labels).float().mean())


def train_teacher(seed: int = 0, epochs: int = 30, device: str | None = None) -> tuple[nn.Module, float]:
    """Train the digits teacher on the training split; returns it (on the CPU) and its test accuracy."""
    x, y = materialize(load("train"))
    dev = torch.device(device or "cpu")
    torch.manual_seed(seed)
    model = load_model(TEACHER_SPEC).to(dev)
    probe_model(model, x[:2], dev)
    fit_classifier(model, x, y, epochs=epochs, seed=seed)
    xt, yt = materialize(load("test"))
    return model.cpu().eval(), accuracy(model, xt, yt)
