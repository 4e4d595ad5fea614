"""Training configuration models, shared by the Python API, the CLI and pipeline files.

Pydantic models are the single source of truth: pipeline TOML files validate against them and
``schemas/`` holds their generated JSON Schemas.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from softcache.cache.manifest import Spec


class StudentConfig(BaseModel):
    """One student of a sweep: architecture SPEC plus its own hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    spec: Spec = Field(description="architecture SPEC, e.g. 'softcache.models:mlp,hidden=32'")
    name: str | None = Field(default=None, description="leaderboard name; derived from the spec when absent")
    temperature: float = Field(default=4.0, gt=0, allow_inf_nan=False, description="distillation temperature T")
    alpha: float = Field(default=0.9, ge=0, le=1, description="weight of the soft term; 0 = hard labels only")
    lr: float = Field(default=0.01, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    seed: int = Field(default=0, description="seeds the student's initial weights")

    @field_validator("spec", mode="before", json_schema_input_type=Union[str, Spec])
    @classmethod
    def _parse_spec(cls, value: object) -> object:
        """Pipeline files and the CLI write specs as strings; the schema accepts both forms."""
        return Spec.parse(value) if isinstance(value, str) else value

    def display_name(self) -> str:
        if self.name:
            return self.name
        arch = self.spec.target.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        args = ",".join(f"{k}={v}" for k, v in sorted(self.spec.kwargs.items()))
        base = f"{arch}({args})" if args else arch
        if self.alpha == 0:
            kind = f"hard ls={self.label_smoothing:g}" if self.label_smoothing else "hard"
        else:
            kind = f"kd T={self.temperature:g} a={self.alpha:g}"
        return f"{base} {kind} s{self.seed}"


class TrainConfig(BaseModel):
    """What every student in one pass shares: they read the same batches in the same order."""

    model_config = ConfigDict(extra="forbid")

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


class SynthConfig(BaseModel):
    """Everything that determines the synthesized inputs besides the teacher and the seed.

    The defaults are the ones measured on the digits data (docs/datafree.md): quality saturates
    around 200 steps per batch, and weighting the first BatchNorm layer up helps.
    """

    model_config = ConfigDict(extra="forbid")

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
