"""The background writer: whole chunks only, bounded memory, errors raised in the producer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from softcache.teacher.build import build
from softcache.digits import LabelledTensors
from softcache.cache.check import validate
from softcache.cache.writer import ChunkWriter


def _blocks(sizes: list[int], start: int = 0) -> list[dict[str, np.ndarray]]:
    out, row = [], start
    for n in sizes:
        ids = np.arange(row, row + n)
        out.append({"id": ids, "sq": (ids * ids).astype(np.float32).reshape(n, 1)})
        row += n
    return out


class Recorder:
    """A write callback that keeps (start, rows) of every call and the data written."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.data: dict[int, np.ndarray] = {}
        self.events: list[tuple[str, int]] = []

    def __call__(self, start: int, block: dict[str, np.ndarray]) -> None:
        n = len(block["id"])
        self.calls.append((start, n))
        self.events.append(("write", start))
        self.data[start] = block["id"].copy()
        assert np.array_equal(block["sq"][:, 0], (block["id"] * block["id"]).astype(np.float32))


def test_every_write_is_one_whole_chunk_whatever_the_batch_sizes():
    rec = Recorder()
    writer = ChunkWriter(rec, 0, 100, chunk_rows=16)
    for block in _blocks([7, 13, 1, 30, 2, 16, 31]):
        writer.append(block)
    writer.close()
    assert rec.calls == [(s, min(16, 100 - s)) for s in range(0, 100, 16)]
    assert np.array_equal(np.concatenate([rec.data[s] for s, _ in rec.calls]), np.arange(100))
    assert writer.rows_written == 100


def test_writes_follow_the_chunk_grid_when_the_range_starts_inside_a_chunk():
    rec = Recorder()
    writer = ChunkWriter(rec, 5, 40, chunk_rows=16)
    for block in _blocks([20, 15], start=5):
        writer.append(block)
    writer.close()
    assert rec.calls == [(5, 11), (16, 16), (32, 8)]


