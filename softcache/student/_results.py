"""What a training call leaves behind: the leaderboard, and each student's weights in a results
folder written all at once or not at all.

The leaderboard is data (a polars DataFrame, fractions not percent); formatting it for people is
the CLI's job. The folder is replaced atomically, so a reader never sees a leaderboard that
names weights of another run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch

from softcache.cache.store import holds_manifest
from softcache.errors import UsageError
from softcache.student.run import StudentRun
from softcache.weights import predict
from softcache.weights import num_parameters, save_model

Evaluation = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""Held-out inputs, their labels, and the teacher's predictions for them when known."""

Score = dict[str, float | None]
"""A student's held-out figures by leaderboard column (None: not measurable): ``test_accuracy``
and ``teacher_agreement`` for samples; ``bits_per_token``, ``perplexity``, ``accuracy`` and
``teacher_agreement`` for token rows (``student.sequence.score``)."""

SAMPLE_SCORES = ("test_accuracy", "teacher_agreement")

RESULTS = ("leaderboard.parquet", "students")
"""What ``train`` writes into its output folder, in the order old results are moved aside (the
leaderboard first, so it never outlives the weights it names)."""


def evaluate(runs: Sequence[StudentRun], evaluation: Evaluation | None, device: torch.device) -> list[Score]:
    """Each student's accuracy on the rows with a known label, and its agreement with the
    teacher's predictions where those belong to these very rows (the cache's own eval split)."""
    if evaluation is None:
        return [dict.fromkeys(SAMPLE_SCORES)] * len(runs)
    x, y, teacher_pred = evaluation
    known = y >= 0
    scores: list[Score] = []
    for run in runs:
        pred = predict(run.model, x.to(device)).cpu()
        acc = float((pred[known] == y[known]).float().mean()) if bool(known.any()) else None
        agree = float((pred == teacher_pred).float().mean()) if teacher_pred is not None else None
        scores.append({"test_accuracy": acc, "teacher_agreement": agree})
    return scores


def leaderboard(runs: Sequence[StudentRun], names: Sequence[str], scores: Sequence[Score], epochs: int,
                weights: Sequence[str | None]) -> pl.DataFrame:
    """One row per student, best first: highest test accuracy, or fewest held-out bits per token."""
    rows = []
    for run, name, score, path in zip(runs, names, scores, weights):
        cfg = run.config
        rows.append({
            "student": name, "spec": cfg.spec_text(), "parameters": num_parameters(run.model),
            "temperature": cfg.temperature if cfg.alpha > 0 else None, "alpha": cfg.alpha,
            "label_smoothing": cfg.label_smoothing, "lr": cfg.lr, "seed": cfg.seed, "epochs": epochs,
            **score, "final_loss": run.loss_history()[-1] if run.losses else None,
            "train_seconds": round(run.seconds, 3), "weights": path,
        })
    schema = {"temperature": pl.Float64, "final_loss": pl.Float64, "weights": pl.Utf8,
              **{column: pl.Float64 for column in (scores[0] if scores else SAMPLE_SCORES)}}
    tokens = bool(scores) and "bits_per_token" in scores[0]
    return pl.DataFrame(rows, schema_overrides=schema).sort(
        "bits_per_token" if tokens else "test_accuracy", descending=not tokens, nulls_last=True)


def results_target(out_dir: str | Path, overwrite: bool) -> Path:
    """Check where the results will go before anything trains, so a refusal costs nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; --out needs a directory for the results")
    for folder in (out.resolve(), *out.resolve().parents):
        if holds_manifest(str(folder)):
            raise UsageError(f"{out_dir}: is inside the cache {folder}; write the results outside it "
                             "(a cache holds only what its build wrote)")
    _refuse_previous(out, overwrite)
    return out


def _refuse_previous(out: Path, overwrite: bool) -> list[str]:
    """The earlier results in ``out``; an error unless ``overwrite`` allows replacing them."""
    previous = [name for name in RESULTS if (out / name).exists()] if out.is_dir() else []
    if previous and not overwrite:
        raise UsageError(f"{out}: holds the results of an earlier run ({', '.join(previous)}); "
                         "pass --overwrite to replace them, or choose another --out")
    return previous


def _slug(name: str) -> str:
    keep = [c if c.isalnum() or c in "-_." else "_" for c in name]
    return "".join(keep).strip("_")


def weights_file(name: str) -> Path:
    """Where a student's weights go inside the results folder."""
    return Path("students") / f"{_slug(name)}.safetensors"


def write_results(out: Path, runs: Sequence[StudentRun], names: Sequence[str], scores: Sequence[Score],
                  epochs: int, overwrite: bool) -> pl.DataFrame:
    """Write the weights and the leaderboard into a temporary folder, then move them into place:
    a failure or a kill while writing leaves ``out`` as it was. The leaderboard names each
    student's weights at their final path, as ``out`` was given. A student built by a model
    function records no architecture in its weights (it has no SPEC that could rebuild it).

    A new ``out`` is the temporary folder renamed (one atomic step). An existing one is never
    renamed or replaced itself (it may be the working directory, a mount point, or hold other
    files, as a demo workdir holds its teacher and cache): the temporary folder is made inside it,
    on the same file system, and the entries are swapped, the old leaderboard out first and the
    new one in last. At every moment a leaderboard in ``out`` names exactly the weights of its own
    run; a kill in between leaves no leaderboard, and the old results in the temporary folder.
    """
    target = out.resolve()
    fresh = not target.exists()
    home = target.parent if fresh else target
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}." if fresh else ".softcache-", suffix=".partial", dir=home))
    staged = work / "new"
    try:
        weights: list[str | None] = []
        for run, name in zip(runs, names):
            file = weights_file(name)
            spec = run.config.spec
            save_model(run.model, staged / file, None if callable(spec) else spec)
            weights.append(str(out / file))
        board = leaderboard(runs, names, scores, epochs, weights)
        board.write_parquet(staged / "leaderboard.parquet")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if fresh and not target.exists():
        os.replace(staged, target)
    else:  # (also when another process made ``out`` meanwhile)
        _swap_entries(staged, target, work / "old", overwrite)  # a failure here leaves ``work`` to recover from
    shutil.rmtree(work, ignore_errors=True)
    return board


def _swap_entries(staged: Path, out: Path, old: Path, overwrite: bool) -> None:
    """Move earlier results from ``out`` into ``old`` (leaderboard first), then the staged ones
    into ``out`` (leaderboard last); nothing else in ``out`` is touched."""
    previous = _refuse_previous(out, overwrite)  # again: another run may have finished meanwhile
    old.mkdir()
    for name in previous:
        os.replace(out / name, old / name)
    for name in reversed(RESULTS):
        os.replace(staged / name, out / name)
