"""Stage 2: train students against a cache (the teacher is never loaded).

Every student of one call reads the same batches in the same order: a batch is produced once
and serves each student in turn. Results land where people and scripts both read them: a
leaderboard (Parquet + printed table) and each student's weights as safetensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from .config import StudentConfig, TrainConfig
from .data import check_matches, load_dataset, materialize
from .errors import CacheError, UsageError
from .augment import cache_replay
from .group import grouped
from .loader import Batch, MemoryLoader
from .loss import distillation_loss, rescale
from .manifest import DatasetSource
from .progress import Progress
from .specs import check_recorded, load_model, num_parameters, probe_model, resolve_device, save_model
from .store import Cache, open_cache
from .stream import StreamLoader, open_loader

SoftSource = Callable[[Batch], torch.Tensor | None]
"""Gives the teacher's ``z / T_cache`` for a batch: read from the cache, or from a live teacher."""


@dataclass
class StudentRun:
    """One student being trained: its model, optimizer and per-step loss record."""

    config: StudentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def step(self, batch: Batch, soft: torch.Tensor | None, cache_temperature: float) -> None:
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        logits = self.model(batch.inputs)
        teacher = rescale(soft, cache_temperature, cfg.temperature) if (soft is not None and cfg.alpha > 0) else None
        loss = distillation_loss(logits, teacher, batch.labels, temperature=cfg.temperature,
                                 alpha=cfg.alpha, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())
        self.seconds += time.perf_counter() - start

    def loss_history(self) -> list[float]:
        return torch.stack(self.losses).tolist() if self.losses else []


def make_run(config: StudentConfig, num_classes: int, probe: torch.Tensor, device: torch.device) -> StudentRun:
    """Build a student with its own seed and check it emits one logit per cached class."""
    torch.manual_seed(config.seed)
    model = load_model(config.spec).to(device)
    out = probe_model(model, probe, device, what=f"student {config.spec}")
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise CacheError(
            f"student {config.spec} outputs shape {tuple(out.shape[1:])} but the cache has {num_classes} classes"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return StudentRun(config=config, model=model, optimizer=optimizer)


def fit(runs: Sequence[StudentRun], loader: MemoryLoader | StreamLoader, epochs: int, soft_source: SoftSource,
        cache_temperature: float, progress: bool = False, group: bool = True) -> None:
    """The training pass: each batch is produced once and every student takes a step on it.

    With ``group`` students that share an architecture step together as one vectorized model
    (``softcache.group``); each ends with the weights it would have reached alone.
    """
    with Progress(total=epochs * len(loader), desc="train", enabled=progress, unit="steps") as bar, \
            grouped(runs, enabled=group) as steppers:
        for epoch in range(epochs):
            for batch in loader.epoch(epoch):
                soft = soft_source(batch)
                for stepper in steppers:
                    stepper.step(batch, soft, cache_temperature)
                bar.update(1)


def cached_soft(batch: Batch) -> torch.Tensor | None:
    return batch.soft


def online_soft(teacher: nn.Module, temperature: float) -> SoftSource:
    """Soft labels from a live teacher, for comparing offline with online distillation."""
    teacher.eval()

    @torch.no_grad()
    def source(batch: Batch) -> torch.Tensor:
        return teacher(batch.inputs).float() / temperature

    return source


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs[i : i + batch_size]).argmax(-1) for i in range(0, len(inputs), batch_size)])


def _train_inputs(cache: Cache, data: str | Dataset | None, trust: bool = False) -> tuple[torch.Tensor, str]:
    """The inputs of the cached rows: stored in the cache, given, or rebuilt from the recorded spec."""
    source = cache.manifest.source
    if data is None and cache.train.has_inputs:
        return torch.from_numpy(cache.train.inputs()), "stored inputs"
    if source.kind != "dataset":
        raise CacheError("this synthesized cache has no stored inputs")
    dataset = _dataset_for(source, data, "training data", "--data", trust)
    return materialize(dataset)[0], str(source.spec) if data is None else "given data"


def _dataset_for(source: DatasetSource, data: str | Dataset | None, what: str, flag: str, trust: bool) -> Dataset:
    if data is None:
        if source.spec is None:
            raise UsageError(f"the cache does not record how to load its {what}; pass it explicitly")
        data = str(check_recorded(source.spec, what, f"pass {flag} {source.spec} to load it", trust))
    dataset, _ = load_dataset(data)
    check_matches(dataset, source, what)
    return dataset


