"""Resume: a build killed at any moment and restarted with --resume ends identical to an
uninterrupted build, skips finished shards and never keeps a half-written chunk; for either row
kind (``kind``: digits samples, token rows with top-k soft labels)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from batchkit import (  # noqa: F401 - fixtures
    UNITS,
    Kind,
    WriteLog,
    arrays,
    assert_same_arrays,
    cli,
    cli_env,
    flags_set,
    kind,
    main,
    reference,
    teacher_file,
)

from softcache.cache import store
from softcache.errors import UsageError


def _start(kind: Kind, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "softcache", *kind.args(out, "--resume", teacher=kind.slow_teacher)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())


def _kill_when(proc: subprocess.Popen[str], out: Path, flags: int, extra_s: float) -> int:
    """SIGKILL the build once ``flags`` shard flags are set, plus ``extra_s`` seconds (mid-shard)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and flags_set(out) < flags and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


def test_sigkill_at_random_points_then_resume_ends_identical(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    rng = random.Random(20240605)
    out = tmp_path / "killed.zarr"
    killed = []
    for _ in range(3):  # kill, resume, kill again ... at seeded random points
        before = flags_set(out) if out.exists() else 0
        target = min(UNITS - 1, before + rng.randint(0, 3))
        killed.append(_kill_when(_start(kind, out), out, target, rng.uniform(0.0, 0.2)) == -signal.SIGKILL)
    assert sum(killed) >= 2, "the build finished before most kills: the test did not interrupt it"
    done_before = flags_set(out)
    assert 0 < done_before < UNITS
    assert store.peek_manifest(str(out)).status.state == "building"

    final = cli(*kind.args(out, "--resume", "--json", teacher=kind.slow_teacher))
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout)["worker"]
    assert report["target"] == "joined" and report["units_skipped"] == done_before
    assert len(report["units_written"]) == UNITS - done_before
    assert_same_arrays(out, kind.reference.url)
    cache = store.open_cache(str(out))
    assert cache.complete and cache.manifest.cache_key == kind.reference.manifest.cache_key
    assert kind.validate(out)["valid"]
    assert not list(out.rglob("*.partial")), "temporary files of killed writes were left behind"


def test_a_torn_chunk_in_an_unfinished_shard_is_rewritten_and_finished_shards_are_not(
        tmp_path: Path, kind: Kind, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    kind.build(out, shard="0/2")  # train shards 0, 2, 4 and eval 0, 2 are done
    # What a killed writer could leave behind in shard 1 (chunks 2 and 3) if writes were not
    # atomic: a truncated chunk, garbage in another, and a temporary file that never got renamed.
    torn = out / "soft_labels" / "c" / "2" / "0" / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00\x3c" * 3)  # 6 of the chunk's bytes
    row_chunk = kind.row_chunk.format(3)
    size = (Path(kind.reference.url) / row_chunk).stat().st_size
    (out / row_chunk).parent.mkdir(parents=True, exist_ok=True)
    (out / row_chunk).write_bytes(b"\xff" * size)  # right size, wrong content
    (torn.parent / "0.0123abc.partial").write_bytes(b"half")
    done_chunk = out / "soft_labels" / "c" / "0" / "0" / "0"
    done_mtime = done_chunk.stat().st_mtime_ns

    log = WriteLog(monkeypatch)
    resumed = kind.build(out, resume=True)
    report = resumed.build_report
    assert report["target"] == "joined" and report["units_skipped"] == 5
    assert report["units_written"] == ["train:1", "train:3", "train:5", "eval:1"]
    starts = {start for path, start in log.writes[""] if path == "soft_labels"}
    assert starts == kind.chunk_starts((1, 3, 5))  # only the unfinished shards' chunks (digits: 200, 300, 600, ...)
    assert done_chunk.stat().st_mtime_ns == done_mtime
    assert_same_arrays(out, kind.reference.url)
    assert not list(out.rglob("*.partial"))


def test_an_existing_partial_cache_is_refused_without_resume(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    kind.build(out, shard="1/2")
    refused = main(*kind.args(out))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("softcache: error:")
    assert "partial cache of this build" in refused.stderr and "--resume" in refused.stderr
    with pytest.raises(UsageError, match="different cache"):
        kind.build(out, resume=True, temperature=8.0)  # --resume never mixes two builds
    assert store.peek_manifest(str(out)).status.state == "building"


def test_resume_on_an_empty_target_builds_and_on_a_complete_one_does_nothing(
        tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    first = kind.build(out, resume=True)
    assert first.complete and first.build_report["target"] == "created"
    before = arrays(out)
    again = kind.build(out, resume=True)
    assert again.build_report["target"] == "complete" and again.build_report["rows_written"] == 0
    after = arrays(out)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[p], after[p]) for p in before)
    assert_same_arrays(out, kind.reference.url)
