"""The pipeline runner: checks every SPEC a pipeline names, then runs its stages in order
(teacher, build, each ``[[train]]``), skipping those whose output is already there.

The file format and its models are in :mod:`softcache.pipeline.config`. Stage by stage:

- ``teacher``: skipped when the weights file exists. ``make`` writes to a temporary name that is
  renamed into place, so a killed run never leaves a truncated file that looks done.
- ``build``: skipped when the cache at ``url`` is complete with the cache key this pipeline
  produces; a partial cache with that key is resumed (``build --resume``); another key is refused
  unless ``overwrite = true``. A ``[synthesis]`` pipeline runs ``synthesize`` instead.
- ``train:NAME``: skipped when ``out/stage.json`` records the same stage key (the cache key, the
  training settings and every student).

Before the first stage runs, every SPEC of the file (teacher, its ``make``, data, augmentation,
students, eval sets) is resolved to a callable without calling it, so a typo in the last
student's SPEC is a one-line error at once, not after the teacher trained and the cache was built.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from softcache.cache.manifest import Spec, now_iso
from softcache.config import CacheOptions, StudentConfig
from softcache.errors import UsageError
from softcache.pipeline.config import PipelineConfig, TrainStage

if TYPE_CHECKING:
    from softcache.cache.trust import Trust

Status = Literal["ran", "resumed", "skipped", "waiting", "excluded"]


@dataclass
class StageResult:
    """One line of the run summary (``softcache run --json`` lists these under ``stages``)."""

    stage: str
    status: Status
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "status": self.status, "seconds": round(self.seconds, 3), **self.detail}


def digits_teacher(path: str, seed: int = 0, epochs: int = 30, device: str | None = None) -> dict[str, Any]:
    """Train the digits teacher (as ``softcache demo`` does) and save it as safetensors at ``path``.

    A ``[teacher.make]`` target: it returns what it measured for the run summary."""
    from softcache.teacher.fit import TEACHER_SPEC, train_teacher
    from softcache.weights import save_model

    model, accuracy = train_teacher(seed=seed, epochs=epochs, device=device)
    save_model(model, path, TEACHER_SPEC)
    return {"test_accuracy": accuracy}


def lm_teacher(path: str, data: str, model: str = "softcache.models:gpt", *, tokenizer: str | None = None,
               vocab_size: int = 8192, eval_data: str | None = None, steps: int = 1000, batch_size: int = 32,
               lr: float = 2e-3, seed: int = 0, seconds: float | None = None,
               device: str | None = None) -> dict[str, Any]:
    """Train a causal-LM teacher on the token rows of ``data`` (a dataset SPEC) and save it as
    safetensors at ``path``: the ``[teacher.make]`` target of a sequence pipeline.

    With ``tokenizer`` a byte-level BPE tokenizer of ``vocab_size`` entries is first trained on the
    standard library corpus into that file (reused when it is there), since the rows are read
    through it (``softcache.text:stdlib_rows``). ``model`` is the architecture SPEC; its
    ``vocab_size`` and ``length`` default to the rows' own. Training is
    ``teacher.fit.train_lm_teacher`` (``steps`` of ``batch_size`` rows; ``seconds`` caps the time,
    at the cost of weights that depend on the machine). Returns what it measured for the run
    summary: the rows it saw and, with ``eval_data``, the teacher's held-out bits per token."""
    from softcache.data import load_dataset
    from softcache.sequences import as_token_rows
    from softcache.teacher.fit import lm_bits_per_token, train_lm_teacher
    from softcache.weights import save_model

    if tokenizer:
        from softcache.text import train_tokenizer

        train_tokenizer(tokenizer, vocab_size)
    rows = as_token_rows(load_dataset(data)[0])
    arch = Spec.parse(model)
    vocab = (rows.tokenizer or {}).get("vocab_size") or int(rows.tokens.max()) + 1
    arch = Spec(target=arch.target, kwargs={"vocab_size": vocab, "length": rows.length, **arch.kwargs})
    teacher = train_lm_teacher(rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed, spec=str(arch),
                               seconds=seconds, device=device)
    save_model(teacher, path, arch)
    made: dict[str, Any] = {"train_rows": len(rows), "model": str(arch)}
    if eval_data:
        made["bits_per_token"] = lm_bits_per_token(teacher, as_token_rows(load_dataset(eval_data)[0], rows.length))
    return made


