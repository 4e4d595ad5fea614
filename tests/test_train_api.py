"""``train`` from Python: the result object, students given as live functions, and evaluation on
a test set of the user's choosing (CLI too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from softcache.cache.store import Cache
from softcache.config import StudentConfig, TrainConfig
from softcache.digits import load
from softcache.errors import UsageError
from softcache.models import mlp
from softcache.weights import predict
from softcache.student.train import TrainResult, train
from softcache.weights import load_model

QUICK = TrainConfig(epochs=2, batch_size=128)
MLP = "softcache.models:mlp,hidden=16"
OTHER_TEST = "softcache.digits:load,split=test,seed=1"
"""Another held-out set of the same length as the cache's own: the fingerprint tells them apart."""


def small_mlp() -> nn.Module:
    return mlp(hidden=16)


def test_the_result_holds_the_leaderboard_and_the_trained_models(cache: Cache, tmp_path: Path) -> None:
    result = train(cache, [MLP, StudentConfig(spec=MLP, alpha=0.0)], config=QUICK, progress=False, out_dir=tmp_path)
    assert isinstance(result, TrainResult) and result.out == tmp_path
    board = result.leaderboard
    assert sorted(result.models) == sorted(board["student"].to_list())
    test = load("test")
    for row in board.iter_rows(named=True):
        model = result.models[row["student"]]
        accuracy = float((predict(model, test.inputs) == test.labels).float().mean())
        assert accuracy == pytest.approx(row["test_accuracy"])
        reloaded = load_model(row["weights"])
        assert torch.equal(predict(reloaded, test.inputs), predict(model, test.inputs))
    assert set(result.seconds) == {"prepare", "train", "evaluate", "write"}
    assert pl.read_parquet(tmp_path / "leaderboard.parquet").equals(board)


def test_a_student_given_as_a_function_trains_like_its_spec(cache: Cache, tmp_path: Path) -> None:
    by_spec = train(cache, MLP, config=QUICK, progress=False).leaderboard
    result = train(cache, [small_mlp, StudentConfig(spec=small_mlp, alpha=0.0, name="hard")], config=QUICK,
                   progress=False, out_dir=tmp_path)
    board = result.leaderboard.sort("alpha", descending=True)
    assert board["spec"].to_list() == [f"{__name__}:small_mlp"] * 2
    assert board["student"].to_list()[1] == "hard"
    # the same initial weights (seeded) and the same batches: the same student as the SPEC's
    assert board["final_loss"][0] == pytest.approx(by_spec["final_loss"][0], rel=1e-5)
    weights = board["weights"][0]
    with pytest.raises(UsageError, match="no 'softcache.arch'"):
        load_model(weights)  # a function has no SPEC to record
    rebuilt = load_model(weights, arch=MLP)
    test = load("test").inputs
    assert torch.equal(predict(rebuilt, test), predict(result.models[board["student"][0]], test))


def test_a_function_that_returns_no_module_is_refused_in_one_line(cache: Cache) -> None:
    with pytest.raises(UsageError, match=r"student .*<lambda> returned int, not a torch.nn.Module"):
        train(cache, [lambda: 3], config=QUICK, progress=False)
    with pytest.raises(UsageError, match="not float"):
        train(cache, [MLP, 1.5], config=QUICK, progress=False)  # type: ignore[list-item]


def test_another_test_set_is_accepted_and_has_no_teacher_agreement(cache: Cache) -> None:
    own = train(cache, [MLP], config=QUICK, progress=False).leaderboard
    result = train(cache, [MLP], eval_data=OTHER_TEST, config=QUICK, progress=False)
    other = result.leaderboard
    smaller = train(cache, [MLP], eval_data="softcache.digits:load,split=test,test_size=300", config=QUICK,
                    progress=False).leaderboard
    named_own = train(cache, [MLP], eval_data="softcache.digits:load,split=test", config=QUICK,
                      progress=False).leaderboard
    assert own["teacher_agreement"][0] is not None and own["test_accuracy"][0] is not None
    assert named_own.select("test_accuracy", "teacher_agreement").equals(own.select("test_accuracy", "teacher_agreement"))
    for board in (other, smaller):
        assert board["teacher_agreement"][0] is None and board["test_accuracy"][0] is not None
    test = load("test", seed=1)  # the accuracy is the one on the rows given
    model = result.models[other["student"][0]]
    assert other["test_accuracy"][0] == pytest.approx(float((predict(model, test.inputs) == test.labels).float().mean()))


def test_another_test_set_from_the_cli(cache: Cache, tmp_path: Path) -> None:
    def board(eval_data: str, out: str) -> dict[str, object]:
        proc = subprocess.run([sys.executable, "-m", "softcache", "train", "--cache", cache.url, "--student", MLP,
                               "--epochs", "1", "--eval-data", eval_data, "--out", str(tmp_path / out), "--json",
                               "--quiet"], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "SOFTCACHE_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["leaderboard"][0]

    other = board(OTHER_TEST, "other")
    assert other["teacher_agreement"] is None and other["test_accuracy"] is not None
    own = board("softcache.digits:load,split=test", "own")
    assert own["teacher_agreement"] is not None
