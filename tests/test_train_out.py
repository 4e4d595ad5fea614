"""Results are written atomically and never silently replace work: ``train --out DIR`` refuses
earlier results without ``--overwrite``, weights and leaderboard appear together or not at all,
and a results folder inside a cache is refused."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from softcache.teacher.build import build
from softcache.config import StudentConfig, TrainConfig
from softcache.digits import LabelledTensors, load
from softcache.errors import UsageError
from softcache.student.train import train

MODULE = importlib.import_module("softcache.student.train")  # the package exports a function of that name
RESULTS = importlib.import_module("softcache.student._results")  # where the results folder is written
QUICK = TrainConfig(epochs=1, batch_size=64)


def students(tag: str, count: int = 2) -> list[StudentConfig]:
    """Named by run, so the files of two runs can never be confused."""
    return [StudentConfig(spec="softcache.models:mlp,hidden=8", name=f"{tag}-{i}", seed=i) for i in range(count)]


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    full = load("train")
    data = LabelledTensors(full.inputs[:256], full.labels[:256], None, {"rows": 256})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("out") / "cache.zarr"
    build(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), data, str(out), chunk_rows=64, store_inputs=True,
          progress=False)
    return str(out)


def run(cache_url: str, out: Path, tag: str, **kwargs: object) -> pl.DataFrame:
    return train(cache_url, students(tag, kwargs.pop("count", 2)), out_dir=out, config=QUICK,  # type: ignore[arg-type]
                 progress=False, **kwargs).leaderboard  # type: ignore[arg-type]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_of(out: Path) -> str | None:
    """Which run the results in ``out`` belong to; fails on a mix of two runs or a half-written one."""
    board_path, weights = out / "leaderboard.parquet", out / "students"
    if not board_path.exists():
        return None  # no leaderboard: nothing names any weights (a crash mid-move may leave some)
    board = pl.read_parquet(board_path)
    tags = {name.split("-")[0] for name in board["student"]}
    files = sorted(p.name for p in weights.iterdir())
    assert len(tags) == 1, board
    assert files == sorted(Path(w).name for w in board["weights"]), (files, board["weights"].to_list())
    assert all(Path(w).is_file() for w in board["weights"])
    return tags.pop()


def leftovers(folder: Path) -> list[str]:
    """Temporary folders left behind, beside the results or inside them."""
    return sorted(str(p) for p in folder.rglob("*.partial"))


def test_earlier_results_are_refused_without_overwrite_and_replaced_with_it(cache_url: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results"
    run(cache_url, out, "old", count=3)
    before = snapshot(out)
    with monkeypatch.context() as patch:
        patch.setattr(MODULE, "fit", lambda *a, **k: pytest.fail("trained although the output was refused"))
        with pytest.raises(UsageError, match="--overwrite"):
            run(cache_url, out, "new")
    assert snapshot(out) == before
    board = run(cache_url, out, "new", overwrite=True)
    assert run_of(out) == "new" and len(list((out / "students").iterdir())) == 2  # the old run's third file is gone
    assert board["weights"].to_list() == pl.read_parquet(out / "leaderboard.parquet")["weights"].to_list()
    assert leftovers(tmp_path) == []


def test_an_empty_folder_and_a_missing_one_are_fine(cache_url: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run(cache_url, tmp_path / "empty", "a")
    run(cache_url, tmp_path / "deeper" / "missing", "b")
    assert run_of(tmp_path / "empty") == "a" and run_of(tmp_path / "deeper" / "missing") == "b"


@pytest.mark.parametrize("where", ["weights", "leaderboard"])
@pytest.mark.parametrize("earlier", [True, False])
def test_a_failure_while_writing_leaves_the_folder_as_it_was(cache_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, where: str,
                                                               earlier: bool) -> None:
    """Between the first weights and the leaderboard nothing reaches ``out``."""
    out = tmp_path / "results"
    if earlier:
        run(cache_url, out, "old")
    before = snapshot(out) if earlier else None
    if where == "weights":
        real, calls = RESULTS.save_model, []

        def save_model(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return real(*args, **kwargs)

        monkeypatch.setattr(RESULTS, "save_model", save_model)
    else:
        monkeypatch.setattr(RESULTS, "leaderboard", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run(cache_url, out, "new", overwrite=True)
    if earlier:
        assert snapshot(out) == before and run_of(out) == "old"
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("folder", ["new", "results-only", "beside-other-files"])
@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_a_crash_while_moving_into_place_leaves_old_or_new_never_a_mix(cache_url: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         folder: str, step: int) -> None:
    """Each rename of the commit fails in turn (as a kill there would stop it): ``out`` then holds
    the old results, the new ones, or no leaderboard, and a leaderboard names only its own run's
    weights. Other files in the folder are never touched."""
    out = tmp_path / "results"
    if folder != "new":
        run(cache_url, out, "old", count=3)
    beside = folder == "beside-other-files"
    if beside:
        (out / "notes.txt").write_text("mine")
    real, calls = os.replace, []

    def replace(src: object, dst: object) -> None:
        if str(tmp_path) in str(src):
            calls.append(1)
            if len(calls) == step + 1:
                raise OSError("killed")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(RESULTS.os, "replace", replace)
    try:
        run(cache_url, out, "new", overwrite=True)
        finished = True
    except OSError:
        finished = False
    monkeypatch.undo()
    assert finished == (len(calls) <= step)
    state = run_of(out) if out.exists() else None
    assert state in ({"new"} if finished else {"old", None} if folder != "new" else {None})
    if finished:
        assert leftovers(tmp_path) == []
    if beside:
        assert (out / "notes.txt").read_text() == "mine"


def test_results_beside_other_files(cache_url: str, tmp_path: Path) -> None:
    """A workdir that also holds a teacher and a cache (as the demo's does) keeps them."""
    (tmp_path / "teacher.safetensors").write_bytes(b"weights")
    (tmp_path / "notes").mkdir()
    run(cache_url, tmp_path, "old")
    with pytest.raises(UsageError, match="earlier run"):
        run(cache_url, tmp_path, "new")
    run(cache_url, tmp_path, "new", overwrite=True)
    assert run_of(tmp_path) == "new"
    assert (tmp_path / "teacher.safetensors").read_bytes() == b"weights" and (tmp_path / "notes").is_dir()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("inside", ["", "results", "eval/results", "soft_labels/deeper"])
def test_results_inside_a_cache_are_refused(cache_url: str, tmp_path: Path, inside: str) -> None:
    target = Path(cache_url) / inside if inside else Path(cache_url)
    before = snapshot(Path(cache_url))
    with pytest.raises(UsageError, match="inside the cache"):
        run(cache_url, target, "x", overwrite=True)
    assert snapshot(Path(cache_url)) == before


def test_the_cli_refuses_in_one_line_with_exit_2_then_overwrites(cache_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    run(cache_url, out, "old")
    args = [sys.executable, "-m", "softcache", "train", "--cache", cache_url, "--student",
            "softcache.models:mlp,hidden=8", "--epochs", "1", "--out", str(out), "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0], proc.stderr
    assert run_of(out) == "old"
    proc = subprocess.run([*args, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(out / "leaderboard.parquet")["student"].to_list() == ["mlp(hidden=8) kd T=4 a=0.9 s0"]