def named_specs(cfg: PipelineConfig) -> list[tuple[str, Spec]]:
    """Every SPEC the file names that is code to call, with where it is written (``train.0.students.1.spec``);
    weights files are left to the stage that reads (or makes) them."""
    found: list[tuple[str, Spec | None]] = [("teacher.spec", cfg.teacher.spec), ("teacher.make", cfg.teacher.make),
                                             ("cache.augment", cfg.cache.augment)]
    if cfg.data is not None:
        found += [("data.train", cfg.data.train), ("data.eval", cfg.data.eval)]
    if cfg.synthesis is not None:
        found.append(("synthesis.eval", cfg.synthesis.eval))
    for i, stage in enumerate(cfg.train):
        found.append((f"train.{i}.eval_data", stage.eval_data))
        found += [(f"train.{i}.students.{j}.spec", s.spec) for j, s in enumerate(stage.students)]
        if stage.sweep is not None:
            found += [(f"train.{i}.sweep.spec.{j}", s) for j, s in enumerate(stage.sweep.spec)]
    from softcache.weights import is_weights_file

    return [(where, spec) for where, spec in found if spec is not None and not is_weights_file(spec.target)]


def check_specs(cfg: PipelineConfig) -> None:
    """Resolve every SPEC of the file to a callable (import its module, find the attribute)
    without calling it; the first that does not resolve is a one-line UsageError naming it."""
    from softcache.cache.trust import split_target

    for where, spec in named_specs(cfg):
        try:
            module_name, attr = split_target(spec.target)
            obj = getattr(importlib.import_module(module_name), attr, None)
            problem = (f"module {module_name!r} has no attribute {attr!r}" if obj is None else
                       None if callable(obj) else f"{spec.target} is not callable")
        except UsageError as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure to import is this SPEC's problem
            problem = f"cannot import {spec.target.partition(':')[0]!r} ({type(exc).__name__}: {exc})"
        if problem:
            raise UsageError(f"pipeline {cfg.name}: {where} {spec.target!r}: {problem}; nothing was run")


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def _teacher_spec(cfg: PipelineConfig) -> Spec:
    spec = cfg.spec(cfg.teacher.spec)
    assert spec is not None  # the teacher is required
    return Spec(target=cfg.path(spec.target), kwargs=spec.kwargs) if spec.is_file() else spec


def _teacher_stage(cfg: PipelineConfig, sharded: bool) -> StageResult:
    spec = _teacher_spec(cfg)
    if not spec.is_file():
        return StageResult("teacher", "skipped", detail={"reason": f"teacher is built by {spec.target}; nothing to make"})
    target = spec.target
    if _exists(target):
        return StageResult("teacher", "skipped", detail={"output": target, "reason": "weights file exists"})
    if cfg.teacher.make is None:
        raise UsageError(f"teacher weights {target} do not exist and the pipeline has no [teacher.make]")
    if sharded:
        raise UsageError(f"teacher weights {target} do not exist; make them before the shard workers start "
                         "(softcache run FILE --only teacher)")
    if "://" in target:
        raise UsageError(f"[teacher.make] writes local files; {target} is a URL")
    from softcache.spec import call_spec

    start = time.perf_counter()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{target}.{os.getpid()}.partial"
    try:
        made = call_spec(cfg.spec(cfg.teacher.make), path=partial)  # type: ignore[arg-type]
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    detail: dict[str, Any] = {"output": target}
    if isinstance(made, dict):
        detail["made"] = made
    return StageResult("teacher", "ran", time.perf_counter() - start, detail)


