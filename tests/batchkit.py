"""Helpers for the batch-pipeline tests (sharding, resume, remote stores, pipelines).

Everything is tiny on purpose: an untrained 4-channel teacher (seeded, so every process that
builds it gets the same weights and therefore the same cache key), the embedded digits data,
and 100-row chunks, 2 chunks per shard, so a build has several shards in each split.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from softcache.cache import store
from softcache.teacher.build import build
from softcache._cli.main import main as cli_main
from softcache.models import teacher_cnn
from softcache.weights import save_model
from softcache.cache.store import Cache

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DATA = "softcache.digits:load,split=train"
EVAL = "softcache.digits:load,split=test"
LAYOUT = {"chunk_rows": 100, "shard_chunks": 2}
"""1200 train rows -> 6 shards, 597 eval rows -> 3 shards: 9 units of work."""
UNITS = 9
CLI_LAYOUT = ["--chunk-rows", "100", "--shard-chunks", "2", "--batch-size", "25"]
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


def build_args(teacher: str, out: str | Path, *extra: str) -> list[str]:
    """``softcache build`` arguments for the tiny digits build."""
    return ["build", "--teacher", teacher, "--data", DATA, "--eval-data", EVAL, "--out", str(out), *CLI_LAYOUT,
            "--quiet", *extra]


def build_tiny(teacher: str | nn.Module, out: str | Path, **kwargs: Any) -> Cache:
    """The Python API build with the test layout (in-process: no interpreter start-up)."""
    return build(teacher, DATA, str(out), **{"eval_data": EVAL, "batch_size": BATCH_SIZE, "progress": False,
                                              **LAYOUT, **kwargs})


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
