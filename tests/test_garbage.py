"""Garbage does not train: a cache whose soft labels, temperature or labels cannot be right stops
``train`` with one line and exit 1 before any student takes a step."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from softcache.teacher.build import build
from softcache.config import StudentConfig, TrainConfig
from softcache.digits import LabelledTensors, load
from softcache.errors import CacheError
from softcache.student._checks import TEMPERATURE_RANGE
from softcache.student.train import train

ROWS = 320
KD = StudentConfig(spec="softcache.models:mlp,hidden=8", alpha=0.9)
HARD = StudentConfig(spec="softcache.models:mlp,hidden=8", alpha=0.0)
PURE_KD = StudentConfig(spec="softcache.models:mlp,hidden=8", alpha=1.0)
QUICK = TrainConfig(epochs=1, batch_size=64)


def digits(labelled: bool = True) -> LabelledTensors:
    full = load("train")
    labels = full.labels[:ROWS] if labelled else torch.full((ROWS,), -1)
    return LabelledTensors(full.inputs[:ROWS], labels, None, {"rows": ROWS, "labelled": labelled})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real cache with stored inputs (so data is optional) in 5 chunks of 64 rows."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    out = tmp_path_factory.mktemp("garbage") / "base.zarr"
    build(teacher, digits(), str(out), chunk_rows=64, store_inputs=True, progress=False)
    return out


@pytest.fixture()
def copy(base: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(base, target)
    return target


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal must come before any student trains: fitting at all is a failure."""
    module = importlib.import_module("softcache.student.train")  # the package exports a function of that name

    def fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a student trained on a cache that should have been refused")

    monkeypatch.setattr(module, "fit", fit)


def tamper(path: Path, name: str, change: Callable[[np.ndarray], None]) -> None:
    """Rewrite a whole array through zarr, as a careless or hostile sender would (every chunk
    written, even one that equals the fill value: a missing chunk is another error)."""
    array = zarr.open_array(str(path / name), mode="r+").with_config({"write_empty_chunks": True})
    values = array[:]
    change(values)
    array[:] = values


def set_manifest(path: Path, **fields: object) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["softcache"] = dict(group.attrs["softcache"]) | fields


def refusal(path: Path, students: list[StudentConfig], **kwargs: object) -> str:
    with pytest.raises(CacheError) as info:
        train(str(path), students, config=kwargs.pop("config", QUICK), progress=False, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_nonfinite_soft_labels_are_refused_naming_count_and_rows(copy: Path, loader: str, no_training: None) -> None:
    def poison(v: np.ndarray) -> None:
        v[7, 0, 3] = np.nan
        v[200, 0, 0] = np.inf
        v[201, 0, 9] = -np.inf

    tamper(copy, "soft_labels", poison)
    config = TrainConfig(epochs=1, batch_size=64, loader=loader, buffer_chunks=1)  # type: ignore[arg-type]
    message = refusal(copy, [KD, HARD], config=config)
    assert f"3 of {ROWS} training rows" in message and "[7, 200, 201]" in message and "NaN" in message


def test_the_stream_scan_holds_one_group_of_chunks_at_a_time(copy: Path) -> None:
    from softcache.student._checks import nonfinite_rows
    from softcache.cache.store import open_cache
    from softcache.student.stream import StreamLoader

    tamper(copy, "soft_labels", lambda v: v.__setitem__((130, 0, 1), np.nan))
    loader = StreamLoader(open_cache(str(copy)), batch_size=32, buffer_chunks=2)
    blocks = [(start, values.shape) for start, values in loader.soft_blocks()]
    assert blocks == [(0, (128, 1, 10)), (128, (128, 1, 10)), (256, (64, 1, 10))]  # 2 chunks per read at most
    found = nonfinite_rows(loader.soft_blocks())
    assert (found.count, found.first) == (1, [130])


@pytest.mark.parametrize("temperature", [1e-3, 5000.0, 1e300])
def test_an_absurd_temperature_is_refused(copy: Path, temperature: float, no_training: None) -> None:
    set_manifest(copy, temperature=temperature)
    message = refusal(copy, [KD])
    assert "temperature" in message and f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]" in message


