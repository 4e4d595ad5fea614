"""The main job on the embedded digits data: teacher -> cache -> a leaderboard of students.

Everything a new user needs to see the product work: a real teacher trained in seconds and
saved as safetensors (so the SPEC recorded in the manifest rebuilds the cache from the CLI),
a cache at T=4 with the held-out split's teacher outputs, and students that show what
distillation buys next to the hard-label and label-smoothing baselines.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from torch import nn

from .build import build
from .config import StudentConfig, TrainConfig
from .data import materialize
from .digits import load
from .errors import UsageError
from .loader import MemoryLoader
from .specs import save_model
from .store import Cache
from .train import cached_soft, fit, make_run, predict
from .train import train as train_students

TEACHER_SPEC = "softcache.models:teacher_cnn"
DATA_SPEC = "softcache.digits:load,split=train"
EVAL_SPEC = "softcache.digits:load,split=test"
MLP = "softcache.models:mlp,hidden=32"
TINY = "softcache.models:tiny_cnn"


def demo_students(seed: int = 0) -> list[StudentConfig]:
    """Baselines first (alpha 0), then distilled students that differ in T, alpha and size."""
    return [
        StudentConfig(spec=MLP, alpha=0.0, seed=seed),
        StudentConfig(spec=MLP, alpha=0.0, label_smoothing=0.1, seed=seed),
        StudentConfig(spec=MLP, temperature=4.0, alpha=0.9, seed=seed),
        StudentConfig(spec=MLP, temperature=2.0, alpha=0.5, seed=seed),
        StudentConfig(spec=MLP, temperature=8.0, alpha=0.9, seed=seed),
        StudentConfig(spec=TINY, alpha=0.0, seed=seed),
        StudentConfig(spec=TINY, temperature=4.0, alpha=0.9, seed=seed),
    ]


def train_teacher(seed: int = 0, epochs: int = 30, device: str | None = None) -> tuple[nn.Module, float]:
    """Train the digits teacher on the training split; returns it and its test accuracy."""
    x, y = materialize(load("train"))
    run = make_run(StudentConfig(spec=TEACHER_SPEC, alpha=0.0, lr=3e-3, seed=seed), 10, x[:2], torch.device(device or "cpu"))
    loader = MemoryLoader(x, None, y, batch_size=64, shuffle_seed=seed, device=device or "cpu")
    fit([run], loader, epochs, cached_soft, cache_temperature=1.0)
    xt, yt = materialize(load("test"))
    acc = float((predict(run.model, xt.to(loader.device)).cpu() == yt).float().mean())
    return run.model.cpu().eval(), acc


def run_demo(workdir: str | Path, *, overwrite: bool = False, device: str | None = None, seed: int = 0,
             progress: bool = True) -> tuple[pl.DataFrame, Cache, float]:
    out = Path(workdir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: workdir is not empty; pass --overwrite to replace the demo outputs there")
    out.mkdir(parents=True, exist_ok=True)
    teacher, teacher_acc = train_teacher(seed=seed, device=device)
    teacher_path = save_model(teacher, out / "teacher.safetensors", TEACHER_SPEC)
    cache = build(str(teacher_path.resolve()), DATA_SPEC, str(out / "cache.zarr"), eval_data=EVAL_SPEC,
                  temperature=4.0, device=device, overwrite=overwrite, progress=progress)
    board = train_students(cache, demo_students(seed), out_dir=out, config=TrainConfig(device=device), progress=progress)
    return board, cache, teacher_acc
