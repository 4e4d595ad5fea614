"""One student in training and the training pass every student of a call shares.

The pass is the one-screen loop of the library: each batch is produced once and every student
takes a step on it, so a sweep costs one read of the cache however many students it trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from softcache.config import StudentConfig
from softcache.errors import CacheError, UsageError
from softcache.progress import Progress
from softcache.cache.trust import Trust
from softcache.student._batch import Batch, Soft, TopK
from softcache.student._distributed import DataParallel, Share
from softcache.student.loaders import MemoryLoader
from softcache.student.loss import distillation_loss, flatten_positions, rescale, retemper
from softcache.student.stacked import grouped
from softcache.student.stream import StreamLoader
from softcache.weights import load_model, output_logits, probe_model

SoftSource = Callable[[Batch], Soft | None]
"""Gives the teacher's ``z / T_cache`` for a batch: read from the cache, or from a live teacher."""


@dataclass
class StudentRun:
    """One student being trained: its model, optimizer and per-step loss record."""

    config: StudentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def step(self, batch: Batch, soft: Soft | None, cache_temperature: float, share: Share | None = None) -> None:
        """One optimizer step on ``batch``; with ``share`` (data-parallel training) the batch is
        this rank's slice of a global batch, and the step is the global batch's (see
        ``student._distributed``): the loss divides by the global counts and the gradients are
        summed over the ranks before the update. An empty slice still takes part."""
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if share is None or len(batch.rows):
            loss = self._loss(batch, soft, cache_temperature, share.counts if share is not None else None)
            loss.backward()
        else:
            loss = torch.zeros((), device=batch.rows.device)
        if share is not None:
            loss = share.reduce(self.model, loss)
        self.optimizer.step()
        self.losses.append(loss.detach())
        self.seconds += time.perf_counter() - start

    def _loss(self, batch: Batch, soft: Soft | None, cache_temperature: float,
              counts: tuple[float, float] | None) -> torch.Tensor:
        cfg = self.config
        logits = output_logits(self.model(batch.inputs))
        teacher = None
        if soft is not None and cfg.alpha > 0:  # a compact cache: its own temperature, or a named approximation
            teacher = retemper(soft, logits.shape[-1], cache_temperature, cfg.temperature) if isinstance(soft, TopK) \
                else rescale(soft, cache_temperature, cfg.temperature)
        labels = batch.labels
        if logits.ndim == 3:  # token rows: every position that counts is one prediction
            logits, teacher, labels = flatten_positions(logits, teacher, labels, batch.mask)
        return distillation_loss(logits, teacher, labels, temperature=cfg.temperature, alpha=cfg.alpha,
                                 label_smoothing=cfg.label_smoothing, leftover=cfg.leftover, counts=counts)

    def loss_history(self) -> list[float]:
        return torch.stack(self.losses).tolist() if self.losses else []


def build_student(config: StudentConfig, trust: Trust | None = None) -> nn.Module:
    """The student's model, its initial weights drawn from its own seed: from its SPEC (a
    weights-file student's recorded architecture must pass ``trust``, the modules the user
    trusts; trusting a cache's SPECs does not extend to weights files), or by calling its model
    function, which is the user's own code and needs no trust."""
    torch.manual_seed(config.seed)
    if not callable(config.spec):
        return load_model(config.spec, trust=Trust(trust.modules, trust.specs) if trust else None)
    model = config.spec()
    if not isinstance(model, nn.Module):
        raise UsageError(f"student {config.spec_text()} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_run(config: StudentConfig, num_classes: int, probe: torch.Tensor, device: torch.device,
             trust: Trust | None = None) -> StudentRun:
    """Build a student (:func:`build_student`) and check it emits one logit per cached class."""
    model = build_student(config, trust).to(device)
    out = probe_model(model, probe, device, what=f"student {config.spec_text()}")
    tokens = not probe.dtype.is_floating_point and probe.ndim == 2
    if tokens and (out.ndim != 3 or out.shape[-1] != num_classes):
        raise CacheError(f"student {config.spec_text()} outputs shape {tuple(out.shape[1:])} per token row but the "
                         f"cache's vocabulary has {num_classes} tokens: a language-model student returns "
                         f"(batch, length, {num_classes}) logits")
    if not tokens and (out.ndim != 2 or out.shape[1] != num_classes):
        raise CacheError(f"student {config.spec_text()} outputs shape {tuple(out.shape[1:])} but the cache has "
                         f"{num_classes} classes")
    return StudentRun(config=config, model=model, optimizer=student_optimizer(model, config))


FUSED_ADAM_DEVICES = ("cpu", "cuda")
"""Devices where ``torch.optim.Adam(fused=True)`` has a kernel (torch >= 2.4)."""


def student_optimizer(model: nn.Module, config: StudentConfig) -> torch.optim.Adam:
    """Adam with torch's fused kernel wherever torch has one for the parameters' device (CPU,
    CUDA): one kernel per parameter tensor instead of a dozen element-wise passes, which at a
    256-256-1000 MLP and batch 256 is about a tenth of a step on one CPU thread. The update is
    Adam's to float round-off (the fused kernel rounds in another order: weights differ from the
    for-loop implementation's in the last bit, not in what is learned). Elsewhere (MPS, say) the
    default implementation."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in FUSED_ADAM_DEVICES and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def fit(runs: Sequence[StudentRun], loader: MemoryLoader | StreamLoader, epochs: int, soft_source: SoftSource,
        cache_temperature: float, progress: bool = False, group: bool = True) -> None:
    """The training pass: each batch is produced once and every student takes a step on it.

    With ``group`` students that share an architecture step together as one vectorized model
    (``softcache.student.stacked``); each ends with the weights it would have reached alone.
    Under ``torch.distributed`` with more than one rank the pass is data-parallel (the loader
    gives this rank its slice of each batch; ``student._distributed``) and grouping is off.
    """
    ranks = DataParallel()
    with Progress(total=epochs * len(loader), desc="train", enabled=progress, unit="steps") as bar, \
            grouped(runs, enabled=group and not ranks.active) as steppers:
        for epoch in range(epochs):
            for batch in loader.epoch(epoch):
                soft = soft_source(batch)
                if ranks.active:
                    share = ranks.share(batch)
                    for run in runs:
                        run.step(batch, soft, cache_temperature, share)
                else:
                    for stepper in steppers:
                        stepper.step(batch, soft, cache_temperature)
                bar.update(1)
    for run, seconds in zip(runs, ranks.slowest([run.seconds for run in runs])):
        run.seconds = seconds


def cached_soft(batch: Batch) -> Soft | None:
    """Soft labels as the cache stores them: the offline distillation this library is for."""
    return batch.soft


def online_soft(teacher: nn.Module, temperature: float) -> SoftSource:
    """Soft labels from a live teacher, for comparing offline with online distillation."""
    teacher.eval()

    @torch.no_grad()
    def source(batch: Batch) -> torch.Tensor:
        return teacher(batch.inputs).float() / temperature

    return source


