"""The main job on the embedded digits data: teacher -> cache -> a leaderboard of students.

Everything a new user needs to see the product work: a real teacher trained in seconds and
saved as safetensors (so the SPEC recorded in the manifest rebuilds the cache from the CLI),
a cache at T=4 with the held-out split's teacher outputs, and students that show what
distillation buys next to the hard-label and label-smoothing baselines.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from softcache.cache.store import Cache
from softcache.config import StudentConfig, TrainConfig
from softcache.errors import UsageError
from softcache.student.train import train as train_students
from softcache.teacher.build import build
from softcache.teacher.fit import TEACHER_SPEC, train_teacher
from softcache.weights import save_model

__all__ = ["DATAFREE_AUGMENT", "DATAFREE_VIEWS", "DATA_SPEC", "EVAL_SPEC", "MLP", "TEACHER_SPEC", "TINY", "TINY16",
           "datafree_students", "demo_students", "run_datafree_demo", "run_demo", "train_teacher"]

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


def run_demo(workdir: str | Path, *, overwrite: bool = False, device: str | None = None, seed: int = 0,
             progress: bool = True) -> tuple[pl.DataFrame, Cache, float]:
    out = Path(workdir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: workdir is not empty; pass --overwrite to replace the demo outputs there")
    out.mkdir(parents=True, exist_ok=True)
    teacher, teacher_acc = train_teacher(seed=seed, device=device)
    teacher_path = save_model(teacher, out / "teacher.safetensors", TEACHER_SPEC)
    cache = build(str(teacher_path.resolve()), DATA_SPEC, str(out / "cache.zarr"), eval_data=EVAL_SPEC,
                  device=device, overwrite=overwrite, progress=progress)
    board = train_students(cache, demo_students(seed), out_dir=out, config=TrainConfig(device=device), progress=progress,
                           overwrite=overwrite).leaderboard
    return board, cache, teacher_acc


DATAFREE_AUGMENT = "softcache.augment:compose,shift=1,cutmix=1.0"
"""Views for synthesized inputs: one-pixel shifts and CutMix between synthesized inputs. The
teacher labels every view, so each mixed input carries the teacher's own answer for it."""
DATAFREE_VIEWS = 8
TINY16 = "softcache.models:tiny_cnn,channels=16"


def datafree_students(seed: int = 0) -> list[StudentConfig]:
    """Pure distillation (alpha 1: a synthesized input has no true label) at T=8, which suits
    the confident logits synthetic inputs produce; the MLP and two small CNNs."""
    return [StudentConfig(spec=spec, temperature=8.0, alpha=1.0, seed=seed) for spec in (MLP, TINY, TINY16)]


def run_datafree_demo(workdir: str | Path, *, overwrite: bool = False, device: str | None = None, seed: int = 0,
                      samples: int = 2000, steps: int = 200, progress: bool = True) -> tuple[pl.DataFrame, float]:
    """The data-free path on digits: the teacher is trained on real data, then every student
    learns from inputs synthesized from the teacher alone (DeepInversion, then the same inputs
    with one view only, then the Gaussian-noise baseline). Writes ``leaderboard.parquet`` with
    one row per student and the teacher's test accuracy beside each."""
    from softcache.teacher.synth import SynthConfig, synthesize

    out = _workdir(workdir, overwrite)
    teacher, teacher_acc = train_teacher(seed=seed, device=device)
    teacher_spec = str(save_model(teacher, out / "teacher.safetensors", TEACHER_SPEC).resolve())
    common = {"eval_data": EVAL_SPEC, "seed": seed, "device": device, "overwrite": overwrite, "progress": progress}
    views = {"views": DATAFREE_VIEWS, "augment": DATAFREE_AUGMENT}
    inversion = synthesize(teacher_spec, str(out / "deepinversion.zarr"), samples=samples, input_shape=[1, 8, 8],
                           config=SynthConfig(steps=steps, input_range=(0.0, 1.0)),
                           **views, **common)  # type: ignore[arg-type]
    one_view = synthesize(teacher_spec, str(out / "deepinversion-1view.zarr"), reuse_inputs=inversion.cache.url,
                          **common)  # type: ignore[arg-type]
    noise = synthesize(teacher_spec, str(out / "noise.zarr"), samples=samples, input_shape=[1, 8, 8],
                       config=SynthConfig(method="noise", input_range=(0.0, 1.0)),
                       **views, **common)  # type: ignore[arg-type]
    boards = []
    runs = (("deepinversion", inversion, inversion.seconds), ("deepinversion-1view", one_view, inversion.seconds),
            ("noise", noise, noise.seconds))
    for name, result, seconds in runs:
        board = train_students(result.cache, datafree_students(seed), out_dir=out / "runs" / name,
                               config=TrainConfig(device=device), progress=progress, overwrite=overwrite).leaderboard
        boards.append(board.with_columns(
            inputs=pl.lit(name), views=pl.lit(result.cache.manifest.views.count),
            samples=pl.lit(result.cache.train.rows),
            synthesis_seconds=pl.lit(round(seconds, 2)), teacher_accuracy=pl.lit(teacher_acc),
            relative_accuracy=pl.col("test_accuracy") / teacher_acc, cache=pl.lit(result.cache.url),
        ))
    board = pl.concat(boards, how="vertical_relaxed").sort("test_accuracy", descending=True, nulls_last=True)
    board.write_parquet(out / "leaderboard.parquet")
    return board, teacher_acc


def _workdir(workdir: str | Path, overwrite: bool) -> Path:
    out = Path(workdir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: workdir is not empty; pass --overwrite to replace the demo outputs there")
    out.mkdir(parents=True, exist_ok=True)
    return out
