"""Stage 2: train students against a cache (the teacher is never loaded).

Every student of one call reads the same batches in the same order: a batch is produced once
and serves each student in turn. Results land where people and scripts both read them: a
leaderboard (Parquet + printed table) and each student's weights as safetensors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from softcache.config import StudentConfig, TrainConfig
from softcache.data import check_matches, load_dataset, materialize
from softcache.errors import CacheError, UsageError
from softcache.augment import cache_replay
from softcache.student.stacked import grouped
from softcache.student.loaders import Batch, MemoryLoader, nonfinite_rows
from softcache.student.loss import distillation_loss, rescale
from softcache.cache.manifest import DatasetSource
from softcache.progress import Progress
from softcache.cache.manifest import Spec
from softcache.spec import (Trust, check_recorded, load_model, num_parameters, probe_model, require_trusted,
                    resolve_device, save_model)
from softcache.cache.store import Cache, _holds_manifest, open_cache
from softcache.student.stream import StreamLoader, open_loader

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


def make_run(config: StudentConfig, num_classes: int, probe: torch.Tensor, device: torch.device,
             trust: Trust | None = None) -> StudentRun:
    """Build a student with its own seed and check it emits one logit per cached class. A
    weights-file student's recorded architecture must pass ``trust`` (the modules the user
    trusts; ``--trust-cache-specs`` covers caches, not weights files)."""
    torch.manual_seed(config.seed)
    model = load_model(config.spec, trust=Trust(trust.modules, trust.specs) if trust else None).to(device)
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
    (``softcache.student.stacked``); each ends with the weights it would have reached alone.
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


def _train_inputs(cache: Cache, data: str | Dataset | None,
                  trust: Trust | bool = False) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """The inputs of the cached rows: stored in the cache, given, or rebuilt from the recorded
    spec; and the dataset's labels when the inputs come from a dataset (None otherwise)."""
    source = cache.manifest.source
    if data is None and cache.train.has_inputs:
        return torch.from_numpy(cache.train.inputs()), "stored inputs", None
    if source.kind != "dataset":
        raise CacheError("this synthesized cache has no stored inputs")
    dataset = _dataset_for(source, data, "training data", "--data", trust)
    inputs, labels = materialize(dataset)
    return inputs, str(source.spec) if data is None else "given data", labels


def _dataset_for(source: DatasetSource, data: str | Dataset | None, what: str, flag: str,
                 trust: Trust | bool) -> Dataset:
    if data is None:
        if source.spec is None:
            raise UsageError(f"the cache does not record how to load its {what}; pass it explicitly")
        data = str(check_recorded(source.spec, what, f"pass {flag} {source.spec} to load it", trust))
    dataset, _ = load_dataset(data)
    check_matches(dataset, source, what)
    return dataset


