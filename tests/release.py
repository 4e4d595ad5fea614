"""A cache written by softcache 0.1.0 itself, and what that release printed for it.

The release's source comes from this repository's history (``git archive`` of its commit), so the
cache is made at test time by the release's own code rather than checked in: a digits MLP teacher
trained by hand, a cache of the 597 test images with a 300-image eval split, then the release's
``validate``, ``inspect`` and ``train`` on it. The current code must open, check and train from
that cache with the same results.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RELEASE = "1f3f3348bd9fda3dca11d86c614c39a337eec171"
"""softcache 0.1.0 (cache format version 1, no chunk checksums, no content digest)."""

TRAIN = ["--student", "softcache.models:mlp,hidden=8", "--student", "softcache.models:mlp,hidden=8",
         "--alpha", "0.9", "0.0", "--epochs", "15", "--seed", "0", "--json", "--quiet"]
"""The training the release ran on its cache: two MLPs, distilled and hard-label."""

_TEACHER = """
import torch
from softcache.digits import load
from softcache.models import mlp
from softcache.specs import save_model

torch.manual_seed(0)
data, model = load("train"), mlp(hidden=32)
optimizer = torch.optim.Adam(model.parameters(), 0.01)
for epoch in range(60):
    for i in range(0, len(data.inputs), 64):
        loss = torch.nn.functional.cross_entropy(model(data.inputs[i:i + 64]), data.labels[i:i + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
save_model(model, "teacher.safetensors", "softcache.models:mlp,hidden=32")
"""


@dataclass(frozen=True)
class ReleaseCache:
    cache: Path
    validate: dict[str, Any]
    inspect: dict[str, Any]
    leaderboard: list[dict[str, Any]]


def release_source(repo: Path, into: Path) -> Path | None:
    """The release's package unpacked under ``into``; None when this clone lacks that commit."""
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", RELEASE, "softcache"], capture_output=True,
                                 check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _old(source: Path, cwd: Path, code: str, *args: str) -> str:
    """Run ``code`` with the release's package first on the path (never the installed one)."""
    prelude = f"import sys; sys.path.insert(0, {str(source)!r})\n"
    env = {**os.environ, "SOFTCACHE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"softcache 0.1.0 failed: {proc.stderr[-2000:]}")
    return proc.stdout


def make_release_cache(source: Path, work: Path) -> ReleaseCache:
    """Build the cache with the release and record what it printed (the row's weights path and
    timing are dropped: they differ from run to run)."""
    cli = "from softcache.cli import main; sys.exit(main(sys.argv[1:]))"
    _old(source, work, _TEACHER)
    _old(source, work, cli, "build", "--teacher", "teacher.safetensors", "--data", "softcache.digits:load,split=test",
         "--eval-data", "softcache.digits:load,split=test,test_size=300", "--out", "v1.zarr", "--chunk-rows", "128",
         "--quiet")
    validated = json.loads(_old(source, work, cli, "validate", "v1.zarr", "--json"))
    inspected = json.loads(_old(source, work, cli, "inspect", "v1.zarr", "--json"))
    board = json.loads(_old(source, work, cli, "train", "--cache", "v1.zarr", "--out", "run", *TRAIN))["leaderboard"]
    return ReleaseCache(work / "v1.zarr", validated, inspected, board)
