"""Configuration models, shared by the Python API, the CLI and pipeline files.

Pydantic models are the single source of truth: each default is stated once, here; the CLI
generates its ``build``/``synthesize`` flags from these fields, pipeline TOML files validate
against them, and ``schemas/`` holds their generated JSON Schemas.

Stage 1 (writing a cache): :class:`CacheOptions` are the choices ``build`` and ``synthesize``
share; :class:`BuildOptions` adds those of labelling a dataset (a pipeline's ``[cache]`` table);
:class:`BuildConfig` adds the per-run choices of one ``build`` worker (resume, shard).
:class:`SynthCacheOptions` is ``CacheOptions`` with synthesis's own default temperature, and
:class:`SynthConfig` holds what determines the synthesized inputs.

Stage 2 (training students): :class:`StudentConfig` (one student), :class:`StudentGrid` (every
combination of lists of its fields, for the CLI and pipeline sweeps) and :class:`TrainConfig`
(what all students of one pass share).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from itertools import product
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_serializer, field_validator
from pydantic.json_schema import SkipJsonSchema

from softcache.cache.manifest import SAMPLE_MAX_DRAWS, Spec
from softcache.errors import UsageError, first_validation_error

DIST_TIMEOUT_ENV = "SOFTCACHE_DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT_S = 1800.0


def dist_timeout_s() -> float:
    """Seconds a torchrun collective waits for the other ranks, in a build and in training alike:
    ``$SOFTCACHE_DIST_TIMEOUT``, else 30 minutes (ranks wait on each other's shards and epochs,
    which can be long; a hang should still end in an error rather than forever)."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"${DIST_TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value

TEMPERATURE = 4.0
"""The default temperature, of a cache and of a student's distillation alike."""

SYNTH_TEMPERATURE = 8.0
"""Synthesized inputs give confident logits; a higher T keeps their dark knowledge visible."""


def _to_spec(value: object) -> object:
    return Spec.parse(value) if isinstance(value, str) else value


SpecIn = Annotated[Spec, BeforeValidator(_to_spec, json_schema_input_type=Union[str, Spec])]
"""A SPEC written as ``"pkg.mod:fn,k=v"`` (CLI, pipeline files) or as ``{target, kwargs}``."""

Temperature = Annotated[float, Field(gt=0, allow_inf_nan=False, description="temperature T the logits are divided by")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def with_options(model: type[M], config: M | None, options: Mapping[str, Any], where: str) -> M:
    """``config`` with keyword ``options`` laid over it, validated: a typo or a bad value is a
    one-line UsageError naming the option, so keyword callers get the model's checks too."""
    given = config.model_dump(exclude_unset=True) if config is not None else {}
    try:
        return model.model_validate({**given, **options})
    except ValidationError as exc:
        raise UsageError(f"{where}: {first_validation_error(exc, where)}") from None


# --- stage 1: writing a cache ---------------------------------------------------------------


class CacheOptions(_Model):
    """How a cache is written: the options ``build`` and ``synthesize`` share."""

    temperature: Temperature = Field(default=TEMPERATURE, description="temperature T the stored logits are divided by")
    dtype: Literal["float16", "float32", "uint8"] = Field(
        default="float16", description="dtype of the stored soft labels: float16 or float32; uint8 quantises top-k "
                                       "log-probabilities (1/16 nat steps)")
    chunk_rows: int = Field(default=4096, ge=1, description="rows per chunk; writes cover whole chunks")
    views: int = Field(default=1, ge=1, description="label this many augmented views of every input (needs "
                       "augment); stage 2 replays them exactly")
    augment: SpecIn | None = Field(default=None, description="replayable augmentation SPEC, e.g. softcache.augment:"
                                   "compose,crop=0.6,flip=0.5,shift=1,mixup=0.4,cutmix=1")
    view_seed: int | None = Field(default=None, description="seeds the view parameters, which the cache stores "
                                  "(default: 0; synthesize: its seed)")
    device: str | None = Field(default=None, description="cuda / cpu (default: cuda when present)")
    pin_threads: Literal["auto", "off"] = Field(
        default="auto", description="auto: a CPU teacher on one torch thread (Linux, 2+ cores) stays on the core it "
        "runs on and the build's writer keeps off it while labelling, let go if another process shares that core; "
        "off: the scheduler places every thread")
    overwrite: bool = Field(default=False, description="replace an existing cache at the target (a pipeline keeps "
                            "a cache of its own build: skipped or resumed)")


class BuildOptions(CacheOptions):
    """``CacheOptions`` plus those of labelling a dataset: a pipeline's ``[cache]`` table."""

    storage: str = Field(default="full", description="full (every logit / T), topk:K (the K most probable "
                         "classes' ids and log-probabilities plus the leftover mass) or sample:N[:SEED] (N <= "
                         f"{SAMPLE_MAX_DRAWS} draws from the teacher's distribution at T, stored as ids and uint8 "
                         "counts; SEED 0 unless given)")
    batch_size: int = Field(default=256, ge=1, description="rows per teacher call")
    shard_chunks: int = Field(default=1, ge=1, description="chunks per shard: the unit of work split between "
                              "workers and redone on resume")
    store_inputs: bool = Field(default=False, description="also store the inputs in the cache")

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        mode, _, k = value.partition(":")
        if mode == "full" and not k:
            return value
        if mode == "topk":
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"storage {value!r}: K must be a whole number >= 1 (topk:64)")
            return f"topk:{int(k)}"
        if mode == "sample":
            n, _, seed = k.partition(":")
            if not n.isdigit() or not 1 <= int(n) <= SAMPLE_MAX_DRAWS:
                raise ValueError(f"storage {value!r}: N must be a whole number from 1 to {SAMPLE_MAX_DRAWS} "
                                 "(sample:12; the counts are stored as uint8)")
            if seed and not seed.isdigit():
                raise ValueError(f"storage {value!r}: SEED must be a whole number >= 0 (sample:12:3)")
            return f"sample:{int(n)}" + (f":{int(seed)}" if seed and int(seed) else "")
        raise ValueError(f"storage must be 'full', 'topk:K' or 'sample:N', not {value!r}")


class BuildConfig(BuildOptions):
    """Every option of ``build()`` and ``softcache build`` besides its inputs: ``BuildOptions``
    plus this worker's share of a sharded build and whether it continues a partial one."""

    shard: str | None = Field(default=None, description="I/N: do worker I's share of N (job arrays); under "
                              "torchrun RANK/WORLD_SIZE are used instead")
    resume: bool = Field(default=False, description="continue a partial cache of the same build at the target: "
                         "finished shards are skipped")


class SynthCacheOptions(CacheOptions):
    """``CacheOptions`` as ``synthesize`` takes them: its own default temperature."""

    temperature: Temperature = Field(default=SYNTH_TEMPERATURE, description="temperature T the stored logits are "
                                     "divided by (synthetic inputs want a higher T)")


class SynthConfig(_Model):
    """Everything that determines the synthesized inputs besides the teacher and the seed.

    The defaults are the ones measured on the digits data (docs/datafree.md): quality saturates
    around 200 steps per batch, and weighting the first BatchNorm layer up helps.
    """

    method: Literal["deepinversion", "noise"] = Field(
        default="deepinversion", description="deepinversion: optimise inputs against the teacher; "
        "noise: teacher-labelled Gaussian noise (the baseline to beat)")
    steps: int = Field(default=200, ge=0, description="optimisation steps per batch")
    batch_size: int = Field(default=256, ge=2, description="inputs optimised together (BatchNorm statistics need a batch)")
    lr: float = Field(default=0.1, gt=0, description="Adam learning rate, cosine-decayed to 0")
    bn_weight: float = Field(default=1.0, ge=0, description="weight of the BatchNorm statistics term")
    first_bn_weight: float = Field(default=10.0, ge=0, description="extra multiplier for the first BatchNorm layer")
    tv_weight: float = Field(default=1e-3, ge=0, description="total variation (squared neighbour differences)")
    l2_weight: float = Field(default=1e-4, ge=0, description="L2 norm of each input")
    diversity_weight: float = Field(default=0.1, ge=0,
                                    description="mean cosine similarity of same-class penultimate features")
    jitter: int = Field(default=1, ge=0, description="random shift in pixels applied each step")
    input_range: tuple[float, float] | None = Field(
        default=None, description="clamp inputs to [low, high] after every step (the data's value range, if known)")
    noise_mean: float = Field(default=0.0, description="method=noise: mean of the Gaussian")
    noise_std: float = Field(default=1.0, gt=0, description="method=noise: standard deviation")

    @field_validator("input_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"input_range needs low < high, got {value}")
        return value


# --- stage 2: training students -------------------------------------------------------------


ModelFunction = Callable[[], Any]
"""A function of no arguments returning a new ``torch.nn.Module``: a student given as live code
from Python, where a SPEC would need an importable name."""


Retemper = Literal["refuse", "uniform-tail"]
"""A compact cache at another temperature: refused, or a named approximation (``student.loss.Retemper``)."""


class StudentConfig(_Model):
    """One student of a sweep: architecture SPEC (or, from Python, a model function) plus its own
    hyperparameters. A model function is not serialisable: dumped, it reads as its qualified
    name (:meth:`spec_text`), which names it but cannot rebuild it."""

    spec: Spec | SkipJsonSchema[ModelFunction] = Field(
        description="architecture SPEC, e.g. 'softcache.models:mlp,hidden=32'")
    name: str | None = Field(default=None, description="leaderboard name; derived from the spec when absent")
    temperature: Temperature = Field(default=TEMPERATURE, description="distillation temperature T")
    alpha: float = Field(default=0.9, ge=0, le=1, description="weight of the soft term; 0 = hard labels only")
    lr: float = Field(default=0.01, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    seed: int = Field(default=0, description="seeds the student's initial weights")
    leftover: Literal["bucket", "label", "renormalize"] = Field(
        default="bucket", description="top-k caches: the leftover mass is one more 'other' class (bucket), goes to "
        "the true label (label), or is dropped and the kept mass rescaled (renormalize: biased, never a default)")
    retemper: Retemper = Field(
        default="refuse", description="compact (top-k, sampled) caches at another temperature than the cache's: "
        "refused (refuse), or approximated with the leftover spread evenly over the classes not kept (uniform-tail; "
        "see softcache.student.loss.Retemper); full storage is rescaled exactly either way")

    @field_validator("spec", mode="before", json_schema_input_type=Union[str, Spec])
    @classmethod
    def _parse_spec(cls, value: object) -> object:
        """Pipeline files and the CLI write specs as strings; the schema accepts both forms."""
        return Spec.parse(value) if isinstance(value, str) else value

    @field_serializer("spec", when_used="json")
    def _dump_spec(self, value: object) -> object:
        return value.model_dump(mode="json") if isinstance(value, Spec) else self.spec_text()

    def spec_text(self) -> str:
        """The SPEC as written, or a model function's ``module:qualname`` (leaderboards show it)."""
        if isinstance(self.spec, Spec):
            return str(self.spec)
        fn = self.spec
        return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"

    def spec_key(self) -> object:
        """Students with equal keys build the same architecture: the SPEC text, or the very same
        model function (by identity: two functions of one name may build different models)."""
        return str(self.spec) if isinstance(self.spec, Spec) else ("function", id(self.spec))

    def display_name(self) -> str:
        if self.name:
            return self.name
        kwargs = self.spec.kwargs if isinstance(self.spec, Spec) else {}
        target = self.spec.target if isinstance(self.spec, Spec) else self.spec_text()
        arch = target.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        args = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        base = f"{arch}({args})" if args else arch
        if self.alpha == 0:
            kind = f"hard ls={self.label_smoothing:g}" if self.label_smoothing else "hard"
        else:
            kind = f"kd T={self.temperature:g} a={self.alpha:g}"
            kind += f" {self.leftover}" if self.leftover != "bucket" else ""
            kind += f" {self.retemper}" if self.retemper != "refuse" else ""
        return f"{base} {kind} s{self.seed}"


def student_default(name: str) -> Any:
    """A StudentConfig field's default (the CLI's grid flags and ``StudentGrid`` show it)."""
    return StudentConfig.model_fields[name].default


class StudentGrid(_Model):
    """Every combination of the listed values becomes one student; a hard-label student
    (alpha 0) ignores T, so it appears once (at the first T). Unlisted fields take the
    StudentConfig default."""

    spec: list[SpecIn] = Field(min_length=1)
    temperature: list[float] = Field(default=[student_default("temperature")], min_length=1)
    alpha: list[float] = Field(default=[student_default("alpha")], min_length=1)
    lr: list[float] = Field(default=[student_default("lr")], min_length=1)
    weight_decay: list[float] = Field(default=[student_default("weight_decay")], min_length=1)
    label_smoothing: list[float] = Field(default=[student_default("label_smoothing")], min_length=1)
    seed: list[int] = Field(default=[student_default("seed")], min_length=1)
    leftover: list[Literal["bucket", "label", "renormalize"]] = Field(default=[student_default("leftover")],
                                                                       min_length=1)
    retemper: list[Retemper] = Field(default=[student_default("retemper")], min_length=1)

    def expand(self) -> list[StudentConfig]:
        """The students in grid order (spec, T, alpha, lr, weight decay, label smoothing, seed,
        leftover, retemper), duplicates dropped. Each is validated: a bad value raises pydantic's
        ValidationError. A student without a soft term (alpha 0) has no leftover to treat, so it
        appears once (with the first leftover and retemper)."""
        configs: list[StudentConfig] = []
        seen: set[str] = set()
        for spec, t, a, lr, wd, ls, seed, rest, how in product(self.spec, self.temperature, self.alpha, self.lr,
                                                               self.weight_decay, self.label_smoothing, self.seed,
                                                               self.leftover, self.retemper):
            cfg = StudentConfig(spec=spec, temperature=t if a > 0 else self.temperature[0], alpha=a, lr=lr,
                                weight_decay=wd, label_smoothing=ls, seed=seed,
                                leftover=rest if a > 0 else self.leftover[0],
                                retemper=how if a > 0 else self.retemper[0])
            key = cfg.model_dump_json()
            if key not in seen:
                seen.add(key)
                configs.append(cfg)
        return configs


class TrainConfig(_Model):
    """What every student in one pass shares: they read the same batches in the same order."""

    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=64, ge=1)
    shuffle_seed: int = Field(default=0, description="seeds the batch order, shared by all students")
    device: str | None = Field(default=None, description="cuda when present, else cpu")
    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto", description="memory: soft labels in RAM; stream: chunk-shuffled reads; auto: memory when they fit")
    memory_budget: int | None = Field(
        default=None, ge=0, description="bytes auto mode may hold in RAM (default $SOFTCACHE_MEMORY_BUDGET, else min(4 GiB, RAM/2))")
    buffer_chunks: int = Field(default=4, ge=1, description="stream mode: chunks decoded and shuffled together")
    workers: int = Field(default=0, ge=0, description="stream mode: DataLoader worker processes reading the store")
    start_method: Literal["fork", "spawn", "forkserver"] | None = Field(
        default=None, description="how stream-mode workers start (default: the platform's)")
    group: bool = Field(default=True, description="train students that share an architecture as one vectorized model")