def _eval_set(cache: Cache, eval_data: str | Dataset | None,
              trust: Trust | bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Held-out inputs, labels and, when the cache holds an eval split, the teacher's predictions."""
    recorded = cache.manifest.eval
    if recorded is None or cache.eval is None:
        if eval_data is None:
            return None
        return (*materialize(load_dataset(eval_data)[0]), None)
    x, y = materialize(_dataset_for(recorded.source, eval_data, "evaluation data", "--eval-data", trust))
    return x, y, torch.from_numpy(cache.eval.predictions()).long()


def _recorded_code(cache: Cache, data: str | Dataset | None,
                   eval_data: str | Dataset | None) -> list[tuple[str, Spec, str]]:
    """The SPECs recorded in the cache that training would run, each with what replaces it, so
    one check before any work names everything the user has to pass."""
    m, runs = cache.manifest, []
    if data is None and not cache.train.has_inputs and isinstance(m.source, DatasetSource) and m.source.spec:
        runs.append(("training data", m.source.spec, "pass --data SPEC"))
    if eval_data is None and m.eval is not None and cache.eval is not None and m.eval.source.spec:
        runs.append(("evaluation data", m.eval.source.spec, "pass --eval-data SPEC"))
    if m.views.replay == "params" and m.views.augment is not None:
        runs.append(("view augmentation", m.views.augment, ""))
    return runs


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
    overwrite: bool = False,
    trust: Trust | None = None,
    verify_key: str | Path | None = None,
) -> pl.DataFrame:
    """Train every student in one pass over the cache and return the leaderboard.

    Inputs come from ``data`` (checked against the cache's fingerprint), from inputs stored in
    the cache, or from the dataset SPEC the manifest records; when they come from a dataset, its
    labels are the hard labels (the cache's copy must agree). Evaluation uses ``eval_data`` or
    the recorded held-out split, whose teacher predictions give ``teacher_agreement``. A SPEC
    recorded in the cache (or an architecture in a student's weights file) runs only when it is on
    softcache's allowlist or ``trust`` allows it (default ``Trust.from_user()``: the modules the
    user trusts); ``trust_cache_specs`` runs whatever the cache records.

    Garbage never trains: a cache temperature outside :data:`TEMPERATURE_RANGE`, labels outside
    the classes, no known label for a student that learns from labels, or soft labels that are
    not finite stop the call before any student takes a step. ``out_dir`` receives
    ``students/*.safetensors`` and ``leaderboard.parquet`` together or not at all; earlier
    results there are replaced only with ``overwrite``. With ``verify_key`` (an EC public key,
    PEM) the cache must match its signature (``softcache.cache.sign``) before anything else is done.
    """
    cfg = config or TrainConfig()
    configs = [s if isinstance(s, StudentConfig) else StudentConfig(spec=s) for s in students]
    if not configs:
        raise UsageError("no students to train")
    out = _results_target(out_dir, overwrite) if out_dir is not None else None
    if verify_key is not None:
        from softcache.cache.sign import verify

        verify(cache.url if isinstance(cache, Cache) else str(cache), verify_key)
    opened = cache if isinstance(cache, Cache) else open_cache(cache)
    if not opened.complete:
        _check_written(opened)
    _check_temperature(opened)
    device = resolve_device(cfg.device)
    policy = (trust or Trust.from_user()).with_cache_specs(trust_cache_specs)
    require_trusted(_recorded_code(opened, data, eval_data), policy)
    inputs, _, data_labels = _train_inputs(opened, data, policy)
    labels = _training_labels(opened, data_labels)
    _check_known_labels(opened, labels, configs)
    loader = open_loader(opened, inputs=inputs, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed, device=device,
                         mode=cfg.loader, memory_budget=cfg.memory_budget, buffer_chunks=cfg.buffer_chunks,
                         workers=cfg.workers, start_method=cfg.start_method, replay=cache_replay(opened, inputs, policy),
                         labels=labels)
    try:
        _check_finite(opened, loader)
        evaluation = _eval_set(opened, eval_data, policy)
        if evaluation is not None:
            _check_label_range(evaluation[1], opened.num_classes, "the evaluation data's labels")
        runs = [make_run(c, opened.num_classes, inputs[:2], device, policy) for c in configs]
        fit(runs, loader, cfg.epochs, cached_soft, opened.temperature, progress=progress, group=cfg.group)
    finally:
        if isinstance(loader, StreamLoader):
            loader.close()
    names = _unique_names(configs)
    if out is None:
        return leaderboard(runs, names, evaluation, cfg, [None] * len(runs), device)
    return _write_results(out, runs, names, lambda weights: leaderboard(runs, names, evaluation, cfg, weights, device),
                          overwrite)


# -- what is refused before any student trains -----------------------------------------------

TEMPERATURE_RANGE = (0.05, 1000.0)
"""Cache temperatures ``train`` accepts: wide around every temperature distillation uses (1 to
20), and narrow enough to refuse a manifest that was typed wrong or tampered with. Below 0.05 a
logit margin of 1 becomes a factor e^20, so the cached distribution is one-hot to float
precision; above 1000 the stored values z / T crowd around 0, where float16 keeps three
significant digits that rescaling to a student's T multiplies by up to T_cache / T."""


def _check_temperature(cache: Cache) -> None:
    low, high = TEMPERATURE_RANGE
    t = cache.temperature
    if not low <= t <= high:  # also false for NaN
        raise CacheError(f"{cache.url}: the manifest's temperature {t} is outside [{low:g}, {high:g}]; "
                         "the cache is damaged or was built wrongly")


def _check_label_range(labels: torch.Tensor, classes: int, what: str) -> None:
    """A label must be a class or -1 (unknown); anything else would index past the logits or
    silently never match a prediction."""
    bad = ((labels < -1) | (labels >= classes)).nonzero().flatten()
    if len(bad):
        raise CacheError(f"{what}: {len(bad)} of {len(labels)} are outside [-1, {classes}) "
                         f"(first rows {bad[:5].tolist()}, e.g. {int(labels[bad[0]])})")


def _training_labels(cache: Cache, from_data: torch.Tensor | None) -> torch.Tensor:
    """The hard label of every training row: the dataset's when the inputs come from one.

    The cache keeps its own copy of the labels, which must agree wherever it knows one. A copy
    that disagrees with the data the cache's fingerprint matched was changed after the build,
    and the soft labels written by the same build are then suspect too: that is an error rather
    than a silent switch to the dataset's labels.
    """
    stored = torch.from_numpy(cache.train.labels()).long()
    _check_label_range(stored, cache.num_classes, f"{cache.url}: the cache's training labels")
    if from_data is None:
        return stored
    given = from_data.long()
    if len(given) != len(stored):
        raise CacheError(f"the training data has {len(given)} rows but the cache {len(stored)}")
    _check_label_range(given, cache.num_classes, "the training data's labels")
    differ = ((stored >= 0) & (stored != given)).nonzero().flatten()
    if len(differ):
        raise CacheError(f"{cache.url}: {len(differ)} of {len(stored)} labels in the cache disagree with the "
                         f"training data's (first rows {differ[:5].tolist()}); the cache was altered or built "
                         "from other data")
    return given


