"""Helpers for the batch-pipeline tests (sharding, resume, remote stores, pipelines).

Everything is tiny on purpose: an untrained 4-channel teacher (seeded, so every process that
builds it gets the same weights and therefore the same cache key), the embedded digits data,
and 100-row chunks, 2 chunks per shard, so a build has several shards in each split.

The same tests run over both row kinds through the ``kind`` fixture (:class:`Kind`): the digits
build above, and a language-model build of the same shape (``tests/lmkit.py``: a bigram
teacher, token rows of 16 positions, top-8 soft labels, 4-row chunks) whose shards and chunks
line up one for one with the digits build's, so expectations about work units hold for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from softcache.cache import store
from softcache.cache.check import validate
from softcache.cache.trust import TRUSTED_MODULES_ENV
from softcache.teacher.build import build
from softcache._cli.main import main as cli_main
from softcache.models import teacher_cnn
from softcache.weights import save_model
from softcache.cache.store import Cache
from softcache.pipeline.config import PipelineConfig, load_pipeline

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DATA = "softcache.digits:load,split=train"
EVAL = "softcache.digits:load,split=test"
LAYOUT = {"chunk_rows": 100, "shard_chunks": 2}
"""1200 train rows -> 6 shards, 597 eval rows -> 3 shards: 9 units of work."""
UNITS = 9
BATCH_SIZE = 25


def tiny_teacher() -> nn.Module:
    """The same untrained weights in every process (seeded construction)."""
    torch.manual_seed(0)
    return teacher_cnn(width=4).eval()


def slow_teacher(delay: float = 0.02) -> nn.Module:
    """``tiny_teacher`` that sleeps before each batch, so a build lasts long enough to be killed
    part-way. A forward pre-hook keeps the state dict (hence the cache key) unchanged."""
    model = tiny_teacher()
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay))
    return model


def slow_lm_teacher(delay: float = 0.04) -> nn.Module:
    """``lmkit.teacher`` slowed down like :func:`slow_teacher` (same weights, same cache key)."""
    import lmkit

    model = lmkit.teacher()
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay))
    return model


def flags(options: dict[str, Any]) -> list[str]:
    """Build options as ``softcache build`` flags (``chunk_rows=100`` -> ``--chunk-rows 100``)."""
    return [x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", str(value))]


@dataclass(frozen=True)
class Kind:
    """A row kind the batch tests run over: a tiny build of it by the API and by the CLI, the
    student that trains on it, the leaderboard column that scores that student, and a pipeline
    file with the overrides that keep it to seconds."""

    name: str
    teacher: str
    slow_teacher: str
    """The same weights as ``teacher``, slow enough per batch for a build to be killed part-way."""
    data: str
    eval: str
    options: dict[str, Any]
    student: dict[str, Any]
    """A student that trains on this kind's cache: :class:`~softcache.config.StudentConfig` fields."""
    score: str
    row_chunk: str
    """The file of chunk ``{}`` of an array with one entry per row (chunk keys as zarr writes them)."""
    pipeline: Path
    pipeline_sets: tuple[str, ...]
    trusted: str = ""
    """Modules the recorded data SPECs name that ``validate`` must trust (test code, not the allowlist)."""
    reference: Any = field(default=None, compare=False)
    """An uninterrupted single-process build (set by the ``kind`` fixture): what every other build must equal."""

    @property
    def chunk_rows(self) -> int:
        return int(self.options["chunk_rows"])

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * int(self.options["shard_chunks"])

    def build(self, out: str | Path, teacher: str | nn.Module | None = None, **kwargs: Any) -> Cache:
        """The Python API build (in-process: no interpreter start-up)."""
        return build(teacher or self.teacher, self.data, str(out),
                     **{"eval_data": self.eval, "progress": False, **self.options, **kwargs})

    def args(self, out: str | Path, *extra: str, teacher: str | None = None) -> list[str]:
        """``softcache build`` arguments for the same build."""
        return ["build", "--teacher", teacher or self.teacher, "--data", self.data, "--eval-data", self.eval,
                "--out", str(out), *flags(self.options), "--quiet", *extra]

    def train_args(self, cache: str | Path, out: str | Path, *extra: str) -> list[str]:
        """``softcache train`` arguments: this kind's student, one epoch."""
        student = [x for key, value in self.student.items() for x in (f"--{key}", str(value))]
        return ["train", "--cache", str(cache), *student, "--epochs", "1", "--out", str(out), *extra]

    def chunk_starts(self, shards: tuple[int, ...]) -> set[int]:
        """The first row of every chunk of the given training shards."""
        return {shard * self.shard_rows + start for shard in shards
                for start in range(0, self.shard_rows, self.chunk_rows)}

    def validate(self, url: str | Path) -> dict[str, Any]:
        """``softcache validate --deep``, trusting :attr:`trusted` (``$SOFTCACHE_TRUSTED_MODULES``)."""
        with mock.patch.dict(os.environ, {TRUSTED_MODULES_ENV: self.trusted}):
            return validate(str(url), deep=True)

    def pipeline_config(self, workdir: Path, *sets: str) -> PipelineConfig:
        """This kind's pipeline file in ``workdir``, small enough for tests, with ``sets`` on top."""
        return load_pipeline(self.pipeline, [f"workdir={workdir}", *self.pipeline_sets, *sets])