@pytest.mark.parametrize("value", ["Infinity", "NaN"])
def test_a_nonfinite_temperature_is_an_invalid_manifest(copy: Path, value: str, no_training: None) -> None:
    """JSON has no infinity, but Python's json module (and so a zarr.json edited by hand) does."""
    meta = copy / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["softcache"]["temperature"] = float(value.lower().replace("infinity", "inf"))
    meta.write_text(json.dumps(doc))  # writes the bare token Infinity / NaN
    assert value in meta.read_text()
    message = refusal(copy, [KD])
    assert "temperature" in message and "finite" in message


@pytest.mark.parametrize("row, label", [(3, 10), (100, -2), (255, 1_000_000)])
def test_labels_outside_the_classes_are_refused(copy: Path, row: int, label: int, no_training: None) -> None:
    tamper(copy, "labels", lambda v: v.__setitem__(row, label))
    message = refusal(copy, [HARD])
    assert f"1 of {ROWS} are outside [-1, 10)" in message and f"[{row}]" in message


def unsampled_row(data: LabelledTensors) -> int:
    """A row the fingerprint does not hash (it samples 256 rows), so changing it keeps the match."""
    from softcache.data import fingerprint

    reference = fingerprint(data)
    for row in range(1, ROWS):
        data.tensors[1][row] += 1
        same = fingerprint(data) == reference
        data.tensors[1][row] -= 1
        if same:
            return row
    raise AssertionError("the fingerprint hashes every row")


def test_labels_outside_the_classes_in_the_given_data_are_refused(copy: Path, no_training: None) -> None:
    data = digits()
    row = unsampled_row(data)
    data.tensors[1][row] = 12
    tamper(copy, "labels", lambda v: v.__setitem__(row, -1))  # the cache did not know this one
    with pytest.raises(CacheError, match="training data's labels: 1 of"):
        train(str(copy), [HARD], data=data, config=QUICK, progress=False)


def test_no_known_label_stops_a_hard_label_student_only(copy: Path, no_training: None, monkeypatch) -> None:
    tamper(copy, "labels", lambda v: v.fill(-1))
    message = refusal(copy, [PURE_KD, KD])
    assert "no training row has a known label" in message and "1 student(s)" in message
    monkeypatch.undo()  # pure distillation needs no label: it trains
    board = train(str(copy), [PURE_KD], config=QUICK, progress=False).leaderboard
    assert board["final_loss"][0] > 0


def test_unlabelled_data_gives_a_hard_label_student_nothing(tmp_path: Path, no_training: None) -> None:
    """A cache built from data without labels; the same data given back supplies none either."""
    torch.manual_seed(0)
    unlabelled = digits(labelled=False)
    out = tmp_path / "unlabelled.zarr"
    build(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), unlabelled, str(out), chunk_rows=64, progress=False)
    with pytest.raises(CacheError, match="no training row has a known label"):
        train(str(out), [HARD], data=unlabelled, config=QUICK, progress=False)


def test_labels_of_the_given_data_are_used(copy: Path) -> None:
    """The cache lost its labels (-1 everywhere); the user's labelled data supplies them. Before,
    the cache's labels overrode the data's and the hard-label student learned nothing."""
    tamper(copy, "labels", lambda v: v.fill(-1))
    board = train(str(copy), [HARD], data=digits(), eval_data=digits(), config=TrainConfig(epochs=5, batch_size=32),
                  progress=False).leaderboard
    assert board["final_loss"][0] > 0 and board["test_accuracy"][0] > 0.5


def test_cache_labels_that_disagree_with_the_given_data_are_refused(copy: Path, no_training: None) -> None:
    def shift(v: np.ndarray) -> None:  # in range, so only the comparison with the data can tell
        v[10:20] = (v[10:20] + 1) % 10

    tamper(copy, "labels", shift)
    with pytest.raises(CacheError) as info:
        train(str(copy), [HARD], data=digits(), config=QUICK, progress=False)
    assert f"10 of {ROWS} labels in the cache disagree" in str(info.value) and "[10, 11, 12, 13, 14]" in str(info.value)


def test_the_cli_refuses_with_one_line_and_exit_1(copy: Path, tmp_path: Path) -> None:
    tamper(copy, "soft_labels", lambda v: v.__setitem__((0, 0, 0), np.nan))
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "softcache", "train", "--cache", str(copy), "--student",
                           "softcache.models:mlp,hidden=8", "--epochs", "1", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("softcache: error:") and "NaN" in lines[0], proc.stderr
    assert not out.exists()