def _build_stage(cfg: PipelineConfig, shard: str | None, progress: bool,
                 trust: Trust | None = None) -> tuple[StageResult, bool]:
    """Build, resume or skip the cache; returns the result and whether the cache is complete."""
    from softcache.cache.shards import TargetMismatch
    from softcache.config import BuildConfig, BuildOptions
    from softcache.teacher.build import build

    if cfg.synthesis is not None:
        return _synthesis_stage(cfg, shard, progress)
    assert cfg.data is not None  # one source is guaranteed by PipelineConfig
    c, url = cfg.cache, cfg.path(cfg.cache.url)
    config = BuildConfig.model_validate(c.model_dump(include=set(BuildOptions.model_fields)) | {"shard": shard})
    kwargs: dict[str, Any] = dict(eval_data=cfg.spec(cfg.data.eval), progress=progress, trust=trust)
    start = time.perf_counter()
    teacher, data = _teacher_spec(cfg), cfg.spec(cfg.data.train)
    try:
        cache = build(teacher, data, url, config, overwrite=False, resume=True, **kwargs)  # type: ignore[arg-type]
        replaced = False
    except TargetMismatch:
        if not c.overwrite or shard is not None:
            raise
        cache = build(teacher, data, url, config, overwrite=True, **kwargs)  # type: ignore[arg-type]
        replaced = True
    report = cache.build_report or {}
    target = report.get("target")
    # "resumed": a single worker continued a partial cache; shard workers join one as a matter of course
    resumed = target == "joined" and report.get("launcher") == "single"
    status: Status = "skipped" if target == "complete" else "resumed" if resumed else "ran"
    detail = {"output": url, "cache_key": cache.manifest.cache_key, "complete": cache.complete,
              "replaced_other_cache": replaced, "report": report}
    return StageResult("build", status, time.perf_counter() - start, detail), cache.complete


def _synthesis_stage(cfg: PipelineConfig, shard: str | None, progress: bool) -> tuple[StageResult, bool]:
    """Synthesize the data-free cache, or skip it when it is already there with the same key."""
    from softcache.cache.shards import resolve_shard
    from softcache.teacher.synth import synthesize

    if resolve_shard(shard).count > 1:
        raise UsageError("a data-free pipeline synthesizes in one process; run it without --shard")
    s, c, url = cfg.synthesis, cfg.cache, cfg.path(cfg.cache.url)
    assert s is not None
    start = time.perf_counter()
    shared = {name: getattr(c, name) for name in CacheOptions.model_fields}
    shared["view_seed"] = c.view_seed or 0  # a pipeline's views are seeded with view_seed, not the synthesis seed
    result = synthesize(_teacher_spec(cfg), url, s.synth_config(), samples=s.samples, input_shape=s.input_shape,
                        seed=s.seed, eval_data=cfg.spec(s.eval), skip_existing=True, progress=progress, **shared)
    detail = {"output": url, "cache_key": result.cache.manifest.cache_key, "complete": True,
              "synthesis_seconds": round(result.seconds, 3), "target_rate": result.target_rate,
              "fallback": result.fallback}
    return StageResult("build", "skipped" if result.skipped else "ran", time.perf_counter() - start, detail), True


