"""Declarative pipelines: one TOML file says teacher, data, cache and the students to train.

    softcache run pipelines/digits.toml [--set key=value ...] [--only STAGE,...] [--shard I/N] [--json]

A rerun does only what is missing: each stage is skipped when its output already exists with
the same key, so after a failure (or a killed job) the same command picks up where it stopped.

Format (``version = 1``). Every key is checked by :class:`PipelineConfig`, whose JSON Schema is
``schemas/pipeline.schema.json``; unknown keys are errors. A SPEC is written as a string
(``"pkg.mod:fn,key=value"``) or as a table ``{ target = "pkg.mod:fn", kwargs = { ... } }``::

    version = 1
    name = "digits"
    workdir = "runs/digits"        # relative paths below resolve against it; it against the cwd

    [teacher]                      # stage "teacher"
    spec = "teacher.safetensors"   # the teacher SPEC: a weights file or pkg.mod:fn
    [teacher.make]                 # optional: how to make the weights file when it is missing;
    target = "softcache.pipeline:digits_teacher"   # called as target(path=..., **kwargs) and
    kwargs = { epochs = 30, seed = 0 }             # must write safetensors to exactly that path

    [data]
    train = "softcache.digits:load,split=train"    # the rows to label
    eval = "softcache.digits:load,split=test"      # optional held-out split

    [cache]                        # stage "build"; keys mirror `softcache build`
    url = "cache.zarr"             # path, file:// or s3://
    temperature = 4.0
    chunk_rows = 4096
    shard_chunks = 1               # also storage, dtype, batch_size, store_inputs, views, augment,
                                   # view_seed, device; overwrite = true replaces a cache with
                                   # another key (never one of this build)

    [[train]]                      # stage "train:<name>": one pass, every student shares batches
    name = "sweep"
    out = "sweep"                  # leaderboard.parquet, students/*.safetensors, stage.json
    epochs = 60                    # also batch_size, shuffle_seed, device, loader, eval_data
    [[train.students]]             # explicit students: StudentConfig fields
    spec = "softcache.models:mlp,hidden=32"
    alpha = 0.0
    [train.sweep]                  # and/or a grid: every combination of these lists
    spec = ["softcache.models:mlp,hidden=32", "softcache.models:tiny_cnn"]
    temperature = [2.0, 4.0, 8.0]  # also alpha, lr, weight_decay, label_smoothing, seed
    seed = [0, 1]

Stages run in order teacher, build, then each ``[[train]]``:

- ``teacher``: skipped when the weights file exists. ``make`` writes to a temporary name that is
  renamed into place, so a killed run never leaves a truncated file that looks done.
- ``build``: skipped when the cache at ``url`` is complete with the cache key this pipeline
  produces; a partial cache with that key is resumed (``build --resume``); another key is refused
  unless ``overwrite = true``.
- ``train:NAME``: skipped when ``out/stage.json`` records the same stage key (the cache key, the
  training settings and every student). Students of one stage train in one pass over the cache;
  independent stages can run on different machines with ``--only train:NAME``.

``--set key=value`` edits the file before validation: dotted keys (``cache.temperature=8``,
``teacher.make.kwargs.epochs=3``), list positions or ``*`` for every entry (``train.0.epochs=5``,
``train.*.epochs=5``). Values are read as TOML (``8``, ``true``, ``[0, 1]``, ``"text"``) and as a
plain string otherwise (``workdir=/tmp/run``).

With ``--shard I/N`` or under torchrun, a run does this worker's share of the build stage only
(stages after it are reported ``excluded``); the teacher must exist already (run ``--only teacher``
first). Rerun the pipeline without ``--shard`` once the cache is complete to train.

A data-free pipeline has ``[synthesis]`` instead of ``[data]``: the build stage then runs
``softcache synthesize`` (:class:`SynthesisStage`: ``samples``, ``input_shape``, ``seed``, ``eval``
and every ``SynthConfig`` key such as ``steps`` or ``input_range``), taking ``temperature``,
``dtype``, ``chunk_rows``, ``views``, ``augment``, ``view_seed``, ``device`` and ``overwrite``
from ``[cache]``. It is skipped when the cache at ``url`` is complete with the key this
synthesis would produce; it runs in one process (no ``--shard``). See pipelines/digits-datafree.toml.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from softcache.config import StudentConfig, SynthConfig, TrainConfig
from softcache.errors import UsageError, first_validation_error
from softcache.cache.manifest import Spec, now_iso

if TYPE_CHECKING:
    from softcache.spec import Trust


def _to_spec(value: object) -> object:
    return Spec.parse(value) if isinstance(value, str) else value


SpecIn = Annotated[Spec, BeforeValidator(_to_spec, json_schema_input_type=Union[str, Spec])]
"""A SPEC written as ``"pkg.mod:fn,k=v"`` or as ``{target, kwargs}``."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherStage(_Model):
    """The teacher: a SPEC, and optionally how to make its weights file when it is missing."""

    spec: SpecIn = Field(description="teacher SPEC; a relative weights path resolves against workdir")
    make: SpecIn | None = Field(default=None, description="called as target(path=..., **kwargs) to write the "
                                "weights file when it does not exist; skipped when it does")


