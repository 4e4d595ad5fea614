"""A cache written by softcache 0.1.0 (built at test time by that release's own code, see
``tests/release.py``) still opens, validates, inspects and trains with the results that release
gave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from release import TRAIN, ReleaseCache


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOFTCACHE_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "softcache", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def old_cache(release_cache: ReleaseCache, tmp_path: Path) -> Path:
    """A copy (with the teacher file its manifest names), so no test changes the release's cache."""
    shutil.copy(release_cache.cache.parent / "teacher.safetensors", tmp_path)
    return Path(shutil.copytree(release_cache.cache, tmp_path / release_cache.cache.name))


def test_a_0_1_0_cache_validates_with_a_warning_that_it_cannot_be_verified(old_cache: Path,
        release_cache: ReleaseCache) -> None:
    for deep in ([], ["--deep"]):
        proc = cli("validate", old_cache.name, "--json", *deep, cwd=old_cache.parent)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["valid"] and result["cache_key"] == release_cache.validate["cache_key"]
        assert any("checksum" in w or "verif" in w for w in result["warnings"]), result["warnings"]


def test_a_0_1_0_cache_inspects_as_it_did(old_cache: Path, release_cache: ReleaseCache) -> None:
    proc = cli("inspect", old_cache.name, "--json", cwd=old_cache.parent)
    assert proc.returncode == 0, proc.stderr
    now, then = json.loads(proc.stdout), release_cache.inspect
    for key in ("schema_version", "cache_key", "status", "rows", "eval_rows", "classes", "views", "temperature",
                "storage", "teacher_train_accuracy", "teacher_mean_max_prob", "arrays"):
        assert now[key] == then[key], key
    added = set(now["manifest"]) - set(then["manifest"])  # fields added since: absent from old caches
    assert all(now["manifest"][key] is None for key in added), added
    assert {k: v for k, v in now["manifest"].items() if k not in added} == then["manifest"]


def test_a_0_1_0_cache_trains_to_the_same_leaderboard(old_cache: Path, release_cache: ReleaseCache) -> None:
    out = old_cache.parent / "students"
    proc = cli("train", "--cache", old_cache.name, "--out", str(out), *TRAIN, cwd=old_cache.parent)
    assert proc.returncode == 0, proc.stderr
    now = {row["student"]: row for row in json.loads(proc.stdout)["leaderboard"]}
    assert set(now) == {row["student"] for row in release_cache.leaderboard}
    for then in release_cache.leaderboard:
        row = now[then["student"]]
        for key in ("spec", "parameters", "temperature", "alpha", "label_smoothing", "lr", "seed", "epochs"):
            assert row[key] == then[key], (then["student"], key)
        # same seeds, same batches: equal up to float32 round-off where kernels changed
        assert row["final_loss"] == pytest.approx(then["final_loss"], rel=1e-4), then["student"]
        assert row["test_accuracy"] == pytest.approx(then["test_accuracy"], abs=1 / 300 + 1e-6), then["student"]
        assert row["teacher_agreement"] == pytest.approx(then["teacher_agreement"], abs=1 / 300 + 1e-6)
