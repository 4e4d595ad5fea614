"""Training configuration models, shared by the Python API, the CLI and pipeline files.

Pydantic models are the single source of truth: pipeline TOML files validate against them and
``schemas/`` holds their generated JSON Schemas.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .manifest import Spec


class StudentConfig(BaseModel):
    """One student of a sweep: architecture SPEC plus its own hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    spec: Spec = Field(description="architecture SPEC, e.g. 'softcache.models:mlp,hidden=32'")
    name: str | None = Field(default=None, description="leaderboard name; derived from the spec when absent")
    temperature: float = Field(default=4.0, gt=0, description="distillation temperature T")
    alpha: float = Field(default=0.9, ge=0, le=1, description="weight of the soft term; 0 = hard labels only")
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    seed: int = Field(default=0, description="seeds the student's initial weights")

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, value: object) -> object:
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
