"""One home per option: the config models behind build/synthesize/train, the flags made from
them (with every default in --help), the one student grid, the printed units, and a pipeline's
SPECs checked before its first stage."""

from __future__ import annotations

import re
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from softcache._cli.format import format_board, format_datafree, format_stats
from softcache._cli.main import build_parser, main
from softcache.config import TEMPERATURE, BuildConfig, BuildOptions, CacheOptions, StudentGrid, SynthCacheOptions
from softcache.errors import UsageError
from softcache.pipeline.config import CacheStage, SweepGrid, load_pipeline
from softcache.pipeline.run import run_pipeline
from softcache.teacher.build import build

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "pipelines" / "digits.toml"


def _option_help(command: str, flag: str) -> str:
    """The help block of one option in ``softcache COMMAND --help``, as one line."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
    block: list[str] = []
    for line in sub.format_help().split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            if block:
                break
            if line.split()[0] == flag:
                block.append(line)
        elif block:
            block.append(line)
    return " ".join(" ".join(block).split())


def test_train_help_shows_every_default() -> None:
    for flag, default in (("--alpha", "0.9"), ("--temperature", "4.0"), ("--lr", "0.01"), ("--epochs", "60"),
                          ("--batch-size", "64"), ("--seed", "0"), ("--loader", "auto"), ("--buffer-chunks", "4")):
        assert f"(default: {default})" in _option_help("train", flag), flag


@pytest.mark.parametrize("command, model", [("build", BuildConfig), ("synthesize", SynthCacheOptions)])
def test_stage1_flags_are_the_model_fields_with_their_defaults(command: str, model: type[CacheOptions]) -> None:
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
    flags = {a.dest: a for a in parser._actions}
    for name, field in model.model_fields.items():
        assert name in flags, f"{command}: no flag for {name}"
        assert flags[name].default == field.default
        if field.default is not None and field.default is not False:
            assert f"(default: {field.default})" in _option_help(command, flags[name].option_strings[0]), name
    assert "(default: 200)" in _option_help("synthesize", "--steps")  # synthesis flags come from SynthConfig too


def test_the_default_temperature_is_stated_once() -> None:
    assert BuildConfig().temperature == CacheStage().temperature == TEMPERATURE
    assert StudentGrid(spec=["softcache.models:mlp"]).temperature == [TEMPERATURE]
    assert SynthCacheOptions().temperature > TEMPERATURE  # synthesis's own default: confident logits want a higher T
    default = re.compile(r"(default=\[?4\.0|: float = 4\.0|^[A-Z_]+ = 4\.0)", re.M)
    found = [p for p in (REPO / "softcache").rglob("*.py") if default.search(p.read_text())]
    assert found == [REPO / "softcache" / "config.py"], found


def test_the_pipeline_cache_stage_is_the_build_options() -> None:
    assert issubclass(CacheStage, BuildOptions)
    assert set(CacheStage.model_fields) == set(BuildOptions.model_fields) | {"url"}
    assert SweepGrid is StudentGrid  # pipelines and `softcache train` make students with one grid


def test_a_misspelt_build_option_is_one_usage_error(tmp_path: Path) -> None:
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(UsageError, match=r"^build: tempreature: Extra inputs are not permitted"):
        build(teacher, "softcache.digits:load,split=test", str(tmp_path / "c.zarr"), tempreature=2.0)
    with pytest.raises(UsageError, match=r"storage 'topk:x': K must be a whole number"):
        build(teacher, "softcache.digits:load,split=test", str(tmp_path / "c.zarr"), storage="topk:x")
    with pytest.raises(UsageError, match="K=10 keeps all 10 of the teacher's classes"):
        build(teacher, "softcache.digits:load,split=test", str(tmp_path / "c.zarr"), storage="topk:10")
    assert not (tmp_path / "c.zarr").exists()


def test_a_config_and_keyword_options_combine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    config = BuildConfig(temperature=2.0, chunk_rows=64, dtype="float32")
    cache = build(teacher, "softcache.digits:load,split=test", str(tmp_path / "c.zarr"), config, chunk_rows=128,
                  progress=False)
    assert cache.temperature == 2.0 and cache.manifest.layout.chunk_rows == 128
    assert cache.manifest.storage.dtype == "float32"


def test_the_grid_drops_duplicate_hard_label_students() -> None:
    students = StudentGrid(spec=["softcache.models:mlp"], temperature=[2.0, 4.0], alpha=[0.0, 0.9],
                           seed=[0, 1]).expand()
    assert [(s.alpha, s.temperature, s.seed) for s in students] == [
        (0.0, 2.0, 0), (0.0, 2.0, 1), (0.9, 2.0, 0), (0.9, 2.0, 1), (0.9, 4.0, 0), (0.9, 4.0, 1)]


def test_printed_tables_say_percent_while_the_data_keeps_fractions() -> None:
    board = pl.DataFrame({"student": ["a"], "parameters": [10], "temperature": [4.0], "alpha": [0.9],
                          "label_smoothing": [0.0], "test_accuracy": [0.9849], "teacher_agreement": [0.5]})
    text = format_board(board)
    assert "test_accuracy %" in text and "teacher_agreement %" in text and "98.49" in text
    assert board["test_accuracy"][0] == 0.9849  # formatting never touches the data
    free = board.with_columns(inputs=pl.lit("noise"), views=pl.lit(1), relative_accuracy=pl.lit(0.99))
    assert "relative_accuracy %" in format_datafree(free)


def test_stats_shows_per_class_precision_and_overall_accuracy(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    url = str(tmp_path / "c.zarr")
    cache = build(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), "softcache.digits:load,split=test", url,
                  chunk_rows=200, progress=False)
    frame = cache.train.stats()
    assert main(["stats", url, "--quiet"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "prediction" in line)
    assert "precision" in header and "accuracy" not in header
    right = int(frame["correct"].sum())
    assert f"overall accuracy {100 * right / frame.height:.2f}% ({right} of {frame.height} labelled rows" in out
    one = frame.filter(pl.col("prediction") == frame["prediction"][0])
    assert format_stats(frame).count("\n") >= 3 and one["correct"].mean() == pytest.approx(
        float(one.filter(pl.col("label") == pl.col("prediction")).height / one.height))


@pytest.mark.parametrize("where, target, needle", [
    ("train.0.students.2.spec", "softcache.models:mpl", "has no attribute 'mpl'"),
    ("train.0.students.2.spec", "softcache.modles:mlp", "cannot import 'softcache.modles'"),
    ("data.eval", "softcache.digits:lod", "has no attribute 'lod'"),
    ("cache.augment", "softcache.augment:nope", "has no attribute 'nope'"),
])
def test_a_pipeline_checks_every_spec_before_its_first_stage(tmp_path: Path, where: str, target: str,
                                                            needle: str) -> None:
    key = {"train.0.students.2.spec": 'train.0.students.2.spec="' + target + '"',
           "data.eval": f'data.eval="{target}"', "cache.augment": f'cache.augment="{target}"'}[where]
    cfg = load_pipeline(DIGITS, [f"workdir={tmp_path}", key])
    start = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        run_pipeline(cfg, progress=False)
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert where in message and target in message and needle in message and "\n" not in message
    assert not any(tmp_path.iterdir()), "a stage ran before the SPECs were checked"


def test_the_cli_reports_a_pipeline_spec_typo_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(DIGITS), "--set", f"workdir={tmp_path}", "--set",
                 'train.0.students.0.spec="softcache.models:mpl"', "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "train.0.students.0.spec" in err and not any(tmp_path.iterdir())


def test_the_demo_and_the_pipeline_share_one_teacher_recipe() -> None:
    import softcache.demo as demo
    import softcache.pipeline as pipeline
    from softcache.teacher import fit

    assert demo.train_teacher is fit.train_teacher and demo.TEACHER_SPEC == fit.TEACHER_SPEC
    assert callable(pipeline.digits_teacher)
