"""The diagnostic scripts in ``benchmarks/`` run against the library as it is (they reach into
stage 1's internals and the sampler), and measure what their docstrings say they measure."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from softcache.cache import layout
from softcache.cache.store import Cache
from softcache.data import materialize
from softcache.demo import DATA_SPEC
from softcache.digits import load
from softcache.student._batch import TopK
from softcache.student.loaders import open_loader
from softcache.teacher.build import build

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fixed_draws_are_the_ones_a_sample_cache_holds(cache: Cache, teacher_path: Path, tmp_path: Path) -> None:
    """``sample_draws.py`` calls its fixed draws "what a sample:N cache holds": drawn from the full
    cache's batches in shuffled order, they must be the stored ones row for row (the script draws
    from float16 values, the build from float32 logits: a draw on a class boundary may differ)."""
    draws = _script("sample_draws")
    with pytest.warns(UserWarning, match="no fewer than full float16 storage"):
        sampled = build(str(teacher_path), DATA_SPEC, str(tmp_path / "s.zarr"), temperature=4.0, storage="sample:12",
                        chunk_rows=256, progress=False)
    ids = sampled.train.read(layout.SOFT_IDS)[:, 0].astype(np.int64)
    counts = sampled.train.read(layout.SOFT)[:, 0].astype(np.int64)
    x, _ = materialize(load("train"))
    same = total = 0
    for batch in open_loader(cache, inputs=x, batch_size=64, mode="memory", shuffle_seed=3).epoch(0):
        rows = batch.rows.numpy()
        ours = draws.systematic_draws(batch, 12, 0)
        stored = TopK.sampled(torch.from_numpy(ids[rows]), torch.from_numpy(counts[rows]))
        same += int(((ours.ids == stored.ids) & (ours.logp == stored.logp)).all(-1).sum())
        total += len(rows)
    assert total == len(x) and same >= 0.99 * total, (same, total)
    other_seed = draws.systematic_draws(batch, 12, 1)
    assert not torch.equal(other_seed.logp, ours.logp) or not torch.equal(other_seed.ids, ours.ids)


def test_the_writer_segments_script_runs_against_the_build_as_it_is() -> None:
    result = subprocess.run([sys.executable, "benchmarks/stage1_writer.py", "--rows", "8192", "--builds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("build 1: teacher CPU per call") and "(both skipped)" in lines[0]
    assert lines[-1].startswith("with / without, 1 builds: mean ")