class DataStage(_Model):
    train: SpecIn = Field(description="dataset SPEC of the rows to label")
    eval: SpecIn | None = Field(default=None, description="held-out dataset SPEC; its teacher outputs go to 'eval'")


class CacheStage(_Model):
    """Where and how stage 1 writes the cache (the options of ``softcache build``)."""

    url: str = Field(default="cache.zarr", description="path (relative to workdir), file:// or s3:// URL")
    temperature: float = Field(default=4.0, gt=0)
    storage: str = Field(default="full", description="full (topk:K and sample:K are reserved)")
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(default=256, ge=1)
    chunk_rows: int = Field(default=4096, ge=1, description="rows per chunk (same default as softcache build)")
    shard_chunks: int = Field(default=1, ge=1, description="chunks per shard: the unit of work and of resume")
    store_inputs: bool = False
    views: int = Field(default=1, ge=1, description="views per sample (with augment)")
    augment: SpecIn | None = Field(default=None, description="replayable augmentation SPEC")
    view_seed: int = 0
    device: str | None = None
    overwrite: bool = Field(default=False, description="replace a cache with another cache key at url; a cache of "
                            "this build is always kept (skipped or resumed)")


class SynthesisStage(SynthConfig):
    """A data-free source: inputs synthesized from the teacher (the options of ``softcache synthesize``)."""

    samples: int = Field(ge=1, description="number of inputs to synthesize")
    input_shape: list[int] = Field(min_length=1, description="shape of one input, e.g. [1, 8, 8]")
    seed: int = Field(default=0, description="seeds the starting noise and the targets")
    eval: SpecIn | None = Field(default=None, description="real held-out dataset SPEC: the teacher's outputs on it "
                                "(not its inputs) go to the eval split")

    def synth_config(self) -> SynthConfig:
        return SynthConfig.model_validate(self.model_dump(include=set(SynthConfig.model_fields)))


class SweepGrid(_Model):
    """Every combination of the listed values becomes one student (alpha 0 ignores T)."""

    spec: list[SpecIn] = Field(min_length=1)
    temperature: list[float] = Field(default=[4.0], min_length=1)
    alpha: list[float] = Field(default=[0.9], min_length=1)
    lr: list[float] = Field(default=[0.01], min_length=1)
    weight_decay: list[float] = Field(default=[0.0], min_length=1)
    label_smoothing: list[float] = Field(default=[0.0], min_length=1)
    seed: list[int] = Field(default=[0], min_length=1)

    def expand(self) -> list[StudentConfig]:
        configs: list[StudentConfig] = []
        seen: set[str] = set()
        for spec, t, a, lr, wd, ls, seed in product(self.spec, self.temperature, self.alpha, self.lr,
                                                    self.weight_decay, self.label_smoothing, self.seed):
            cfg = StudentConfig(spec=spec, temperature=t if a > 0 else self.temperature[0], alpha=a, lr=lr, weight_decay=wd,
                                label_smoothing=ls, seed=seed)
            key = cfg.model_dump_json()
            if key not in seen:
                seen.add(key)
                configs.append(cfg)
        return configs