def _check_known_labels(cache: Cache, labels: torch.Tensor, configs: Sequence[StudentConfig]) -> None:
    """A student with alpha < 1 learns partly from labels; with none known (a data-free cache,
    or data without labels) it would silently train on the soft term alone, or on nothing."""
    hard = [c for c in configs if c.alpha < 1]
    if hard and not bool((labels >= 0).any()):
        raise CacheError(f"{cache.url}: no training row has a known label, but {len(hard)} student(s) learn from "
                         f"labels (alpha < 1, e.g. {hard[0].display_name()}); use alpha=1 or pass labelled --data")


def _check_finite(cache: Cache, loader: MemoryLoader | StreamLoader) -> None:
    """NaN or infinite soft labels make every student that reads them NaN. In memory mode the
    scan reads the tensors already loaded; in stream mode it is one extra pass over the store,
    a group of chunks at a time, so it stays within the loader's memory bound."""
    found = nonfinite_rows(loader.soft_blocks())
    if found.count:
        raise CacheError(f"{cache.url}: the soft labels of {found.count} of {cache.train.rows} training rows are NaN "
                         f"or infinite (first rows {found.first}); the cache is corrupt")


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


# -- the results folder ----------------------------------------------------------------------

RESULTS = ("leaderboard.parquet", "students")
"""What ``train`` writes into its output folder, in the order old results are moved aside (the
leaderboard first, so it never outlives the weights it names)."""


def _results_target(out_dir: str | Path, overwrite: bool) -> Path:
    """Check where the results will go before anything trains, so a refusal costs nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; --out needs a directory for the results")
    for folder in (out.resolve(), *out.resolve().parents):
        if _holds_manifest(fsspec.filesystem("file"), str(folder)):
            raise UsageError(f"{out_dir}: is inside the cache {folder}; write the results outside it "
                             "(a cache holds only what its build wrote)")
    _refuse_previous(out, overwrite)
    return out


def _refuse_previous(out: Path, overwrite: bool) -> list[str]:
    """The earlier results in ``out``; an error unless ``overwrite`` allows replacing them."""
    previous = [name for name in RESULTS if (out / name).exists()] if out.is_dir() else []
    if previous and not overwrite:
        raise UsageError(f"{out}: holds the results of an earlier run ({', '.join(previous)}); "
                         "pass --overwrite to replace them, or choose another --out")
    return previous


def _write_results(out: Path, runs: Sequence[StudentRun], names: Sequence[str],
                   board_for: Callable[[list[str | None]], pl.DataFrame], overwrite: bool) -> pl.DataFrame:
    """Write the weights and the leaderboard into a temporary folder, then move them into place:
    a failure or a kill while writing leaves ``out`` as it was. The leaderboard names each
    student's weights at their final path, as ``out`` was given.

    A new ``out`` is the temporary folder renamed (one atomic step). An existing one is never
    renamed or replaced itself (it may be the working directory, a mount point, or hold other
    files, as a demo workdir holds its teacher and cache): the temporary folder is made inside it,
    on the same file system, and the entries are swapped, the old leaderboard out first and the
    new one in last. At every moment a leaderboard in ``out`` names exactly the weights of its own
    run; a kill in between leaves no leaderboard, and the old results in the temporary folder.
    """
    target = out.resolve()
    fresh = not target.exists()
    home = target.parent if fresh else target
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}." if fresh else ".softcache-", suffix=".partial", dir=home))
    staged = work / "new"
    try:
        weights: list[str | None] = []
        for run, name in zip(runs, names):
            file = Path("students") / f"{_slug(name)}.safetensors"
            save_model(run.model, staged / file, run.config.spec)
            weights.append(str(out / file))
        board = board_for(weights)
        board.write_parquet(staged / "leaderboard.parquet")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if fresh and not target.exists():
        os.replace(staged, target)
    else:  # (also when another process made ``out`` meanwhile)
        _swap_entries(staged, target, work / "old", overwrite)  # a failure here leaves ``work`` to recover from
    shutil.rmtree(work, ignore_errors=True)
    return board


def _swap_entries(staged: Path, out: Path, old: Path, overwrite: bool) -> None:
    """Move earlier results from ``out`` into ``old`` (leaderboard first), then the staged ones
    into ``out`` (leaderboard last); nothing else in ``out`` is touched."""
    previous = _refuse_previous(out, overwrite)  # again: another run may have finished meanwhile
    old.mkdir()
    for name in previous:
        os.replace(out / name, old / name)
    for name in reversed(RESULTS):
        os.replace(staged / name, out / name)


def format_board(board: pl.DataFrame) -> str:
    """The leaderboard as people read it: accuracies in percent, the columns that matter."""
    cols = ["student", "parameters", "temperature", "alpha", "label_smoothing", "test_accuracy", "teacher_agreement"]
    view = board.select([c for c in cols if c in board.columns]).with_columns(
        [(pl.col(c) * 100).round(2) for c in ("test_accuracy", "teacher_agreement") if c in board.columns]
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=60, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        return str(view)