def stage_key(cache_key: str, stage: TrainStage, students: Sequence[StudentConfig]) -> str:
    """Digest of what a train stage's results depend on: the cache, the settings, the students
    (not the device, the name or the output directory)."""
    settings = stage.train_config().model_dump(mode="json", exclude={"device"})
    blob = json.dumps({
        "cache_key": cache_key,
        "settings": settings,
        "eval_data": str(stage.eval_data) if stage.eval_data else None,
        "students": [s.model_dump(mode="json") for s in students],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


STAGE_FILE = "stage.json"


def _train_stage(cfg: PipelineConfig, stage: TrainStage, progress: bool, trust: Trust | None = None) -> StageResult:
    import polars as pl

    from softcache.cache.store import open_cache
    from softcache.student.train import train

    name = f"train:{stage.name}"
    out = Path(cfg.path(stage.out or stage.name))
    cache = open_cache(cfg.path(cfg.cache.url))
    students = stage.all_students()
    key = stage_key(cache.manifest.cache_key, stage, students)
    marker, board_path = out / STAGE_FILE, out / "leaderboard.parquet"
    detail: dict[str, Any] = {"output": str(out), "students": len(students), "stage_key": key}
    if marker.is_file() and board_path.is_file() and json.loads(marker.read_text()).get("key") == key:
        detail["leaderboard"] = pl.read_parquet(board_path).to_dicts()
        return StageResult(name, "skipped", detail=detail)
    start = time.perf_counter()
    # The pipeline names its own data and augmentation: pass those, rather than running whatever
    # SPECs the cache at that URL records (the cache key does not cover the recorded SPEC text).
    own = cfg.data
    data = str(cfg.spec(own.train)) if own is not None and not cache.train.has_inputs else None
    eval_data = cfg.spec(stage.eval_data or (own.eval if own is not None and cache.eval is not None else None))
    from softcache.cache.trust import Trust

    # the augmentation this file names is the user's own choice; any other recorded one is checked
    policy = (trust or Trust.from_user()).with_specs([cfg.cache.augment] if cfg.cache.augment is not None else [])
    # the stage's folder is the stage's own (the pipeline file names it): a rerun replaces what
    # an earlier run left there, and train swaps the new results in only once they are complete
    board = train(cache, students, data=data, eval_data=eval_data, out_dir=out, config=stage.train_config(),
                  progress=progress, trust=policy, overwrite=True).leaderboard
    record = {"stage": name, "key": key, "cache_key": cache.manifest.cache_key, "students": len(students),
              "finished_at": now_iso()}
    partial = out / f"{STAGE_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, marker)  # written last: a stage killed before this point reruns
    detail["leaderboard"] = board.to_dicts()
    return StageResult(name, "ran", time.perf_counter() - start, detail)


def select_stages(cfg: PipelineConfig, only: str | Sequence[str] | None) -> list[str]:
    """The stage names ``--only`` picks (``train`` means every train stage); all by default."""
    names = cfg.stage_names()
    if not only:
        return names
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if w.strip()]
    chosen: set[str] = set()
    for w in wanted:
        matches = [n for n in names if n == w or (w == "train" and n.startswith("train:"))]
        if not matches:
            raise UsageError(f"--only {w!r}: no such stage; this pipeline has {', '.join(names)}")
        chosen.update(matches)
    return [n for n in names if n in chosen]


def run_pipeline(cfg: PipelineConfig, *, only: str | Sequence[str] | None = None, shard: str | None = None,
                 progress: bool = True, trust: Trust | None = None) -> list[StageResult]:
    """Check every SPEC of the file (:func:`check_specs`), then run the selected stages in
    order, skipping those whose output is already there.

    ``trust`` (default ``Trust.from_user()``) says which modules of the user's a weights file's
    architecture or a cache's SPECs may name; the file's own augmentation is trusted as named."""
    from softcache.cache.shards import resolve_shard

    chosen = set(select_stages(cfg, only))
    check_specs(cfg)
    sharded = resolve_shard(shard).count > 1
    results: list[StageResult] = []
    complete: bool | None = None
    for name in cfg.stage_names():
        if name not in chosen:
            results.append(StageResult(name, "excluded", detail={"reason": "not selected by --only"}))
            continue
        if name == "teacher":
            results.append(_teacher_stage(cfg, sharded))
        elif name == "build":
            result, complete = _build_stage(cfg, shard, progress, trust)
            results.append(result)
        elif sharded:
            results.append(StageResult(name, "excluded", detail={
                "reason": "a sharded run builds only; rerun without --shard once the cache is complete"}))
        elif complete is False:
            results.append(StageResult(name, "waiting", detail={"reason": "the cache is not complete yet"}))
        else:
            stage = next(t for t in cfg.train if f"train:{t.name}" == name)
            results.append(_train_stage(cfg, stage, progress, trust))
    return results