class TrainStage(TrainConfig):
    """One training pass: its students (listed and/or a grid) read the same batches."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="stage name: train:<name>")
    out: str | None = Field(default=None, description="output directory (relative to workdir); default: the name")
    eval_data: SpecIn | None = Field(default=None, description="labelled test set; default: the cache's eval split")
    students: list[StudentConfig] = Field(default_factory=list)
    sweep: SweepGrid | None = None

    @model_validator(mode="after")
    def _has_students(self) -> TrainStage:
        if not self.students and self.sweep is None:
            raise ValueError(f"train stage {self.name!r} has no [[train.students]] and no [train.sweep]")
        return self

    def all_students(self) -> list[StudentConfig]:
        return list(self.students) + (self.sweep.expand() if self.sweep else [])

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


class PipelineConfig(_Model):
    """A pipeline file: teacher -> cache -> students (see the module docstring for the format)."""

    version: Literal[1] = 1
    name: str = Field(description="pipeline name, for logs and the summary")
    description: str = ""
    workdir: str = Field(default=".", description="base of relative paths; itself relative to the current directory")
    teacher: TeacherStage
    data: DataStage | None = Field(default=None, description="the rows to label (or [synthesis] instead)")
    synthesis: SynthesisStage | None = Field(default=None, description="data-free: synthesize the inputs instead")
    cache: CacheStage = Field(default_factory=CacheStage)
    train: list[TrainStage] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> PipelineConfig:
        if (self.data is None) == (self.synthesis is None):
            raise ValueError("a pipeline needs exactly one source: [data] or [synthesis]")
        return self

    @model_validator(mode="after")
    def _unique_stage_names(self) -> PipelineConfig:
        names = [t.name for t in self.train]
        if len(set(names)) != len(names):
            raise ValueError(f"train stage names must be unique: {names}")
        return self

    def stage_names(self) -> list[str]:
        return ["teacher", "build"] + [f"train:{t.name}" for t in self.train]

    def path(self, value: str) -> str:
        """A local path resolved against ``workdir`` (absolute, so it is recorded usefully in
        manifests); URLs are left alone."""
        if "://" in value:
            return value
        return os.path.abspath(os.path.join(self.workdir, value))


# --- loading ------------------------------------------------------------------------------


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError("reading pipeline files on Python 3.10 needs the 'tomli' package") from None
    return tomllib.loads(text)


def parse_value(raw: str) -> Any:
    """A ``--set`` value: TOML when it parses (numbers, booleans, arrays, quoted strings), else text."""
    try:
        return _toml_loads(f"v = {raw}")["v"]
    except Exception:  # noqa: BLE001 - any TOML error means "plain string"
        return raw


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key=value`` to the parsed file (see the module docstring)."""
    key, sep, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise UsageError(f"--set {assignment!r}: expected key=value with a dotted key, e.g. cache.temperature=8")
    _assign(data, parts, parse_value(raw.strip()), assignment)


