"""Sharded stage 1: job-array workers and torchrun ranks write one shared store, for either row
kind (``kind``: digits samples, token rows with top-k soft labels)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import zarr
from batchkit import (  # noqa: F401 - fixtures
    UNITS,
    Kind,
    WriteLog,
    assert_same_arrays,
    build_tiny,
    cli_env,
    kind,
    main,
    reference,
    teacher_file,
)

from softcache.cache import store
from softcache.cache.shards import (
    ShardSpec,
    TargetMismatch,
    assigned,
    resolve_shard,
    shard_from_env,
    work_units,
)
from softcache.errors import CacheError, UsageError


def test_shard_spec_parsing() -> None:
    assert ShardSpec.parse("2/5") == ShardSpec(2, 5, "shard")
    for bad in ("5/5", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(UsageError):
            ShardSpec.parse(bad)


def test_ranks_come_from_the_torchrun_environment() -> None:
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == ShardSpec(1, 4, "torchrun")
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert shard_from_env({}) is None
    assert resolve_shard(None, {}) == ShardSpec()
    assert resolve_shard("1/3", {}) == ShardSpec(1, 3, "shard")
    with pytest.raises(UsageError, match="torchrun"):
        resolve_shard("0/2", {"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError):
        shard_from_env({"RANK": "3", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 9, 11])
def test_units_are_split_disjointly_and_completely(workers: int, reference) -> None:  # noqa: F811
    units = work_units(reference.manifest, with_eval=True)
    assert [str(u) for u in units] == [f"train:{i}" for i in range(6)] + [f"eval:{i}" for i in range(3)]
    shares = [assigned(units, ShardSpec(i, workers, "shard")) for i in range(workers)]
    flat = [u for share in shares for u in share]
    assert sorted(map(str, flat)) == sorted(map(str, units)) and len(flat) == len(units)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_job_array_workers_write_disjoint_chunks_and_the_last_one_finalizes(
        tmp_path: Path, kind: Kind, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    log = WriteLog(monkeypatch)
    out = tmp_path / "shared.zarr"

    log.worker = "0/2"
    first = kind.build(out, shard="0/2")
    assert not first.complete and first.build_report["units_written"] == ["train:0", "train:2", "train:4", "eval:0", "eval:2"]
    with pytest.raises(CacheError, match=r"still being built .*5/9 shards done.*--allow-incomplete"):
        store.open_cache(str(out))
    assert store.open_cache(str(out), allow_incomplete=True).complete is False

    log.worker = "1/2"
    second = kind.build(out, shard="1/2")
    assert second.complete and second.build_report["target"] == "joined"
    assert second.build_report["units_written"] == ["train:1", "train:3", "train:5", "eval:1"]

    a, b = log.writes["0/2"], log.writes["1/2"]
    assert a and b and not (a & b), "two workers wrote the same chunk"
    soft_chunks = {(p, s) for p, s in a | b if p in ("soft_labels", "eval/soft_labels")}
    assert len(soft_chunks) == 12 + 6  # every chunk of both splits, each written once
    assert_same_arrays(out, kind.reference.url)
    reopened = zarr.open_group(str(out), mode="r")
    assert reopened.metadata.consolidated_metadata is not None  # finalize consolidated the metadata
    assert store.open_cache(str(out)).manifest.cache_key == kind.reference.manifest.cache_key


def test_a_second_build_is_refused_unless_it_is_a_shard_of_the_same_build(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    kind.build(out, shard="0/3")
    with pytest.raises(UsageError, match=r"partial cache of this build .*3/9 shards done.*--resume"):
        kind.build(out)  # a plain build meeting a build in progress
    with pytest.raises(TargetMismatch, match="different cache"):
        kind.build(out, shard="1/3", temperature=2.0)  # other settings: other key
    with pytest.raises(TargetMismatch, match="--shard-chunks"):
        kind.build(out, shard="1/3", chunk_rows=kind.chunk_rows // 2)  # same key, other layout
    with pytest.raises(UsageError, match="--overwrite cannot be combined with --shard"):
        kind.build(out, shard="1/3", overwrite=True)
    assert store.peek_manifest(str(out)).status.state == "building"
    kind.build(out, shard="2/3")
    last = kind.build(out, shard="1/3")
    assert last.complete
    again = kind.build(out, shard="1/3")  # a retried array task: nothing to do
    assert again.build_report["target"] == "complete" and again.build_report["units_written"] == []
    with pytest.raises(UsageError, match="already built and complete"):
        kind.build(out)


def test_finalize_command_completes_a_cache_whose_last_worker_died(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    kind.build(out, shard="0/2")
    failed = main("finalize", str(out))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()]
    assert failed.stderr.startswith("softcache: error:") and "train shards not done: [1, 3, 5]" in failed.stderr

    kind.build(out, shard="1/2")
    group = zarr.open_group(str(out), mode="r+")  # as if the last worker died before finalizing
    manifest = store.read_manifest(group, str(out))
    manifest.status.state = "building"
    store.write_manifest(group, manifest)
    done = main("finalize", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["complete"] is True
    assert store.open_cache(str(out)).complete


def test_reading_an_incomplete_cache_needs_allow_incomplete(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    kind.build(out, shard="0/2")
    refused = main("inspect", str(out))
    assert refused.returncode == 1 and refused.stderr.startswith("softcache: error:")
    assert "still being built" in refused.stderr and "--allow-incomplete" in refused.stderr
    allowed = main("inspect", str(out), "--allow-incomplete", "--json")
    assert allowed.returncode == 0, allowed.stderr
    info = json.loads(allowed.stdout)
    assert (info["status"], info["shards_done"], info["shards_total"]) == ("building", 5, 9)
    # the figures cover the rows written so far, not the zero-filled rows of the missing shards
    from softcache.cache.summary import summarize

    partial = store.open_cache(str(out), allow_incomplete=True)
    written = partial.train.sample_index() >= 0
    expected = partial.train.array("stats/max_prob")[:][written].mean()
    assert info["teacher_mean_max_prob"] == pytest.approx(float(expected), rel=1e-5)
    assert not written.all() and summarize(partial)["teacher_mean_max_prob"] == info["teacher_mean_max_prob"]
    train = main(*kind.train_args(out, tmp_path / "students"))
    assert train.returncode == 1 and "still being built" in train.stderr
    # even with --allow-incomplete, the unwritten rows' fill values are never trained on
    train = main(*kind.train_args(out, tmp_path / "students", "--allow-incomplete"))
    assert train.returncode == 1 and "not written yet" in train.stderr and train.stderr.count("\n") == 1
    assert not (tmp_path / "students").exists()


def test_torchrun_two_ranks_build_what_one_process_builds(tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    out = tmp_path / "torchrun.zarr"
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "softcache",
           *kind.args(out, "--json")]
    import subprocess

    run = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=cli_env(), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    decoder, text, reports = json.JSONDecoder(), run.stdout, []
    while text.strip():  # each rank prints one JSON object
        obj, end = decoder.raw_decode(text.lstrip())
        reports.append(obj["worker"])
        text = text.lstrip()[end:]
    assert sorted(r["shard"] for r in reports) == ["0/2", "1/2"]
    assert {r["launcher"] for r in reports} == {"torchrun"}
    written = [u for r in reports for u in r["units_written"]]
    assert sorted(written) == sorted(str(u) for u in work_units(kind.reference.manifest, True))
    assert len(written) == UNITS
    assert_same_arrays(out, kind.reference.url)
    assert store.open_cache(str(out)).manifest.cache_key == kind.reference.manifest.cache_key



def test_a_shard_worker_waits_for_a_store_another_worker_is_creating(tmp_path: Path, teacher_file: str,
                                                                      reference) -> None:  # noqa: F811
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "zarr.4f2a.partial").write_bytes(b"{")  # another worker's root metadata, not yet renamed
    manifest = reference.manifest.model_copy(deep=True)
    manifest.status.state = "building"

    def other_worker() -> None:
        time.sleep(0.5)
        zarr.create_group(str(out), attributes={"softcache": manifest.to_json()}, zarr_format=3)
        (out / "zarr.4f2a.partial").unlink()

    creator = threading.Thread(target=other_worker)
    creator.start()
    joined = build_tiny(teacher_file, out, shard="1/2")
    creator.join()
    assert joined.build_report["target"] == "joined"
    assert joined.build_report["units_written"] == ["train:1", "train:3", "train:5", "eval:1"]
    with pytest.raises(UsageError, match="non-empty directory"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "notes.txt").write_text("not a cache")
        build_tiny(teacher_file, tmp_path / "foreign")


def test_arrays_are_created_together_and_a_second_worker_checks_them(tmp_path: Path) -> None:
    """``ensure_arrays`` creates every missing array (subgroups included) in one call; a worker
    arriving later leaves the same arrays alone and names one whose shape differs."""
    from softcache.cache.layout import ArraySpec

    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    specs = {"soft_labels": ArraySpec((10, 4), "float16", (5, 4)), "stats/entropy": ArraySpec((10,), "float32", (5,)),
             "stats/prediction": ArraySpec((10,), "int32", (5,)), "eval/stats/margin": ArraySpec((3,), "float32", (3,))}
    store.ensure_arrays(group, specs)
    for name, spec in specs.items():
        node = group[name]
        assert isinstance(node, zarr.Array)
        assert (tuple(node.shape), str(node.dtype), tuple(node.chunks)) == (spec.shape, spec.dtype, spec.chunks)
        assert node.fill_value == (-1 if spec.dtype.startswith("int") else 0)
    group["stats/entropy"][:] = 1.0
    store.ensure_arrays(group, specs)  # the second worker: nothing is recreated or overwritten
    assert group["stats/entropy"][:].tolist() == [1.0] * 10
    with pytest.raises(CacheError, match=r"array 'stats/prediction' in the store is .*\(10,\).*needs.*\(12,\)"):
        store.ensure_arrays(group, {**specs, "stats/prediction": ArraySpec((12,), "int32", (5,))})
