"""Declarative pipelines (`softcache run`), the shipped pipeline files and scripts, and progress
output for batch jobs. The stage machinery runs for either row kind (``kind``): the digits
pipeline, and the language-model pipeline (pipelines/lm.toml) over ``tests/lmkit.py`` rows."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from batchkit import REPO, SAMPLE, Kind, cli, cli_env, kind, main, reference, teacher_file  # noqa: F401 - fixtures

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
FAST = list(SAMPLE.pipeline_sets)
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


def _statuses(results: list[Any]) -> dict[str, str]:
    return {r.stage: r.status for r in results}


def _trained(cfg: PipelineConfig) -> str:
    """The name of the pipeline's (first) train stage."""
    return f"train:{cfg.train[0].name}"


def test_a_rerun_does_only_what_is_missing(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    cfg = kind.pipeline_config(tmp_path)
    train = _trained(cfg)
    first = run_pipeline(cfg, progress=False)
    assert _statuses(first) == {"teacher": "ran", "build": "ran", train: "ran"}
    made = first[0].detail["made"]
    assert made["test_accuracy"] > 0.3 if kind.name == "sample" else made["bits_per_token"] < 6.0  # < log2(64): learned
    board = first[2].detail["leaderboard"]
    assert len(board) == len(cfg.train[0].all_students()) == (7 if kind.name == "sample" else 2)
    assert all(row[kind.score] is not None for row in board)
    scores = [row[kind.score] for row in board]
    assert scores == sorted(scores, reverse=kind.name == "sample")  # best first: accuracy down, bits per token up
    teacher_mtime = (tmp_path / "teacher.safetensors").stat().st_mtime_ns

    assert _statuses(run_pipeline(cfg, progress=False)) == {"teacher": "skipped", "build": "skipped", train: "skipped"}
    assert (tmp_path / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    (Path(cfg.path(cfg.train[0].out or cfg.train[0].name)) / "stage.json").unlink()  # training died before it finished
    assert _statuses(run_pipeline(cfg, progress=False))[train] == "ran"
    assert _statuses(run_pipeline(kind.pipeline_config(tmp_path, "train.0.epochs=2"), progress=False))[train] == "ran"

    other = kind.pipeline_config(tmp_path, "cache.dtype=float32")  # another cache key at the same URL
    with pytest.raises(TargetMismatch, match="different cache"):
        run_pipeline(other, only="build", progress=False)
    replaced = run_pipeline(kind.pipeline_config(tmp_path, "cache.dtype=float32", "cache.overwrite=true"),
                            progress=False)
    assert _statuses(replaced) == {"teacher": "skipped", "build": "ran", train: "ran"}
    assert replaced[1].detail["replaced_other_cache"] is True
    assert store.open_cache(str(tmp_path / "cache.zarr")).manifest.storage.dtype == "float32"


def test_a_build_stopped_half_way_is_resumed_by_the_next_run(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    cfg = kind.pipeline_config(tmp_path)
    train = _trained(cfg)
    assert _statuses(run_pipeline(cfg, only="teacher", progress=False))["teacher"] == "ran"
    partial = run_pipeline(cfg, shard="0/2", progress=False)  # one job-array task, the other never ran
    assert _statuses(partial) == {"teacher": "skipped", "build": "ran", train: "excluded"}
    assert partial[1].detail["complete"] is False

    rest = run_pipeline(cfg, progress=False)
    assert _statuses(rest) == {"teacher": "skipped", "build": "resumed", train: "ran"}
    report = rest[1].detail["report"]
    assert report["units_written"] == ["train:1", "train:3", "train:5", "eval:1"] and report["units_skipped"] == 5
    assert kind.validate(tmp_path / "cache.zarr")["valid"]


def test_sharded_runs_need_the_teacher_first(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    with pytest.raises(UsageError, match="--only teacher"):
        run_pipeline(kind.pipeline_config(tmp_path), shard="1/2", progress=False)


def test_workdir_in_a_spec_stands_for_the_absolute_workdir(tmp_path: Path) -> None:
    cfg = load_pipeline(REPO / "pipelines" / "lm.toml", [f"workdir={tmp_path / 'w'}"])
    assert cfg.data is not None and "{workdir}" in str(cfg.data.train)  # kept as written until a stage runs it
    data = cfg.spec(cfg.data.train)
    assert data is not None and data.kwargs["tokenizer"] == str(tmp_path / "w" / "tokenizer.json")
    make = cfg.spec(cfg.teacher.make)
    assert make is not None and make.kwargs["tokenizer"] == str(tmp_path / "w" / "tokenizer.json")
    assert make.kwargs["data"].startswith(f"softcache.text:stdlib_rows,tokenizer={tmp_path / 'w'}/tokenizer.json,")
    assert cfg.spec(None) is None


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
