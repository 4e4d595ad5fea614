"""The language-model main job on real text every machine has: the Python standard library.

``softcache demo --lm`` trains a byte-level BPE tokenizer on the library's source, a small GPT
teacher for a few CPU minutes, builds a top-k cache of the teacher's next-token distributions
over the training rows (and the held-out files' rows), then trains the same student with
cross-entropy only and distilled from the cache, over several seeds, in one pass.

Distillation pays only when the teacher is clearly better than the student at the student's
budget: a teacher trained for 3 CPU minutes on short contexts ends up worse than a student
trained longer with cross-entropy, and distilling from it hurts. So the teacher gets most of the
time (context 64, a cosine schedule, :data:`TEACHER_STEPS` batches), and the students a small
token budget (:data:`STUDENT_ROWS` rows, one pass), where soft labels matter. The tokenizer and
the teacher are kept in the workdir and reused by a rerun (the teacher when its recorded
settings and tokenizer match); the cache and the students are made again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from softcache.cache.store import Cache
from softcache.cache.summary import summarize
from softcache.config import StudentConfig, TrainConfig
from softcache.errors import UsageError
from softcache.student.train import train as train_students
from softcache.teacher.build import build
from softcache.teacher.fit import lm_bits_per_token, train_lm_teacher
from softcache.text import stdlib_rows, train_tokenizer
from softcache.weights import load_model, save_model

VOCAB = 8192
LENGTH = 64
TEACHER = f"softcache.models:gpt,vocab_size={VOCAB},length={LENGTH},layers=4,width=256,heads=4"
TEACHER_STEPS = 400
TEACHER_BATCH = 32
TEACHER_LR = 2e-3
STUDENT = f"softcache.models:gpt,vocab_size={VOCAB},length={LENGTH},layers=2,width=128,heads=4"
STUDENT_ROWS = 2400
"""The students' token budget: 2400 rows of 64 tokens (154k tokens), one pass."""
STUDENT_BATCH = 8
STUDENT_LR = 1e-3
ALPHA = 0.9
TEMPERATURE = 1.0
STORAGE = "topk:64"
SEEDS = (0, 1, 2)


@dataclass
class LMDemo:
    """What the demo made: the leaderboard, the cache, the teacher's held-out bits per token, the
    cache's stored bytes per token, a mean +- std summary per kind of student, and timings."""

    leaderboard: pl.DataFrame
    cache: Cache
    teacher_bits_per_token: float
    bytes_per_token: float
    summary: pl.DataFrame
    teacher_reused: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def students(seeds: tuple[int, ...] = SEEDS) -> list[StudentConfig]:
    """The same student, cross-entropy only and distilled from the cache, for every seed."""
    common: dict[str, Any] = {"spec": STUDENT, "lr": STUDENT_LR, "temperature": TEMPERATURE}
    return [StudentConfig(alpha=0.0, seed=s, name=f"gpt 2x128 cross-entropy s{s}", **common) for s in seeds] + \
           [StudentConfig(alpha=ALPHA, seed=s, name=f"gpt 2x128 distilled a={ALPHA:g} s{s}", **common) for s in seeds]


def _teacher(out: Path, tokenizer: Path, progress: bool) -> tuple[Path, bool]:
    """The teacher's weights in the workdir: reused when made with these settings and this
    tokenizer, else trained and saved (with the settings beside it)."""
    path, record_path = out / "teacher.safetensors", out / "teacher.json"
    record = {"spec": TEACHER, "steps": TEACHER_STEPS, "batch_size": TEACHER_BATCH, "lr": TEACHER_LR,
              "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest()}
    if path.is_file() and record_path.is_file():
        try:
            if json.loads(record_path.read_text()) == record:
                return path, True
        except (OSError, ValueError):
            pass
    rows = stdlib_rows(tokenizer, LENGTH, "train")
    model = train_lm_teacher(rows, steps=TEACHER_STEPS, batch_size=TEACHER_BATCH, lr=TEACHER_LR, spec=TEACHER,
                             progress=progress)
    save_model(model, path, TEACHER)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return path, False


def summary(board: pl.DataFrame) -> pl.DataFrame:
    """Mean and standard deviation of held-out bits per token per kind of student."""
    kind = pl.when(pl.col("alpha") > 0).then(pl.lit("distilled")).otherwise(pl.lit("cross-entropy"))
    return board.with_columns(kind=kind).group_by("kind").agg(
        pl.len().alias("seeds"), pl.col("bits_per_token").mean().alias("bits_per_token_mean"),
        pl.col("bits_per_token").std().alias("bits_per_token_std"),
        pl.col("teacher_agreement").mean().alias("teacher_agreement_mean"),
    ).sort("kind")


def run_lm_demo(workdir: str | Path, *, overwrite: bool = False, seeds: tuple[int, ...] = SEEDS,
                device: str | None = None, progress: bool = True) -> LMDemo:
    """Tokenizer -> teacher -> top-k cache -> students on the standard library's source."""
    out = Path(workdir)
    if (out / "leaderboard.parquet").exists() and not overwrite:
        raise UsageError(f"{out}: holds the results of an earlier demo; pass --overwrite to replace them "
                         "(the tokenizer and teacher there are reused)")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    mark = time.perf_counter()
    tokenizer = train_tokenizer(out / "tokenizer.json", VOCAB)
    seconds["tokenizer"], mark = time.perf_counter() - mark, time.perf_counter()
    teacher_path, reused = _teacher(out, tokenizer, progress)
    seconds["teacher"], mark = time.perf_counter() - mark, time.perf_counter()
    data = f"softcache.text:stdlib_rows,tokenizer={tokenizer.resolve()},length={LENGTH},split=train,max_rows={STUDENT_ROWS}"
    held_out = f"softcache.text:stdlib_rows,tokenizer={tokenizer.resolve()},length={LENGTH},split=eval"
    cache = build(str(teacher_path.resolve()), data, str(out / "cache.zarr"), eval_data=held_out, storage=STORAGE,
                  temperature=TEMPERATURE, device=device, overwrite=True, progress=progress)
    seconds["cache"], mark = time.perf_counter() - mark, time.perf_counter()
    board = train_students(cache, students(seeds), out_dir=out, overwrite=True, progress=progress,
                           config=TrainConfig(epochs=1, batch_size=STUDENT_BATCH, device=device)).leaderboard
    seconds["students"] = time.perf_counter() - mark
    teacher = load_model(str(teacher_path))
    with torch.no_grad():
        teacher_bits = lm_bits_per_token(teacher, stdlib_rows(tokenizer, LENGTH, "eval"))
    return LMDemo(board, cache, teacher_bits, float(summarize(cache)["bytes_per_token"] or 0.0), summary(board),
                  reused, {k: round(v, 1) for k, v in seconds.items()})
