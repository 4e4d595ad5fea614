"""Shared fixtures: a small real teacher trained on digits and a cache built from it; a cache
written by release 0.1.0 itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softcache.teacher.build import build
from softcache.demo import DATA_SPEC, EVAL_SPEC, TEACHER_SPEC, train_teacher
from softcache.weights import save_model
from softcache.cache.store import Cache

from release import ReleaseCache, make_release_cache, release_source

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits teacher trained for a few epochs (good enough to be a real teacher, fast)."""
    model, _ = train_teacher(seed=0, epochs=3)
    return save_model(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors", TEACHER_SPEC)


@pytest.fixture(scope="session")
def cache(teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    return build(str(teacher_path), DATA_SPEC, str(out), eval_data=EVAL_SPEC, temperature=4.0,
                 chunk_rows=256, progress=False)


@pytest.fixture(scope="session")
def release_cache(tmp_path_factory: pytest.TempPathFactory) -> ReleaseCache:
    """A cache built by softcache 0.1.0's own code (from this repository's history)."""
    source = release_source(Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("release-source"))
    if source is None:
        pytest.skip("softcache 0.1.0's commit is not in this clone's history (a shallow clone)")
    return make_release_cache(source, tmp_path_factory.mktemp("release-cache"))
