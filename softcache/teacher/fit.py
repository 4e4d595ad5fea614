"""Training a teacher by plain supervised learning, so examples and pipelines can make one.

The bundled digits teacher (:data:`TEACHER_SPEC`) is what ``softcache demo`` and the shipped
pipelines distil from: a small BatchNorm CNN that reaches about 99% test accuracy in seconds.
The language-model teacher (:func:`train_lm_teacher`, a :func:`softcache.models.gpt`) learns
next-token prediction on token rows. Both live in stage 1 (a teacher is what stage 1 needs) and
use nothing of stage 2's training code: cross-entropy, Adam(W), a learning-rate schedule and a
seeded shuffle per epoch are all a teacher needs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from softcache.data import materialize
from softcache.digits import load
from softcache.errors import UsageError
from softcache.progress import Progress
from softcache.sequences import TokenRows, next_token_targets
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


LM_TEACHER_SPEC = "softcache.models:gpt"
"""The language-model teacher's architecture; its sizes are the SPEC's keyword arguments."""


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` fraction of training, then cosine decay to 0.

    A small LM trained for minutes gains most from the decay: the same steps at a constant rate
    end about half a bit per token worse."""
    if progress < warmup:
        return (progress + 1e-9) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))))


def train_lm_teacher(rows: TokenRows, *, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     spec: str = LM_TEACHER_SPEC, warmup: float = 0.05, weight_decay: float = 0.1,
                     seconds: float | None = None, device: str | None = None, progress: bool = False) -> nn.Module:
    """Train a causal LM from ``spec`` on ``rows`` with next-token cross-entropy, AdamW and a
    warmup + cosine schedule over ``steps`` steps of ``batch_size`` rows; returns it on the CPU.

    ``seconds`` bounds the wall time: the schedule then runs on whichever of steps or time is
    further along, so a slower machine still ends its decay (with fewer steps, and results that
    depend on the machine); without it a run repeats exactly for a seed."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise UsageError(f"teacher training needs steps >= 1, batch_size >= 1 and lr > 0, not {steps}, {batch_size}, {lr}")
    if len(rows) == 0:
        raise UsageError("no token rows to train the teacher on")
    dev = torch.device(device or "cpu")
    torch.manual_seed(seed)
    model = load_model(spec).to(dev)
    probe_model(model, rows.tokens[:2], dev)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    targets = next_token_targets(rows.tokens, rows.loss_mask)
    batches = _batches(len(rows), batch_size, seed)
    start = time.perf_counter()
    model.train()
    with Progress(steps, "LM teacher", enabled=progress, unit="step") as bar:
        for step in range(steps):
            done = step / steps if seconds is None else max(step / steps, (time.perf_counter() - start) / seconds)
            if done >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(done, warmup)
            picked = next(batches)
            logits = model(rows.tokens[picked].to(dev))
            loss = F.cross_entropy(logits.flatten(0, 1), targets[picked].to(dev).flatten(), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(1)
    return model.cpu().eval()


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices, ``batch_size`` at a time, endlessly: epoch ``e`` in an order seeded by
    ``(seed, e)``; a batch that would cross an epoch's end starts the next one."""
    for epoch in itertools.count():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        if n < batch_size:
            yield order


@torch.no_grad()
def lm_bits_per_token(model: nn.Module, rows: TokenRows, batch_size: int = 128) -> float:
    """Mean next-token cross-entropy in bits over every position with a target (held-out rows)."""
    model.eval()
    device = next(model.parameters()).device
    targets = next_token_targets(rows.tokens, rows.loss_mask)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        logits = model(rows.tokens[i : i + batch_size].to(device)).float()
        t = targets[i : i + batch_size].to(device)
        total += float(F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-1, reduction="sum"))
        count += int((t >= 0).sum())
    if count == 0:
        raise UsageError("no positions with a next token to score")
    return total / count / math.log(2)
