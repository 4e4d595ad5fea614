"""Stage 2: train students against a cache (the teacher is never loaded).

Every student of one call reads the same batches in the same order: a batch is produced once
and serves each student in turn (:func:`softcache.student.run.fit`). :func:`train` returns the
leaderboard and the trained models as data; with ``out_dir`` they are also written where people
and scripts both read them (``leaderboard.parquet`` and each student's weights as safetensors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from softcache.cache.manifest import DatasetSource
from softcache.cache.store import Cache, open_cache
from softcache.cache.trust import Trust, check_recorded, require_trusted
from softcache.config import StudentConfig, TrainConfig
from softcache.data import check_matches, fingerprint, load_dataset, materialize
from softcache.errors import CacheError, UsageError
from softcache.student import _checks, _results
from softcache.student._distributed import DataParallel, main_process, process_group
from softcache.student.loaders import open_loader
from softcache.student.run import cached_soft, fit, make_run
from softcache.student.loaders import MemoryLoader
from softcache.student.sequence import TOKEN_SCORES, SequenceLoader, open_sequence_loader
from softcache.student.sequence import evaluation as tokens_evaluation
from softcache.student.sequence import score as score_tokens
from softcache.student.stream import StreamLoader
from softcache.views import cache_replay
from softcache.weights import resolve_device

StudentLike = StudentConfig | str | Callable[[], nn.Module]
"""A student as :func:`train` takes it: a SPEC string, a :class:`StudentConfig`, or a function of
no arguments returning a new ``nn.Module`` (trained with the default hyperparameters; wrap it in a
``StudentConfig(spec=function, ...)`` to choose them)."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the leaderboard (one row per student, fractions, best first),
    the trained models by leaderboard name (on the training device, in eval mode), the results
    folder when one was written, and where the call's time went (seconds: ``prepare`` = checks,
    inputs and loader; ``train``; ``evaluate``; ``write``)."""

    leaderboard: pl.DataFrame
    models: dict[str, nn.Module]
    out: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def train(
    cache: str | Cache,
    students: Iterable[StudentLike] | StudentLike,
    *,
    data: str | Dataset | None = None,
    eval_data: str | Dataset | None = None,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    trust: Trust | bool | None = None,
    verify_key: str | Path | None = None,
) -> TrainResult:
    """Train every student in one pass over the cache; return the leaderboard and the models.

    Inputs come from ``data`` (checked against the cache's fingerprint), from inputs stored in
    the cache, or from the dataset SPEC the manifest records; when they come from a dataset, its
    labels are the hard labels (the cache's copy must agree). Evaluation uses ``eval_data`` (any
    labelled data) or the cache's own held-out split; ``teacher_agreement`` needs the teacher's
    predictions, which the cache stores for its own split only, so on other data it is null.

    A SPEC recorded in the cache (or an architecture in a student's weights file) runs only when
    it is on softcache's allowlist or ``trust`` allows it: a :class:`Trust`, or by default
    ``Trust.from_user()`` (the modules the user trusts); ``trust=True`` also runs whatever the
    cache records (the CLI's ``--trust-cache-specs``). A student's model function is the
    caller's own code and runs as given.

    A compact cache (``topk:K`` or ``sample:N`` storage, of either row kind) is read as stored and
    trains every student that learns from it at the cache's own temperature, or at another one
    when the student names an approximation (``retemper``), its leftover treated as each
    student's ``leftover`` says.

    Garbage never trains (``softcache.student._checks``): every refusal comes before any student
    takes a step. ``out_dir`` receives ``students/*.safetensors`` and ``leaderboard.parquet``
    together or not at all; earlier results there are replaced only with ``overwrite``. With
    ``verify_key`` (an EC public key, PEM) the cache must match its signature
    (``softcache.cache.sign``) before anything else is done.

    Launched by torchrun (``WORLD_SIZE`` > 1) the call is data-parallel: every rank trains the
    same students on its slice of each batch (``student._distributed``: the same loss curve as
    one process with the same ``batch_size``, to float round-off, from the in-memory loaders;
    stacking is off), only rank 0 writes ``out_dir`` and shows progress, and every rank returns
    the same leaderboard.
    """
    start = time.perf_counter()
    cfg = config or TrainConfig()
    configs = _student_configs(students)
    with process_group(resolve_device(cfg.device)) as device:
        return _train(cache, configs, cfg, device, start, data=data, eval_data=eval_data,
                      out_dir=out_dir, progress=progress and main_process(), overwrite=overwrite, trust=trust,
                      verify_key=verify_key)


def _train(cache: str | Cache, configs: list[StudentConfig], cfg: TrainConfig, device: torch.device, start: float, *,
           data: str | Dataset | None, eval_data: str | Dataset | None, out_dir: str | Path | None, progress: bool,
           overwrite: bool, trust: Trust | bool | None, verify_key: str | Path | None) -> TrainResult:
    out = _results.results_target(out_dir, overwrite) if out_dir is not None else None
    if verify_key is not None:
        from softcache.cache.sign import verify

        verify(cache.url if isinstance(cache, Cache) else str(cache), verify_key)
    opened = cache if isinstance(cache, Cache) else open_cache(cache)
    if not opened.complete:
        _checks.check_written(opened)
    _checks.check_temperature(opened)
    _checks.check_compact_temperature(opened, configs)
    policy = trust if isinstance(trust, Trust) else Trust.from_user(cache_specs=bool(trust))
    sequence = opened.manifest.kind == "sequence"
    if sequence:  # token rows: everything comes from the cache, nothing recorded runs
        loader: MemoryLoader | StreamLoader | SequenceLoader = open_sequence_loader(opened, cfg, device)
        probe = loader.probe()
    else:
        require_trusted(_checks.recorded_code(opened, data, eval_data), policy)
        inputs, data_labels = _train_inputs(opened, data, policy)
        labels = _checks.training_labels(opened, data_labels)
        _checks.check_known_labels(opened, labels, configs)
        loader = open_loader(opened, inputs=inputs, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed,
                             device=device, mode=cfg.loader, memory_budget=cfg.memory_budget,
                             buffer_chunks=cfg.buffer_chunks, workers=cfg.workers, start_method=cfg.start_method,
                             replay=cache_replay(opened, inputs, policy), labels=labels)
        probe = inputs[:2]
    seconds: dict[str, float] = {}
    try:
        if not sequence:  # token rows' loaders check their ids as they open
            _checks.check_soft_ids(opened, loader)
        _checks.check_finite(opened, loader)
        if sequence:
            held_out = tokens_evaluation(opened)
        else:
            evaluation = _eval_set(opened, eval_data, policy)
            if evaluation is not None:
                _checks.check_label_range(evaluation[1], opened.num_classes, "the evaluation data's labels")
        runs = [make_run(c, opened.num_classes, probe, device, policy) for c in configs]
        seconds["prepare"] = time.perf_counter() - start
        # stacking is for classifiers; causal LMs (token rows) step one by one
        fit(runs, loader, cfg.epochs, cached_soft, opened.temperature, progress=progress, group=cfg.group and not sequence)
        seconds["train"] = time.perf_counter() - start - seconds["prepare"]
    finally:
        if isinstance(loader, StreamLoader):
            loader.close()
    mark = time.perf_counter()
    if sequence:
        scores = [score_tokens(run.model, held_out, device) if held_out is not None else
                  dict.fromkeys(TOKEN_SCORES) for run in runs]
    else:
        scores = _results.evaluate(runs, evaluation, device)
    seconds["evaluate"], mark = time.perf_counter() - mark, time.perf_counter()
    names = _unique_names(configs)
    if out is None:
        board = _results.leaderboard(runs, names, scores, cfg.epochs, [None] * len(runs))
    else:  # rank 0 writes; the other ranks name the same files once it has
        board = DataParallel().first(
            lambda: _results.write_results(out, runs, names, scores, cfg.epochs, overwrite),
            lambda: _results.leaderboard(runs, names, scores, cfg.epochs,
                                         [str(out / _results.weights_file(name)) for name in names]))
    seconds["write"] = time.perf_counter() - mark
    return TrainResult(board, {name: run.model.eval() for name, run in zip(names, runs)}, out,
                       {k: round(v, 3) for k, v in seconds.items()})


def _student_configs(students: Iterable[StudentLike] | StudentLike) -> list[StudentConfig]:
    """One student or many, each as a :class:`StudentConfig`."""
    many = [students] if isinstance(students, (str, StudentConfig)) or callable(students) else list(students)
    configs = []
    for s in many:
        if isinstance(s, StudentConfig):
            configs.append(s)
        elif isinstance(s, str) or callable(s):
            configs.append(StudentConfig(spec=s))
        else:
            raise UsageError(f"a student is a SPEC string, a StudentConfig or a function returning an nn.Module, "
                             f"not {type(s).__name__}")
    if not configs:
        raise UsageError("no students to train")
    return configs


def _train_inputs(cache: Cache, data: str | Dataset | None,
                  trust: Trust | bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inputs of the cached rows: stored in the cache, given, or rebuilt from the recorded
    spec; and the dataset's labels when the inputs come from a dataset (None otherwise)."""
    source = cache.manifest.source
    if data is None and cache.train.has_inputs:
        return torch.from_numpy(cache.train.inputs()), None
    if source.kind != "dataset":
        raise CacheError("this synthesized cache has no stored inputs")
    return materialize(_dataset_for(source, data, "training data", "--data", trust))


def _dataset_for(source: DatasetSource, data: str | Dataset | None, what: str, flag: str,
                 trust: Trust | bool) -> Dataset:
    """The data a cache's rows were built from: given, or loaded from the recorded SPEC (when
    trusted); either way it must match the recorded length and fingerprint."""
    if data is None:
        if source.spec is None:
            raise UsageError(f"the cache does not record how to load its {what}; pass it explicitly")
        data = str(check_recorded(source.spec, what, f"pass {flag} {source.spec} to load it", trust))
    dataset, _ = load_dataset(data)
    check_matches(dataset, source, what)
    return dataset


def _eval_set(cache: Cache, eval_data: str | Dataset | None,
              trust: Trust | bool) -> _results.Evaluation | None:
    """Held-out inputs and labels: ``eval_data`` (any labelled data), else the cache's own eval
    split (its recorded data, which must match). The teacher's predictions come along only when
    the data is that split: they are paired with its rows by position."""
    recorded = cache.manifest.eval.source if cache.manifest.eval is not None and cache.eval is not None else None
    if eval_data is None:
        if recorded is None:
            return None
        dataset = _dataset_for(recorded, None, "evaluation data", "--eval-data", trust)
    else:
        dataset, _ = load_dataset(eval_data)
    x, y = materialize(dataset)
    own = recorded is not None and len(dataset) == recorded.num_samples and fingerprint(dataset) == recorded.fingerprint
    return x, y, torch.from_numpy(cache.eval.predictions()).long() if own else None  # type: ignore[union-attr]


def _unique_names(configs: Iterable[StudentConfig]) -> list[str]:
    names: list[str] = []
    for cfg in configs:
        name, k = cfg.display_name(), 2
        while name in names:
            name, k = f"{cfg.display_name()} #{k}", k + 1
        names.append(name)
    return names

