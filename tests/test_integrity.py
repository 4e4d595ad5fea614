"""A cache is untrusted input: reads are bounded, every chunk is verified, nothing missing reads as zeros.

Each hostile cache is made from a real cache (``conftest.cache``: a digits teacher run by
``softcache.teacher.build``) by editing its files the way a careless or hostile sender would. Cases that
would exhaust memory if a check regressed run in a subprocess under a 3 GiB address-space limit,
so a regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import zarr

from batchkit import cli_env, main
from softcache.cache import store
from softcache.cache.shards import finalize
from softcache.errors import CacheError
from softcache.cache.guard import ROOT_METADATA_LIMIT
from softcache.cache.layout import MAX_CHUNKS
from softcache.cache.manifest import Manifest
from softcache.cache.check import UnverifiedCacheWarning
from softcache.cache.store import Cache, open_cache
from softcache.student.train import train
from softcache.cache.check import validate

from release import ReleaseCache

STUDENT = "softcache.models:mlp,hidden=8"
MEMORY_LIMIT = 3 << 30

# -- editing a cache's files --------------------------------------------------------------------


@pytest.fixture()
def copy(cache: Cache, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(cache.url, target, symlinks=True)
    return target


def edit_array(root: Path, path: str, **changes: Any) -> None:
    """Change an array's metadata in its own ``zarr.json`` and in the root's consolidated copy,
    so every reader (consolidated or not) sees the same edit."""
    own = root / path / "zarr.json"
    doc = json.loads(own.read_text())
    doc.update(changes)
    own.write_text(json.dumps(doc))
    top = json.loads((root / "zarr.json").read_text())
    top["consolidated_metadata"]["metadata"][path].update(changes)
    (root / "zarr.json").write_text(json.dumps(top))


def edit_manifest(root: Path, edit: Any) -> None:
    top = json.loads((root / "zarr.json").read_text())
    edit(top["attributes"]["softcache"])
    (root / "zarr.json").write_text(json.dumps(top))


def chunk(root: Path, path: str, row_chunk: int) -> Path:
    """The file of one chunk of an array chunked along rows only (``path/c/i/0/...``)."""
    meta = json.loads((root / path / "zarr.json").read_text())
    return root / path / "c" / "/".join([str(row_chunk)] + ["0"] * (len(meta["shape"]) - 1))


def with_crc(payload: bytes) -> bytes:
    return payload + np.uint32(google_crc32c.value(payload)).tobytes()


def train_args(root: Path, out: Path) -> list[str]:
    return ["train", "--cache", str(root), "--student", STUDENT, "--epochs", "1", "--out", str(out), "--quiet"]


def one_line_error(result: Any, *needles: str) -> None:
    """Exit 1 with a single ``softcache: error:`` line naming the problem."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("softcache: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


RUNNER = """
import contextlib, io, json, resource, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from softcache._cli.main import main
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "seconds": time.perf_counter() - began,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
print(json.dumps(results))
"""


class Ran:
    def __init__(self, row: dict[str, Any]):
        self.returncode, self.stdout, self.stderr = row["returncode"], row["stdout"], row["stderr"]
        self.seconds, self.peak_rss_mb = row["seconds"], row["peak_rss_mb"]