def _assign(node: Any, parts: list[str], value: Any, text: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            targets = list(range(len(node)))
        elif head.isdigit() and int(head) < len(node):
            targets = [int(head)]
        else:
            raise UsageError(f"--set {text!r}: {head!r} is not a position in a list of {len(node)} (or *)")
        for i in targets:
            if rest:
                _assign(node[i], rest, value, text)
            else:
                node[i] = value
        return
    if not isinstance(node, dict):
        raise UsageError(f"--set {text!r}: cannot set {head!r} inside a {type(node).__name__}")
    if not rest:
        node[head] = value
        return
    if head not in node:
        node[head] = {}
    _assign(node[head], rest, value, text)


def load_pipeline(path: str | Path, sets: Sequence[str] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline file; problems are one-line UsageErrors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such pipeline file")
    try:
        data = _toml_loads(path.read_text())
    except UsageError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    for assignment in sets:
        apply_set(data, assignment)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{path}: {first_validation_error(exc, 'file')}") from None


# --- running ------------------------------------------------------------------------------

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
    from softcache.demo import TEACHER_SPEC, train_teacher
    from softcache.spec import save_model

    model, accuracy = train_teacher(seed=seed, epochs=epochs, device=device)
    save_model(model, path, TEACHER_SPEC)
    return {"test_accuracy": accuracy}


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def _teacher_spec(cfg: PipelineConfig) -> Spec:
    spec = cfg.teacher.spec
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
        made = call_spec(cfg.teacher.make, path=partial)
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
    from softcache.teacher.build import build
    from softcache.cache.shards import TargetMismatch

    if cfg.synthesis is not None:
        return _synthesis_stage(cfg, shard, progress)
    assert cfg.data is not None  # one source is guaranteed by PipelineConfig
    c, url = cfg.cache, cfg.path(cfg.cache.url)
    kwargs: dict[str, Any] = dict(
        eval_data=cfg.data.eval, temperature=c.temperature, storage=c.storage, dtype=c.dtype,
        batch_size=c.batch_size, chunk_rows=c.chunk_rows, shard_chunks=c.shard_chunks, store_inputs=c.store_inputs,
        device=c.device, progress=progress, views=c.views, augment=c.augment, view_seed=c.view_seed, shard=shard,
        trust=trust,
    )
    start = time.perf_counter()
    teacher = _teacher_spec(cfg)
    try:
        cache = build(teacher, cfg.data.train, url, overwrite=False, resume=True, **kwargs)
        replaced = False
    except TargetMismatch:
        if not c.overwrite or shard is not None:
            raise
        cache = build(teacher, cfg.data.train, url, overwrite=True, **kwargs)
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
    result = synthesize(_teacher_spec(cfg), url, samples=s.samples, input_shape=s.input_shape, config=s.synth_config(),
                        seed=s.seed, temperature=c.temperature, dtype=c.dtype, views=c.views, augment=c.augment,
                        view_seed=c.view_seed, eval_data=s.eval, chunk_rows=c.chunk_rows, device=c.device,
                        overwrite=c.overwrite, skip_existing=True, progress=progress)
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
    data = str(own.train) if own is not None and not cache.train.has_inputs else None
    eval_data = stage.eval_data or (own.eval if own is not None and cache.eval is not None else None)
    from softcache.spec import Trust

    # the augmentation this file names is the user's own choice; any other recorded one is checked
    policy = (trust or Trust.from_user()).with_specs([cfg.cache.augment] if cfg.cache.augment is not None else [])
    # the stage's folder is the stage's own (the pipeline file names it): a rerun replaces what
    # an earlier run left there, and train swaps the new results in only once they are complete
    board = train(cache, students, data=data, eval_data=eval_data, out_dir=out, config=stage.train_config(),
                  progress=progress, trust=policy, overwrite=True)
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
    """Run the selected stages in order, skipping those whose output is already there.

    ``trust`` (default ``Trust.from_user()``) says which modules of the user's a weights file's
    architecture or a cache's SPECs may name; the file's own augmentation is trusted as named."""
    from softcache.cache.shards import resolve_shard

    chosen = set(select_stages(cfg, only))
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


def summary(cfg: PipelineConfig, file: str, results: Sequence[StageResult], seconds: float) -> dict[str, Any]:
    """The stable ``softcache run --json`` object."""
    return {
        "pipeline": cfg.name,
        "file": file,
        "workdir": os.path.abspath(cfg.workdir),
        "stages": [r.to_json() for r in results],
        "ran": [r.stage for r in results if r.status in ("ran", "resumed")],
        "seconds": round(seconds, 3),
    }
