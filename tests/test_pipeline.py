"""Declarative pipelines (`softcache run`), the shipped pipeline files and scripts, and progress
output for batch jobs."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from batchkit import REPO, cli, cli_env, main

from softcache.cache import store
from softcache.cache.shards import TargetMismatch
from softcache.errors import UsageError
from softcache.pipeline.config import PipelineConfig, SweepGrid, apply_set, load_pipeline
from softcache.pipeline.run import run_pipeline, select_stages
from softcache.progress import Progress
from softcache.schemas import render
from softcache.cache.check import validate

PIPELINES = sorted((REPO / "pipelines").glob("*.toml"))
DIGITS = REPO / "pipelines" / "digits.toml"
FAST = ["teacher.make.kwargs.epochs=2", "train.*.epochs=1", "cache.chunk_rows=200"]
"""Overrides that keep the shipped digits pipeline to a few seconds: 6 + 3 shards."""


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_validate_against_the_model_and_the_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    cfg = load_pipeline(path)
    assert cfg.train and all(stage.all_students() for stage in cfg.train)
    schema = json.loads((REPO / "schemas" / "pipeline.schema.json").read_text())
    jsonschema.validate(_toml(path), schema)  # what another team's validator would do


def test_pipeline_schema_file_matches_the_model() -> None:
    assert (REPO / "schemas" / "pipeline.schema.json").read_text() == render(PipelineConfig)


def test_set_overrides_edit_the_file_before_validation() -> None:
    data: dict[str, Any] = {"cache": {"temperature": 4.0}, "train": [{"epochs": 60}, {"epochs": 60}]}
    for text in ("cache.temperature=8", "train.*.epochs=2", "train.1.batch_size=16", "workdir=/tmp/run x",
                 "teacher.make.kwargs.epochs=3", 'name="quoted"', "train.0.sweep.seed=[0, 1]", "cache.overwrite=true"):
        apply_set(data, text)
    assert data["cache"] == {"temperature": 8, "overwrite": True}
    assert data["train"] == [{"epochs": 2, "sweep": {"seed": [0, 1]}}, {"epochs": 2, "batch_size": 16}]
    assert data["workdir"] == "/tmp/run x" and data["name"] == "quoted"
    assert data["teacher"] == {"make": {"kwargs": {"epochs": 3}}}
    for bad in ("noequals", "=3", "train.5.epochs=1", "train.x.epochs=1", "cache.temperature.deeper=1"):
        with pytest.raises(UsageError):
            apply_set(data, bad)


def test_invalid_pipelines_are_one_line_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DIGITS.read_text().replace("temperature = 4.0", "temprature = 4.0", 1))
    with pytest.raises(UsageError, match=r"cache\.temprature: Extra inputs are not permitted"):
        load_pipeline(bad)
    run = main("run", str(bad))
    assert run.returncode == 2
    assert run.stderr.startswith("softcache: error:") and run.stderr.count("\n") == 1
    with pytest.raises(UsageError, match=r"train\.0\.epochs"):
        load_pipeline(DIGITS, ["train.0.epochs=0"])
    with pytest.raises(UsageError, match="no such stage"):
        select_stages(load_pipeline(DIGITS), "train:nope")


def test_a_sweep_is_every_combination_and_alpha_zero_ignores_temperature() -> None:
    grid = SweepGrid.model_validate({"spec": ["softcache.models:mlp", "softcache.models:tiny_cnn"],
                                     "temperature": [2.0, 4.0, 8.0], "alpha": [0.0, 0.9], "seed": [0, 1]})
    students = grid.expand()
    assert len(students) == 2 * (1 + 3) * 2  # per spec and seed: one hard-label student, three distilled
    assert len({s.model_dump_json() for s in students}) == len(students)
    assert {s.temperature for s in students if s.alpha == 0} == {2.0}


def _digits(workdir: Path, *sets: str) -> PipelineConfig:
    return load_pipeline(DIGITS, [f"workdir={workdir}", *FAST, *sets])


def _statuses(results: list[Any]) -> dict[str, str]:
    return {r.stage: r.status for r in results}


def test_a_rerun_does_only_what_is_missing(tmp_path: Path) -> None:
    cfg = _digits(tmp_path)
    first = run_pipeline(cfg, progress=False)
    assert _statuses(first) == {"teacher": "ran", "build": "ran", "train:demo": "ran"}
    assert first[0].detail["made"]["test_accuracy"] > 0.3
    assert len(first[2].detail["leaderboard"]) == 7
    teacher_mtime = (tmp_path / "teacher.safetensors").stat().st_mtime_ns

    assert _statuses(run_pipeline(cfg, progress=False)) == {"teacher": "skipped", "build": "skipped",
                                                            "train:demo": "skipped"}
    assert (tmp_path / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    (tmp_path / "demo" / "stage.json").unlink()  # as if training died before it finished
    assert _statuses(run_pipeline(cfg, progress=False))["train:demo"] == "ran"
    assert _statuses(run_pipeline(_digits(tmp_path, "train.0.epochs=2"), progress=False))["train:demo"] == "ran"

    other = _digits(tmp_path, "cache.temperature=2")  # another cache key at the same URL
    with pytest.raises(TargetMismatch, match="different cache"):
        run_pipeline(other, only="build", progress=False)
    replaced = run_pipeline(_digits(tmp_path, "cache.temperature=2", "cache.overwrite=true"), progress=False)
    assert _statuses(replaced) == {"teacher": "skipped", "build": "ran", "train:demo": "ran"}
    assert replaced[1].detail["replaced_other_cache"] is True
    assert store.open_cache(str(tmp_path / "cache.zarr")).temperature == 2.0


def test_a_build_stopped_half_way_is_resumed_by_the_next_run(tmp_path: Path) -> None:
    cfg = _digits(tmp_path)
    assert _statuses(run_pipeline(cfg, only="teacher", progress=False))["teacher"] == "ran"
    partial = run_pipeline(cfg, shard="0/2", progress=False)  # one job-array task, the other never ran
    assert _statuses(partial) == {"teacher": "skipped", "build": "ran", "train:demo": "excluded"}
    assert partial[1].detail["complete"] is False

    rest = run_pipeline(cfg, progress=False)
    assert _statuses(rest) == {"teacher": "skipped", "build": "resumed", "train:demo": "ran"}
    report = rest[1].detail["report"]
    assert report["units_written"] == ["train:1", "train:3", "train:5", "eval:1"] and report["units_skipped"] == 5
    assert validate(str(tmp_path / "cache.zarr"), deep=True)["valid"]


def test_sharded_runs_need_the_teacher_first(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--only teacher"):
        run_pipeline(_digits(tmp_path), shard="1/2", progress=False)


def test_run_json_summary_from_the_command_line(tmp_path: Path) -> None:
    sets = [f"workdir={tmp_path}", *FAST, "train.*.sweep.seed=[0]", "train.*.sweep.temperature=[4.0]",
            "train.0.sweep.spec=['softcache.models:mlp,hidden=16']", "train.0.sweep.alpha=[0.0, 0.9]"]
    args = ["run", "pipelines/sweep.toml", "--only", "teacher,build,train:mlp", "--json", "--quiet"]
    run = cli(*args, *[x for s in sets for x in ("--set", s)])
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["pipeline"] == "digits-sweep" and summary["ran"] == ["teacher", "build", "train:mlp"]
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["train:cnn"]["status"] == stages["train:smoothing"]["status"] == "excluded"
    board = stages["train:mlp"]["leaderboard"]
    assert {row["alpha"] for row in board} == {0.0, 0.9} and len(board) == 2
    assert Path(stages["train:mlp"]["output"], "leaderboard.parquet").is_file()
    assert stages["build"]["report"]["complete"] is True


def test_job_array_script_builds_one_cache_from_concurrent_tasks(tmp_path: Path) -> None:
    sets = [f"workdir={tmp_path}", *FAST]
    run_pipeline(load_pipeline(DIGITS, sets), only="teacher", progress=False)
    env = cli_env(SOFTCACHE="python -m softcache", TASKS="2")
    args = ["bash", "pipelines/jobarray.sh", "pipelines/digits.toml", "--quiet", *[x for s in sets for x in ("--set", s)]]
    tasks = [subprocess.Popen(args, cwd=REPO, env={**env, "TASK": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [t.communicate(timeout=240) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], [err for _, err in outputs]
    reports = [next(s for s in json.loads(out)["stages"] if s["stage"] == "build")["report"] for out, _ in outputs]
    assert [r["shard"] for r in reports] == ["0/2", "1/2"]
    written = [u for r in reports for u in r["units_written"]]
    assert len(written) == len(set(written)) == 9
    assert store.open_cache(str(tmp_path / "cache.zarr")).complete  # the last task finalized it
    assert validate(str(tmp_path / "cache.zarr"), deep=True)["valid"]


def test_progress_logs_rate_and_eta_off_a_terminal_and_draws_a_bar_on_one() -> None:
    log = io.StringIO()
    with Progress(total=100, desc="build", unit="rows", stream=log, interval_s=0.0) as bar:
        bar.update(40)
        bar.update(60)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("softcache: build: 40/100 rows (") and "rows/s, eta" in lines[0]
    assert lines[-1].startswith("softcache: build: done, 100/100 rows in ")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with Progress(total=10, desc="train", unit="steps", stream=tty) as bar:
        bar.update(10)
    drawn = tty.getvalue()
    assert "train:" in drawn and "/10 [" in drawn and "\r" in drawn  # a redrawn bar ...
    assert "softcache: train:" not in drawn  # ... and no log lines

    quiet = io.StringIO()
    with Progress(total=10, desc="x", enabled=False, stream=quiet, interval_s=0.0) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_progress_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTCACHE_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    with Progress(total=10, desc="build", stream=log) as bar:
        bar.update(5)
        assert log.getvalue() == ""  # no periodic line within the hour
    assert log.getvalue().startswith("softcache: build: done, 5/10 it in ")