def test_one_writer_serves_several_ranges_and_marks_each_done_after_its_data():
    rec = Recorder()
    writer = ChunkWriter(rec, None, None, chunk_rows=8)
    ranges = [range(0, 16), range(32, 40), range(16, 20)]
    for i, rows in enumerate(ranges):
        writer.begin(rows, on_done=lambda i=i: rec.events.append(("done", i)))
        for block in _blocks([3] * (len(rows) // 3) + [len(rows) % 3], start=rows.start):
            if len(block["id"]):
                writer.append(block)
    writer.close()
    assert rec.events == [("write", 0), ("write", 8), ("done", 0), ("write", 32), ("done", 1), ("write", 16), ("done", 2)]


def test_a_write_error_reaches_the_producer_at_its_next_call():
    boom = OSError("disk full")
    attempts = 0

    def failing(start: int, block: dict[str, np.ndarray]) -> None:
        raise boom

    writer = ChunkWriter(failing, 0, 4000, chunk_rows=4, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for block in _blocks([4] * 1000):
            attempts += 1
            writer.append(block)
    # one chunk queued, then the producer waits on the full queue and is woken by the failure
    assert attempts <= 2
    writer.abort()


def test_a_write_error_is_raised_by_close():
    writer = ChunkWriter(lambda s, b: (_ for _ in ()).throw(ValueError("bad chunk")), 0, 10, chunk_rows=4)
    for block in _blocks([10]):
        writer.append(block)
    with pytest.raises(ValueError, match="bad chunk"):
        writer.close()


def test_missing_rows_and_extra_rows_are_errors():
    writer = ChunkWriter(Recorder(), 0, 10, chunk_rows=4)
    writer.append(_blocks([6])[0])
    with pytest.raises(RuntimeError, match="rows up to 6 but the range ends at 10"):
        writer.close()
    writer = ChunkWriter(Recorder(), 0, 10, chunk_rows=4)
    with pytest.raises(ValueError, match="got 11 rows"):
        writer.append(_blocks([11])[0])
    writer.abort()


def test_queue_is_bounded_while_the_store_is_slow():
    gate = threading.Event()
    rec = Recorder()

    def slow(start: int, block: dict[str, np.ndarray]) -> None:
        gate.wait()
        rec(start, block)

    writer = ChunkWriter(slow, 0, 80, chunk_rows=4, depth=2)
    appended = []

    def produce() -> None:
        for block in _blocks([4] * 20):
            writer.append(block)
            appended.append(len(block["id"]))

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=0.5)
    # the store has not written a row: the producer holds at depth * chunk_rows rows queued
    assert producer.is_alive()
    assert sum(appended) <= 2 * 4
    gate.set()
    producer.join()
    writer.close()
    assert sum(n for _, n in rec.calls) == 80


def test_a_build_over_many_shards_through_one_writer_is_complete_and_valid(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(300, 1, 8, 8)
    data = LabelledTensors(x, torch.randint(0, 10, (300,)), None, {"rows": 300})
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    cache = build(teacher, data, str(tmp_path / "c.zarr"), chunk_rows=32, batch_size=50, progress=False)
    assert cache.complete
    with torch.no_grad():
        expected = (teacher(x) / 4.0).to(torch.float16).float()
    assert torch.equal(torch.from_numpy(cache.train.soft_labels()), expected)
    assert validate(cache.url, deep=True)["valid"]


def test_blocks_smaller_than_a_chunk_are_gathered_into_it_as_they_arrive():
    rec = Recorder()
    writer = ChunkWriter(rec, 0, 32, chunk_rows=16)
    blocks = _blocks([5, 5, 6, 16])
    for block in blocks:
        writer.append(block)
    writer.close()
    assert rec.calls == [(0, 16), (16, 16)]
    assert np.array_equal(rec.data[0], np.arange(16)) and np.array_equal(rec.data[16], np.arange(16, 32))


def test_blocks_of_one_chunk_that_disagree_on_dtype_stop_the_writer_with_a_clear_error():
    writer = ChunkWriter(Recorder(), 0, 8, chunk_rows=8)
    first, second = _blocks([4, 4])
    writer.append(first)
    writer.append({"id": second["id"], "sq": second["sq"].astype(np.float64)})
    with pytest.raises(ValueError, match="'sq'.*float64.*float32"):
        writer.close()


def _chunk_reads(monkeypatch) -> list[str]:
    """Chunks read through the guarded store from now on (metadata excluded)."""
    from softcache.cache import guard

    reads: list[str] = []
    bounded = guard.GuardedStore._bounded

    async def counting(self, key, prototype, limit):
        if not key.endswith("zarr.json"):
            reads.append(key)
        return await bounded(self, key, prototype, limit)

    monkeypatch.setattr(guard.GuardedStore, "_bounded", counting)
    return reads


def test_the_build_digests_its_chunks_as_it_writes_them_and_finalize_reads_none_back(tmp_path, monkeypatch):
    from softcache.cache import guard
    from softcache.cache.check import check_cache

    torch.manual_seed(0)
    data = LabelledTensors(torch.rand(96, 1, 8, 8), torch.randint(0, 10, (96,)), None, {"rows": 96})
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    reads = _chunk_reads(monkeypatch)
    cache = build(teacher, data, str(tmp_path / "c.zarr"), chunk_rows=32, batch_size=24, progress=False)
    assert cache.complete
    # finalize reads the flags and the sample index (are all rows written?), no chunk for the digest
    assert {key.split("/c/")[0] for key in reads} == {"shard_done", "sample_index"}
    group = guard.open_group(cache.location, "r", consolidated=False)
    fresh = guard.content_digest(group.store, check_cache(group, cache.manifest).formats())  # every chunk read back
    assert (cache.manifest.integrity.content_digest, cache.manifest.integrity.chunks) == fresh
    assert validate(cache.url, deep=True)["valid"]


def test_the_teachers_weights_digest_is_the_recorded_one():
    from softcache.weights import weights_digest

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # float weights, and an int64 buffer
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(6.0).view(2, 3))
        model[0].bias.copy_(torch.tensor([-1.0, 0.5]))
    # the value earlier releases recorded: caches they built keep their keys
    assert weights_digest(model) == "03ce92f3469f25545ef0213944af35ed086ceaf1eee5776e36b0b69f1b722f32"