LM_ROWS, LM_EVAL = "lmkit:rows,n=48", "lmkit:rows,split=eval,n=22"
"""48 training rows -> 6 shards of 2 chunks of 4 rows; 22 eval rows -> 3 shards, the last chunk
partial: the digits build's 9 units and 12 + 6 chunks per soft-label array."""
LM_MODEL = "softcache.models:gpt,vocab_size=64,length=16,layers=1,width=16,heads=2"
"""A causal transformer small enough to train in a moment on ``lmkit`` rows (vocabulary 64)."""

SAMPLE = Kind(
    name="sample", teacher="", slow_teacher="batchkit:slow_teacher,delay=0.02", data=DATA, eval=EVAL,
    options={**LAYOUT, "batch_size": BATCH_SIZE}, student={"student": "softcache.models:mlp,hidden=8"},
    score="test_accuracy", row_chunk="labels/c/{}", pipeline=REPO / "pipelines" / "digits.toml",
    pipeline_sets=("teacher.make.kwargs.epochs=2", "train.*.epochs=1", "cache.chunk_rows=200"))
SEQUENCE = Kind(
    name="sequence", teacher="lmkit:teacher", slow_teacher="batchkit:slow_lm_teacher,delay=0.04",
    data=LM_ROWS, eval=LM_EVAL, options={"chunk_rows": 4, "shard_chunks": 2, "batch_size": 2, "storage": "topk:8"},
    student={"student": "lmkit:student", "alpha": 0.8, "temperature": 4.0}, score="bits_per_token",
    row_chunk="tokens/c/{}/0", trusted="lmkit", pipeline=REPO / "pipelines" / "lm.toml",
    pipeline_sets=(
        "teacher.make={ target = 'softcache.pipeline:lm_teacher', kwargs = { data = '%s', model = '%s', "
        "steps = 20, batch_size = 16, eval_data = '%s' } }" % (LM_ROWS, LM_MODEL, LM_EVAL),
        f"data.train={LM_ROWS!r}", f"data.eval={LM_EVAL!r}", "cache.storage='topk:8'", "cache.chunk_rows=4",
        "cache.shard_chunks=2", "cache.batch_size=16", "train.*.epochs=1", "train.*.batch_size=16",
        f"train.*.sweep.spec=[{LM_MODEL!r}]", "train.*.sweep.seed=[0]"))
KINDS = (SAMPLE, SEQUENCE)


def build_args(teacher: str, out: str | Path, *extra: str) -> list[str]:
    """``softcache build`` arguments for the tiny digits build."""
    return SAMPLE.args(out, *extra, teacher=teacher)


def build_tiny(teacher: str | nn.Module, out: str | Path, **kwargs: Any) -> Cache:
    """The Python API build with the test layout (in-process: no interpreter start-up)."""
    return SAMPLE.build(out, teacher=teacher, **kwargs)


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SOFTCACHE_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m softcache ARGS`` in a fresh interpreter, as a batch job would."""
    return subprocess.run([sys.executable, "-m", "softcache", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=cwd or REPO, timeout=timeout)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def main(*args: str) -> Result:
    """Run the CLI in this process (no interpreter start-up) and capture what it prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return Result(code, out.getvalue(), err.getvalue())


def arrays(url: str | Path) -> dict[str, np.ndarray]:
    """Every array of a cache by path (shard flags included), read with plain zarr."""
    group = zarr.open_group(str(url), mode="r")
    return {path: np.asarray(node[...]) for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_arrays(a: str | Path, b: str | Path) -> None:
    """Same array paths, shapes, dtypes and bytes: what 'identical to a single build' means."""
    left, right = arrays(a), arrays(b)
    assert sorted(left) == sorted(right)
    for path in left:
        assert left[path].dtype == right[path].dtype, path
        np.testing.assert_array_equal(left[path], right[path], err_msg=path)


def flags_set(out: Path) -> int:
    """Shard flags already written in a local store (one chunk file per set flag)."""
    return sum(len(list((out / split / "shard_done" / "c").glob("*"))) for split in ("", "eval")
               if (out / split / "shard_done" / "c").is_dir())


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(tiny_teacher(), path, "softcache.models:teacher_cnn,width=4")
    return str(path)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, teacher_file: str) -> Cache:
    """An uninterrupted single-process build: what every other build must equal."""
    return build_tiny(teacher_file, tmp_path_factory.mktemp("reference") / "ref.zarr")


class WriteLog:
    """Records (array path, first row) of every chunk write, per worker, by wrapping store.write_rows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.worker = ""
        self.writes: dict[str, set[tuple[str, int]]] = defaultdict(set)
        original = store.write_rows

        def spy(group: zarr.Group, start: int, block: dict[str, np.ndarray], *args: Any) -> None:
            self.writes[self.worker].update((f"{group.path}/{name}".strip("/"), start) for name in block)
            original(group, start, block, *args)

        monkeypatch.setattr(store, "write_rows", spy)


@pytest.fixture(scope="session", params=KINDS, ids=lambda k: k.name)
def kind(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kind:
    """Each row kind in turn, with its reference build."""
    chosen: Kind = request.param
    if chosen is SAMPLE:
        return dataclasses.replace(SAMPLE, teacher=request.getfixturevalue("teacher_file"),
                                   reference=request.getfixturevalue("reference"))
    out = tmp_path_factory.mktemp(f"reference-{chosen.name}") / "ref.zarr"
    return dataclasses.replace(chosen, reference=chosen.build(out))
