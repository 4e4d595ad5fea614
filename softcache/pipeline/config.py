"""The pipeline file: one TOML file says teacher, data, cache and the students to train.

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

    [cache]                        # stage "build"; every key of softcache.config.BuildOptions,
    url = "cache.zarr"             # the options of `softcache build`; url: path, file:// or s3://
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
    [train.sweep]                  # and/or a grid (softcache.config.StudentGrid): every combination
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

``{workdir}`` inside a SPEC's keyword values stands for the absolute workdir, so a file one stage
makes can be named where a later stage reads it, wherever ``workdir`` is set: the language-model
pipeline's ``[teacher.make]`` trains a tokenizer into ``{workdir}/tokenizer.json`` that its
``[data]`` SPECs then read (``softcache.text:stdlib_rows,tokenizer={workdir}/tokenizer.json``). A
sequence pipeline (token rows: see pipelines/lm.toml) has the same stages; its leaderboards rank
students by held-out ``bits_per_token``.

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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from softcache.cache.manifest import Spec
from softcache.config import BuildOptions, SpecIn, StudentConfig, StudentGrid, SynthConfig, TrainConfig
from softcache.errors import UsageError, first_validation_error


WORKDIR = "{workdir}"
"""Stands for the absolute workdir in a SPEC's keyword values (see the module docstring)."""


def _fill(value: Any, workdir: str) -> Any:
    if isinstance(value, str):
        return value.replace(WORKDIR, workdir)
    if isinstance(value, list):
        return [_fill(v, workdir) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, workdir) for k, v in value.items()}
    return value


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


class CacheStage(BuildOptions):
    """Where and how stage 1 writes the cache: ``url`` plus the options of ``softcache build``
    (:class:`~softcache.config.BuildOptions`, the same fields and defaults). A data-free
    pipeline's synthesis takes the :class:`~softcache.config.CacheOptions` among them; its views
    are seeded with ``view_seed`` (0 when unset), not the synthesis seed. A pipeline always
    resumes a partial cache of its own build, so ``resume`` and ``shard`` are not keys here."""

    url: str = Field(default="cache.zarr", description="path (relative to workdir), file:// or s3:// URL")


class SynthesisStage(SynthConfig):
    """A data-free source: inputs synthesized from the teacher (the options of ``softcache synthesize``)."""

    samples: int = Field(ge=1, description="number of inputs to synthesize")
    input_shape: list[int] = Field(min_length=1, description="shape of one input, e.g. [1, 8, 8]")
    seed: int = Field(default=0, description="seeds the starting noise and the targets")
    eval: SpecIn | None = Field(default=None, description="real held-out dataset SPEC: the teacher's outputs on it "
                                "(not its inputs) go to the eval split")

    def synth_config(self) -> SynthConfig:
        return SynthConfig.model_validate(self.model_dump(include=set(SynthConfig.model_fields)))


SweepGrid = StudentGrid
"""A ``[train.sweep]`` table: the student grid the CLI's ``train`` flags make too."""


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

    def spec(self, spec: Spec | None) -> Spec | None:
        """``spec`` as a stage calls it: ``{workdir}`` in its keyword values replaced by the absolute workdir."""
        if spec is None:
            return None
        return Spec(target=spec.target, kwargs=_fill(spec.kwargs, os.path.abspath(self.workdir)))

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
