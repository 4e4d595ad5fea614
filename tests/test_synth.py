"""Data-free caches: inputs made from the teacher alone, trained on without any dataset."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from softcache._cli.main import main
from softcache.config import StudentConfig, TrainConfig
from softcache.demo import EVAL_SPEC, run_datafree_demo
from softcache.errors import UsageError
from softcache.models import tiny_cnn
from softcache.weights import load_model
from softcache.cache.store import open_cache
from softcache.teacher.synth import (
    SynthConfig,
    SynthWarning,
    _Probes,
    balanced_targets,
    invert_batch,
    synthesize,
    synthesize_inputs,
)
from softcache.student.train import train
from softcache.cache.check import validate

SHAPE = [1, 8, 8]
SMALL = SynthConfig(steps=60, batch_size=100, input_range=(0.0, 1.0))


def _bn_distance(teacher: torch.nn.Module, x: torch.Tensor) -> float:
    probes = _Probes(teacher, first_bn_weight=1.0)
    with torch.no_grad():
        teacher(x)
    probes.close()
    return float(torch.stack(probes.bn_losses).sum())


@pytest.fixture(scope="module")
def teacher(teacher_path) -> torch.nn.Module:
    return load_model(str(teacher_path)).eval()


def test_inversion_matches_batchnorm_statistics_and_hits_its_targets(teacher):
    targets = balanced_targets(100, 10, seed=0)
    start = torch.Generator().manual_seed(3)
    noise = torch.randn((100, *SHAPE), generator=start).clamp(0, 1)
    x = invert_batch(teacher, targets, SHAPE, SMALL, seed=3, device=torch.device("cpu"))
    assert x.min() >= 0 and x.max() <= 1  # the input range is respected
    assert _bn_distance(teacher, x) < 0.5 * _bn_distance(teacher, noise)
    with torch.no_grad():
        hit = (teacher(x).argmax(-1) == targets).float().mean()
    assert hit > 0.9


def test_targets_are_class_balanced_and_runs_are_seeded(teacher):
    counts = torch.bincount(balanced_targets(1003, 10, seed=1), minlength=10)
    assert counts.max() - counts.min() <= 1
    cfg = SynthConfig(steps=3, batch_size=20)
    run = lambda seed: torch.cat([x for x, _ in synthesize_inputs(teacher, 30, SHAPE, 10, cfg, seed,  # noqa: E731
                                                                   torch.device("cpu"), progress=False)])
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (30, *SHAPE) and torch.equal(a, b) and not torch.equal(a, c)


def test_synthesized_cache_trains_without_data_and_beats_noise(tmp_path, teacher_path):
    """The meaningful check: a student distilled on a small DeepInversion set is far better on
    the real test split than one distilled on teacher-labelled noise of the same size."""
    common = {"samples": 400, "input_shape": SHAPE, "eval_data": EVAL_SPEC, "progress": False,
              "views": 2, "augment": "softcache.augment:compose,shift=1,cutmix=1.0"}
    inverted = synthesize(str(teacher_path), str(tmp_path / "di.zarr"), config=SMALL, **common)
    noise = synthesize(str(teacher_path), str(tmp_path / "noise.zarr"),
                       config=SynthConfig(method="noise", input_range=(0.0, 1.0)), **common)
    students = [StudentConfig(spec="softcache.models:tiny_cnn", temperature=8.0, alpha=1.0)]
    cfg = TrainConfig(epochs=40)
    acc = {}
    for name, result in (("di", inverted), ("noise", noise)):
        board = train(result.cache, students, config=cfg, progress=False).leaderboard  # no data given: stored inputs
        acc[name] = board["test_accuracy"][0]
        assert board["teacher_agreement"][0] is not None  # the eval split holds the teacher's outputs
    assert acc["di"] > 0.6 and acc["di"] > acc["noise"] + 0.15, acc


def test_manifest_records_the_synthesis_instead_of_a_dataset(tmp_path, teacher_path):
    url = str(tmp_path / "c.zarr")
    result = synthesize(str(teacher_path), url, samples=50, input_shape=SHAPE, seed=4, eval_data=EVAL_SPEC,
                        config=SynthConfig(steps=2, batch_size=25), temperature=8.0, progress=False)
    cache = open_cache(url)
    src = cache.manifest.source
    assert src.kind == "synthesis" and src.method == "deepinversion" and src.seed == 4 and src.num_samples == 50
    assert src.params["steps"] == 2 and src.params["input_shape"] == SHAPE and "fallback" not in src.params
    assert cache.train.inputs().shape == (50, *SHAPE)
    assert not cache.eval.has_inputs  # the real held-out inputs never enter a data-free cache
    assert cache.temperature == 8.0 and not result.fallback
    assert validate(url, deep=True)["valid"]


def test_teacher_without_batchnorm_falls_back_with_a_warning(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(SynthWarning, match="no BatchNorm layers"):
        result = synthesize(tiny_cnn(), str(tmp_path / "c.zarr"), samples=20, input_shape=SHAPE,
                            config=SynthConfig(steps=2, batch_size=10), progress=False)
    assert result.fallback and "fallback" in result.cache.manifest.source.params


def test_reuse_inputs_relabels_without_synthesizing_again(tmp_path, teacher_path):
    first = synthesize(str(teacher_path), str(tmp_path / "a.zarr"), samples=40, input_shape=SHAPE,
                       config=SynthConfig(steps=2, batch_size=20), progress=False)
    again = synthesize(str(teacher_path), str(tmp_path / "b.zarr"), reuse_inputs=first.cache.url, views=3,
                       augment="softcache.augment:shift", progress=False)
    assert (again.cache.train.inputs() == first.cache.train.inputs()).all()
    assert again.cache.manifest.source == first.cache.manifest.source and again.seconds == 0
    assert again.cache.manifest.views.count == 3
    torch.manual_seed(1)
    with pytest.raises(UsageError, match="another teacher"):
        synthesize(load_model("softcache.models:teacher_cnn"), str(tmp_path / "c.zarr"), reuse_inputs=first.cache.url,
                   progress=False)


def test_existing_output_is_refused_before_synthesis(tmp_path, teacher_path):
    synthesize(str(teacher_path), str(tmp_path / "a.zarr"), samples=10, input_shape=SHAPE,
               config=SynthConfig(method="noise"), progress=False)
    with pytest.raises(UsageError, match="--overwrite"):
        synthesize(str(teacher_path), str(tmp_path / "a.zarr"), samples=10, input_shape=SHAPE, progress=False)


def test_cli_synthesize_then_train_without_a_dataset(tmp_path, teacher_path, capsys):
    url = str(tmp_path / "c.zarr")
    code = main(["synthesize", "--teacher", str(teacher_path), "--out", url, "--samples", "60",
                 "--input-shape", "1,8,8",
                 "--steps", "3", "--batch-size", "30", "--input-range", "0,1", "--seed", "2", "--views", "2",
                 "--augment", "softcache.augment:compose,shift=1", "--json", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 60 and summary["views"] == 2 and summary["method"] == "deepinversion"
    assert open_cache(url).manifest.source.params["input_range"] == [0.0, 1.0]
    code = main(["train", "--cache", url, "--student", "softcache.models:mlp,hidden=16", "--eval-data", EVAL_SPEC,
                 "--epochs", "2", "--out", str(tmp_path / "run"), "--json", "--quiet"])
    assert code == 0, capsys.readouterr().err
    board = json.loads(capsys.readouterr().out)["leaderboard"]
    assert board[0]["test_accuracy"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--samples", "10"], "needs --samples N and --input-shape"),
    (["--samples", "10", "--input-shape", "1,8,8", "--steps", "-1"], "steps"),
    (["--samples", "10", "--input-shape", "1,8,8", "--input-range", "1,0"], "input_range"),
])
def test_cli_synthesize_usage_errors(tmp_path, teacher_path, capsys, argv, message):
    code = main(["synthesize", "--teacher", str(teacher_path), "--out", str(tmp_path / "c.zarr"), *argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("softcache: error:") and message in err[0]


def test_cli_warns_in_one_line_for_a_teacher_without_batchnorm(tmp_path, capsys):
    code = main(["synthesize", "--teacher", "softcache.models:tiny_cnn", "--out", str(tmp_path / "c.zarr"),
                 "--samples", "10", "--input-shape", "1,8,8", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and any(line.startswith("softcache: warning: teacher has no BatchNorm layers") for line in err)


def test_datafree_demo_writes_a_leaderboard_with_teacher_accuracy(tmp_path):
    board, teacher_acc = run_datafree_demo(tmp_path / "demo", samples=60, steps=2, progress=False)
    saved = pl.read_parquet(tmp_path / "demo" / "leaderboard.parquet")
    assert saved.height == board.height == 9  # 3 students x (inversion, one view, noise)
    assert {"test_accuracy", "teacher_accuracy", "inputs", "views", "synthesis_seconds"} <= set(saved.columns)
    assert (saved["teacher_accuracy"] == teacher_acc).all() and teacher_acc > 0.9
    assert set(saved["inputs"]) == {"deepinversion", "deepinversion-1view", "noise"}


def test_skip_existing_returns_the_same_cache_without_synthesizing(tmp_path, teacher_path):
    url = str(tmp_path / "c.zarr")
    kwargs = {"samples": 30, "input_shape": SHAPE, "config": SynthConfig(steps=2, batch_size=15), "progress": False}
    first = synthesize(str(teacher_path), url, **kwargs)
    again = synthesize(str(teacher_path), url, skip_existing=True, **kwargs)
    assert again.skipped and not first.skipped and again.cache.manifest.cache_key == first.cache.manifest.cache_key
    kwargs["config"] = SynthConfig(steps=3, batch_size=15)  # another synthesis: not this cache
    with pytest.raises(UsageError, match="--overwrite"):
        synthesize(str(teacher_path), url, skip_existing=True, **kwargs)