def limited(*commands: list[str]) -> list[Ran]:
    """Run CLI commands in one fresh interpreter whose address space is capped at 3 GiB: a read
    that is not bounded fails there (MemoryError) instead of exhausting the machine."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(MEMORY_LIMIT), json.dumps(commands)],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [Ran(row) for row in json.loads(proc.stdout.strip().splitlines()[-1])]


# -- integrity by default ------------------------------------------------------------------------


def test_new_caches_carry_checksums_and_a_content_digest_anyone_can_recompute(cache: Cache) -> None:
    root = Path(cache.url)
    group = zarr.open_group(str(root), mode="r")
    arrays = sorted(p for p, node in group.members(max_depth=None) if isinstance(node, zarr.Array))
    for path in arrays:
        codecs = json.loads((root / path / "zarr.json").read_text())["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "crc32c"], (path, codecs)
    integrity = cache.manifest.integrity
    assert integrity is not None and integrity.chunk_checksum == "crc32c"
    # the documented definition, from the files alone: sha256 over "<key> <sha256 of the file>\n"
    lines = []
    for path in arrays:
        meta = json.loads((root / path / "zarr.json").read_text())
        grid = [math.ceil(s / c) for s, c in zip(meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"])]
        for coords in np.ndindex(*grid):
            key = "/".join([path, "c", *map(str, coords)])
            lines.append(f"{key} {hashlib.sha256((root / key).read_bytes()).hexdigest()}\n")
    assert integrity.chunks == len(lines)
    assert integrity.content_digest == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_a_flipped_bit_is_reported_by_plain_validate_and_stops_training(copy: Path, tmp_path: Path) -> None:
    target = chunk(copy, "soft_labels", 1)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    result = validate(str(copy))
    assert not result["valid"]
    assert any("crc32c" in e and "soft_labels/c/1/0/0" in e for e in result["errors"]), result["errors"]
    one_line_error(main(*train_args(copy, tmp_path / "out")), "crc32c", "soft_labels/c/1/0/0")
    assert not (tmp_path / "out").exists()


def test_a_flipped_bit_in_a_statistics_array_is_found_too(copy: Path) -> None:
    target = chunk(copy, "eval/stats/entropy", 0)
    data = bytearray(target.read_bytes())
    data[3] ^= 0x01
    target.write_bytes(bytes(data))
    errors = validate(str(copy))["errors"]
    assert any("crc32c" in e and "eval/stats/entropy/c/0/0" in e for e in errors), errors


def test_in_range_tampering_with_a_recomputed_checksum_is_caught_by_the_digest(copy: Path) -> None:
    target = chunk(copy, "soft_labels", 0)
    raw = target.read_bytes()
    values = np.frombuffer(raw[:-4], dtype="<f2").copy()
    values *= np.float16(0.05)  # "all logits scaled by 0.05": plausible values, valid checksum
    target.write_bytes(with_crc(values.tobytes()))
    plain = validate(str(copy))
    assert plain["valid"], plain["errors"]  # the checksum matches: only the digest can tell
    deep = validate(str(copy), deep=True)
    assert not deep["valid"]
    assert any("content digest mismatch" in e for e in deep["errors"]), deep["errors"]
    # finalize seals what is stored now: another digest, the same cache key (the key is about
    # what determines the contents, the digest about the bytes)
    before = Manifest.from_json(zarr.open_group(str(copy), mode="r").attrs["softcache"])
    after = finalize(str(copy))
    assert after.integrity is not None and before.integrity is not None
    assert after.integrity.content_digest != before.integrity.content_digest
    assert after.cache_key == before.cache_key and validate(str(copy), deep=True)["valid"]


def test_a_truncated_chunk_is_reported_not_raised(copy: Path) -> None:
    target = chunk(copy, "labels", 2)
    target.write_bytes(target.read_bytes()[:100])
    result = validate(str(copy))
    assert not result["valid"]
    assert any("labels/c/2" in e and "holds 100 bytes" in e for e in result["errors"]), result["errors"]
    ran = main("validate", str(copy))
    assert ran.returncode == 1 and "truncated" in ran.stderr


# -- missing chunks are errors, never fill values --------------------------------------------------


def test_a_deleted_soft_labels_folder_stops_every_reader(copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(copy / "soft_labels")
    result = validate(str(copy))
    assert not result["valid"] and any("'soft_labels' is missing" in e for e in result["errors"]), result["errors"]
    # the consolidated metadata still names the array: readers find the chunks missing
    one_line_error(main(*train_args(copy, tmp_path / "out")), "soft_labels/c/", "missing")
    assert not (tmp_path / "out").exists()
    cache = open_cache(str(copy))
    with pytest.raises(CacheError, match="missing"):
        cache.train.soft_labels()


def test_half_the_chunks_deleted_is_invalid_and_does_not_train(copy: Path, tmp_path: Path) -> None:
    for i in (1, 3):
        chunk(copy, "soft_labels", i).unlink()
    result = validate(str(copy))
    assert not result["valid"]
    assert any("'soft_labels': 2 of 5 chunks are missing (first: soft_labels/c/1/0/0, soft_labels/c/3/0/0)" in e
               for e in result["errors"]), result["errors"]
    one_line_error(main(*train_args(copy, tmp_path / "out")), "missing")
    for command in ("inspect", "stats"):
        chunk(copy, "stats/max_prob", 4).unlink(missing_ok=True)
        one_line_error(main(command, str(copy)), "stats/max_prob/c/4/0", "missing")


def test_the_stream_loader_refuses_a_missing_chunk(copy: Path, tmp_path: Path) -> None:
    chunk(copy, "soft_labels", 2).unlink()
    one_line_error(main(*train_args(copy, tmp_path / "out"), "--loader", "stream"), "soft_labels/c/2/0/0", "missing")


def test_finalize_checks_the_full_set_of_arrays_and_chunks(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["status"].update(state="building"))
    margin = copy / "stats" / "margin"
    saved = copy.parent / "margin"
    shutil.move(margin, saved)
    with pytest.raises(CacheError, match=r"cannot finalize: array 'stats/margin' is missing"):
        finalize(str(copy))
    shutil.move(saved, margin)
    chunk(copy, "eval/sample_index", 1).unlink()
    with pytest.raises(CacheError, match=r"'eval/sample_index': 1 of 3 chunks are missing"):
        finalize(str(copy))
    assert Manifest.from_json(zarr.open_group(str(copy), mode="r").attrs["softcache"]).status.state == "building"


def test_finalize_records_the_digest_and_is_idempotent(copy: Path, cache: Cache) -> None:
    edit_manifest(copy, lambda m: (m["status"].update(state="building"), m.pop("integrity")))
    first = finalize(str(copy))
    assert first.integrity == cache.manifest.integrity and first.cache_key == cache.manifest.cache_key
    assert finalize(str(copy)).integrity == first.integrity
    assert validate(str(copy), deep=True)["valid"]


# -- reading is bounded: metadata checked before any chunk is read --------------------------------


def test_a_string_dtype_is_refused_before_any_read(copy: Path, tmp_path: Path) -> None:
    string = {"data_type": "string", "codecs": [{"name": "vlen-utf8"}], "fill_value": ""}
    edit_array(copy, "soft_labels", **string)
    trained, inspected = limited(train_args(copy, tmp_path / "out"), ["inspect", str(copy)])
    for ran in (trained, inspected):
        one_line_error(ran, "'soft_labels'", 'dtype "string" is not one the format uses')
    assert not (tmp_path / "out").exists()
    assert any("string" in e for e in validate(str(copy))["errors"])


def test_a_string_statistics_array_is_refused_by_inspect_and_stats(copy: Path) -> None:
    edit_array(copy, "stats/max_prob", data_type="string", codecs=[{"name": "vlen-utf8"}], fill_value="")
    for ran in limited(["inspect", str(copy)], ["stats", str(copy)]):
        one_line_error(ran, "'stats/max_prob'", "string")


def test_a_gzip_bomb_declaring_4_gib_is_never_decoded(copy: Path, tmp_path: Path) -> None:
    rows = 1 << 31  # float16: one 4 GiB chunk
    edit_array(copy, "soft_labels", shape=[rows, 1, 1], chunk_grid={"name": "regular", "configuration":
               {"chunk_shape": [rows, 1, 1]}}, codecs=[{"name": "bytes", "configuration": {"endian": "little"}},
                                                     {"name": "gzip", "configuration": {"level": 9}}])
    shutil.rmtree(copy / "soft_labels" / "c")
    member = gzip.compress(bytes(64 << 20), 9)  # gzip members concatenate: 64 of them inflate to 4 GiB
    target = copy / "soft_labels" / "c" / "0" / "0" / "0"
    target.parent.mkdir(parents=True)
    target.write_bytes(member * 64)
    assert target.stat().st_size < 8 << 20
    validated, trained = limited(["validate", str(copy)], train_args(copy, tmp_path / "out"))
    for ran in (validated, trained):
        one_line_error(ran, "gzip")
    assert "codecs [bytes, gzip] are not the format's" in validated.stdout


def test_a_chunk_linked_to_dev_zero_or_larger_than_declared_is_refused(copy: Path, tmp_path: Path) -> None:
    zero = chunk(copy, "soft_labels", 0)
    zero.unlink()
    zero.symlink_to("/dev/zero")
    big = chunk(copy, "eval/soft_labels", 0)
    with open(big, "r+b") as f:  # a sparse 8 GiB file inside the store: in range, but far too long
        f.truncate(8 << 30)
    validated, trained, validated_eval = limited(["validate", str(copy)], train_args(copy, tmp_path / "out"),
                                                 ["validate", str(copy), "--json"])
    for ran in (validated, trained):
        one_line_error(ran, "soft_labels/c/0/0/0", "outside the store")
    report = json.loads(validated_eval.stdout)
    assert any("eval/soft_labels/c/0/0/0" in e and "larger than" in e for e in report["errors"]), report["errors"]
    assert max(r.peak_rss_mb for r in (validated, trained, validated_eval)) < 2048


def test_a_symlinked_chunk_folder_outside_the_store_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    shutil.move(copy / "labels" / "c", outside)
    (copy / "labels" / "c").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CacheError, match="outside the store"):
        open_cache(str(copy)).train.labels()


@pytest.mark.parametrize("rows", [10**12, 10**9])
def test_a_cache_declaring_absurd_rows_is_refused_in_seconds(copy: Path, tmp_path: Path, rows: int) -> None:
    manifest = json.loads((copy / "zarr.json").read_text())["attributes"]["softcache"]
    shard_rows = manifest["layout"]["shard_rows"]

    def grow(m: dict[str, Any]) -> None:
        m["layout"].update(rows=rows, num_shards=-(-rows // shard_rows))
        m["source"]["num_samples"] = rows

    edit_manifest(copy, grow)
    for path in ("soft_labels", "sample_index", "labels", "stats/max_prob", "stats/entropy", "stats/margin",
                 "stats/prediction"):
        shape = json.loads((copy / path / "zarr.json").read_text())["shape"]
        edit_array(copy, path, shape=[rows, *shape[1:]])
    edit_array(copy, "shard_done", shape=[-(-rows // shard_rows)])
    validated, inspected, trained = limited(["validate", str(copy), "--json"], ["inspect", str(copy)],
                                            train_args(copy, tmp_path / "out"))
    assert validated.returncode == 1 and validated.seconds < 30, validated.seconds
    errors = json.loads(validated.stdout)["errors"]
    if rows > MAX_CHUNKS * 256:
        assert any(f"more than the {MAX_CHUNKS}" in e for e in errors), errors
        one_line_error(inspected, "chunks")
        one_line_error(trained, "chunks")
    else:  # within the format's bounds: one listing shows the store does not hold them
        assert any("train shards not done: [5, 6," in e and "(3906245 of 3906250 shards)" in e for e in errors), errors
        one_line_error(inspected)
        one_line_error(trained)
    assert not (tmp_path / "out").exists()


def test_metadata_documents_have_a_size_limit(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["source"]["info"].update(padding="x" * (ROOT_METADATA_LIMIT + 1)))
    with pytest.raises(CacheError, match="zarr.json is larger than 16 MiB"):
        open_cache(str(copy))
    assert "larger than 16 MiB" in validate(str(copy))["errors"][0]


def test_an_array_metadata_document_over_1_mib_is_refused(copy: Path) -> None:
    own = copy / "labels" / "zarr.json"
    doc = json.loads(own.read_text())
    doc["attributes"] = {"padding": "x" * (1 << 20)}
    own.write_text(json.dumps(doc))
    errors = validate(str(copy))["errors"]
    assert any("labels/zarr.json is larger than 1 MiB" in e for e in errors), errors


def test_an_extra_array_is_not_part_of_the_format(copy: Path) -> None:
    zarr.open_group(str(copy), mode="r+").create_array("extra", shape=(4,), dtype="float32")
    store.consolidate(str(copy))
    errors = validate(str(copy))["errors"]
    assert any("array 'extra' is not part of the format" in e for e in errors), errors
    with pytest.raises(CacheError, match="'extra' is not part of the format"):
        open_cache(str(copy))


def test_dropping_the_checksums_of_a_finalized_cache_is_an_error(copy: Path) -> None:
    target = chunk(copy, "labels", 0)
    target.write_bytes(target.read_bytes()[:-4])
    edit_array(copy, "labels", codecs=[{"name": "bytes", "configuration": {"endian": "little"}}])
    with pytest.raises(CacheError, match="'labels' has no crc32c checksums"):
        open_cache(str(copy))


# -- caches written by softcache 0.1.0 -----------------------------------------------------------


def test_a_0_1_0_cache_opens_validates_and_trains_with_a_warning(tmp_path: Path,
                                                                 release_cache: ReleaseCache) -> None:
    old = tmp_path / "old.zarr"
    shutil.copytree(release_cache.cache, old)
    with pytest.warns(UnverifiedCacheWarning, match="no chunk checksums"):
        cache = open_cache(str(old))
    assert cache.manifest.integrity is None
    result = validate(str(old), deep=True)
    assert result["valid"], result["errors"]
    assert any("no chunk checksums" in w for w in result["warnings"])
    assert any("no content digest" in w for w in result["warnings"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCacheWarning)
        board = train(cache, [STUDENT], progress=False).leaderboard
    assert board["test_accuracy"][0] > 0.5
    # a missing chunk of an old cache is an error too, with or without checksums
    chunk(old, "soft_labels", 1).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCacheWarning)
        with pytest.raises(CacheError, match="missing"):
            open_cache(str(old)).train.soft_labels()


def test_the_release_cache_is_what_0_1_0_wrote(release_cache: ReleaseCache) -> None:
    assert all(not p.is_symlink() for p in release_cache.cache.rglob("*"))
    codecs = json.loads((release_cache.cache / "soft_labels" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes"]