def _eval_set(cache: Cache, eval_data: str | Dataset | None,
              trust: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Held-out inputs, labels and, when the cache holds an eval split, the teacher's predictions."""
    recorded = cache.manifest.eval
    if recorded is None or cache.eval is None:
        if eval_data is None:
            return None
        return (*materialize(load_dataset(eval_data)[0]), None)
    x, y = materialize(_dataset_for(recorded.source, eval_data, "evaluation data", "--eval-data", trust))
    return x, y, torch.from_numpy(cache.eval.predictions()).long()


def _unique_names(configs: Sequence[StudentConfig]) -> list[str]:
    names: list[str] = []
    for cfg in configs:
        name, k = cfg.display_name(), 2
        while name in names:
            name, k = f"{cfg.display_name()} #{k}", k + 1
        names.append(name)
    return names


def leaderboard(runs: Sequence[StudentRun], names: Sequence[str], evaluation: Any, train_cfg: TrainConfig,
                weights: Sequence[str | None], device: torch.device) -> pl.DataFrame:
    rows = []
    for run, name, path in zip(runs, names, weights):
        acc = agree = None
        if evaluation is not None:
            x, y, teacher_pred = evaluation
            pred = predict(run.model, x.to(device)).cpu()
            known = y >= 0
            acc = float((pred[known] == y[known]).float().mean()) if bool(known.any()) else None
            agree = float((pred == teacher_pred).float().mean()) if teacher_pred is not None else None
        cfg = run.config
        rows.append({
            "student": name, "spec": str(cfg.spec), "parameters": num_parameters(run.model),
            "temperature": cfg.temperature if cfg.alpha > 0 else None, "alpha": cfg.alpha, "label_smoothing": cfg.label_smoothing,
            "lr": cfg.lr, "seed": cfg.seed, "epochs": train_cfg.epochs,
            "test_accuracy": acc, "teacher_agreement": agree,
            "final_loss": run.loss_history()[-1] if run.losses else None,
            "train_seconds": round(run.seconds, 3), "weights": path,
        })
    schema = {"temperature": pl.Float64, "test_accuracy": pl.Float64, "teacher_agreement": pl.Float64, "final_loss": pl.Float64, "weights": pl.Utf8}
    return pl.DataFrame(rows, schema_overrides=schema).sort("test_accuracy", descending=True, nulls_last=True)


def train(
    cache: str | Cache,
    students: Iterable[StudentConfig | str],
    *,
    data: str | Dataset | None = None,
    eval_data: str | Dataset | None = None,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    trust_cache_specs: bool = False,
) -> pl.DataFrame:
    """Train every student in one pass over the cache and return the leaderboard.

    Inputs come from ``data`` (checked against the cache's fingerprint), from inputs stored in
    the cache, or from the dataset SPEC the manifest records. Evaluation uses ``eval_data`` or
    the recorded held-out split, whose teacher predictions give ``teacher_agreement``. A SPEC
    recorded in the cache runs only when it is softcache's own or ``trust_cache_specs`` is set.
    """
    cfg = config or TrainConfig()
    configs = [s if isinstance(s, StudentConfig) else StudentConfig(spec=s) for s in students]
    if not configs:
        raise UsageError("no students to train")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; --out needs a directory for the results")
    opened = cache if isinstance(cache, Cache) else open_cache(cache)
    if not opened.complete:
        _check_written(opened)
    device = resolve_device(cfg.device)
    inputs, _ = _train_inputs(opened, data, trust_cache_specs)
    loader = open_loader(opened, inputs=inputs, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed, device=device,
                         mode=cfg.loader, memory_budget=cfg.memory_budget, buffer_chunks=cfg.buffer_chunks,
                         workers=cfg.workers, start_method=cfg.start_method, replay=cache_replay(opened, inputs, trust_cache_specs))
    evaluation = _eval_set(opened, eval_data, trust_cache_specs)
    runs = [make_run(c, opened.num_classes, inputs[:2], device) for c in configs]
    try:
        fit(runs, loader, cfg.epochs, cached_soft, opened.temperature, progress=progress, group=cfg.group)
    finally:
        if isinstance(loader, StreamLoader):
            loader.close()
    names = _unique_names(configs)
    weights: list[str | None] = [None] * len(runs)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, (run, name) in enumerate(zip(runs, names)):
            weights[i] = str(save_model(run.model, out / "students" / f"{_slug(name)}.safetensors", run.config.spec))
    board = leaderboard(runs, names, evaluation, cfg, weights, device)
    if out_dir is not None:
        board.write_parquet(Path(out_dir) / "leaderboard.parquet")
    return board


def _check_written(cache: Cache) -> None:
    """An incomplete cache (read with ``allow_incomplete``) can be trained on only once every
    training row is stored: unwritten rows hold fill values (uniform soft labels, no label) that
    would silently pull every student towards the uniform distribution."""
    for split in (cache.train, cache.eval):
        missing = int((split.sample_index() < 0).sum()) if split is not None else 0
        if missing:
            raise CacheError(f"{cache.url}: {missing} of {split.rows} {split.name} rows are not written yet "  # type: ignore[union-attr]
                             "(the build is unfinished); finish it before training (softcache build --resume)")


def _slug(name: str) -> str:
    keep = [c if c.isalnum() or c in "-_." else "_" for c in name]
    return "".join(keep).strip("_")


def format_board(board: pl.DataFrame) -> str:
    """The leaderboard as people read it: accuracies in percent, the columns that matter."""
    cols = ["student", "parameters", "temperature", "alpha", "label_smoothing", "test_accuracy", "teacher_agreement"]
    view = board.select([c for c in cols if c in board.columns]).with_columns(
        [(pl.col(c) * 100).round(2) for c in ("test_accuracy", "teacher_agreement") if c in board.columns]
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=60, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        return str(view)
