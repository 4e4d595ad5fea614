"""Every loader mode: each row exactly once per epoch, deterministic, the right soft labels for
each row, and correct splitting across DataLoader workers and distributed ranks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import softcache.student._chunks as chunks
import softcache.student.loaders as loaders
from softcache.views import cache_replay
from softcache.teacher.build import build
from softcache.config import StudentConfig, TrainConfig
from softcache.digits import LabelledTensors
from softcache.errors import UsageError
from softcache.cache.store import Cache
from softcache.student._chunks import epoch_groups
from softcache.student._prefetch import Prefetcher
from softcache.student.loaders import MemoryLoader, choose_mode, memory_bytes, open_loader, parse_size
from softcache.student.stream import StreamLoader
from softcache.student.train import train

ROWS, CHUNK = 500, 64  # 8 chunks, the last one short (52 rows)


def _data(rows: int = ROWS, seed: int = 0) -> LabelledTensors:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, 1, 8, 8, generator=gen)
    return LabelledTensors(x, torch.randint(0, 10, (rows,), generator=gen), None, {"rows": rows, "seed": seed})


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cache, LabelledTensors]:
    torch.manual_seed(0)
    data = _data()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    url = str(tmp_path_factory.mktemp("loader") / "c.zarr")
    cache = build(teacher, data, url, chunk_rows=CHUNK, batch_size=100, store_inputs=True, progress=False)
    return cache, data


def _epoch(loader, epoch: int) -> list:
    return list(loader.epoch(epoch))


def _rows(batches: list) -> torch.Tensor:
    return torch.cat([b.rows for b in batches])


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.rows, y.rows) and torch.equal(x.soft, y.soft) and torch.equal(x.inputs, y.inputs)
        and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


def _check_rows_match_cache(batches: list, cache: Cache, data: LabelledTensors) -> None:
    soft = torch.from_numpy(cache.train.soft_labels())
    for b in batches:
        assert torch.equal(b.soft, soft[b.rows])
        assert torch.equal(b.inputs, data.inputs[b.rows])
        assert torch.equal(b.labels, data.labels[b.rows])


def test_memory_mode_every_row_once_and_deterministic(small):
    cache, data = small
    soft = torch.from_numpy(cache.train.soft_labels(view=None))
    loader = MemoryLoader(data.inputs, soft, data.labels, batch_size=64, shuffle_seed=3)
    first = _epoch(loader, 0)
    assert sorted(_rows(first).tolist()) == list(range(ROWS))
    assert _same(first, _epoch(MemoryLoader(data.inputs, soft, data.labels, batch_size=64, shuffle_seed=3), 0))
    assert not torch.equal(_rows(first), _rows(_epoch(loader, 1)))
    _check_rows_match_cache(first, cache, data)


@pytest.mark.parametrize("buffer_chunks", [1, 3, 100])
def test_stream_mode_every_row_once_full_batches_right_labels(small, buffer_chunks):
    cache, data = small
    loader = StreamLoader(cache, inputs=data.inputs, batch_size=48, shuffle_seed=1, buffer_chunks=buffer_chunks)
    for epoch in range(2):
        batches = _epoch(loader, epoch)
        assert sorted(_rows(batches).tolist()) == list(range(ROWS))
        assert [len(b.rows) for b in batches[:-1]] == [48] * (len(batches) - 1)
        assert len(batches) == loader.batches_in(epoch) == -(-ROWS // 48)
        _check_rows_match_cache(batches, cache, data)
    loader.close()


def test_stream_mode_is_deterministic_and_reshuffles_each_epoch(small):
    cache, data = small

    def make() -> StreamLoader:
        return StreamLoader(cache, inputs=data.inputs, batch_size=32, shuffle_seed=7, buffer_chunks=2)

    a, b = make(), make()
    e0, e1 = _epoch(a, 0), _epoch(a, 1)
    assert _same(e0, _epoch(b, 0))
    assert not torch.equal(_rows(e0), _rows(e1))
    # epoch 1 straight away (a fresh stream) is the same as epoch 1 after epoch 0 (a continued one)
    assert _same(e1, _epoch(make(), 1))
    other_seed = StreamLoader(cache, inputs=data.inputs, batch_size=32, shuffle_seed=8, buffer_chunks=2)
    assert not torch.equal(_rows(e0), _rows(_epoch(other_seed, 0)))


def test_stream_mode_decodes_each_chunk_once_per_epoch_and_never_fancy_indexes(small, monkeypatch):
    cache, data = small
    reads: list[tuple[int, int]] = []
    original = chunks.read_rows

    def recording(array, runs):
        reads.extend(runs)
        return original(array, runs)

    monkeypatch.setattr(chunks, "read_rows", recording)
    monkeypatch.setattr(type(cache.train.array("soft_labels")), "oindex",
                        property(lambda self: pytest.fail("fancy indexing of the store")))
    loader = StreamLoader(cache, inputs=data.inputs, batch_size=50, buffer_chunks=3)
    _epoch(loader, 0)
    covered = Counter(row for a, b in reads for row in range(a, b))
    assert sorted(covered) == list(range(ROWS)) and set(covered.values()) == {1}
    assert all(a % CHUNK == 0 for a, _ in reads)


def test_stream_mode_without_shuffle_reads_in_order(small):
    cache, data = small
    loader = StreamLoader(cache, inputs=data.inputs, batch_size=100, shuffle=False)
    assert _rows(_epoch(loader, 0)).tolist() == list(range(ROWS))


def test_stream_mode_streams_stored_inputs(small):
    cache, data = small
    batches = _epoch(StreamLoader(cache, batch_size=64, shuffle_seed=2), 0)
    _check_rows_match_cache(batches, cache, data)


def test_abandoned_epoch_restarts_cleanly(small):
    cache, data = small
    loader = StreamLoader(cache, inputs=data.inputs, batch_size=32, shuffle_seed=4, buffer_chunks=2, prefetch=1)
    full = _epoch(loader, 0)
    for i, _ in enumerate(loader.epoch(0)):
        if i == 2:
            break
    assert _same(full, _epoch(loader, 0))
    loader.close()


@pytest.mark.parametrize("start_method,workers", [("fork", 2), ("spawn", 1)])
def test_workers_give_the_same_batches_as_in_process(small, start_method, workers):
    cache, data = small
    make = lambda w: StreamLoader(cache, inputs=data.inputs, batch_size=40, shuffle_seed=5, buffer_chunks=1,  # noqa: E731
                                  workers=w, start_method=start_method)
    expected = [_epoch(make(0), e) for e in range(2)]
    with make(workers) as loader:
        assert loader.source._arrays is None  # nothing opened in the parent travels to the workers
        got = [_epoch(loader, e) for e in range(2)]
    for a, b in zip(expected, got):
        assert _same(a, b)


def test_ranks_read_disjoint_chunks_that_cover_the_cache(small):
    cache, data = small
    world = 3
    loaders = [StreamLoader(cache, inputs=data.inputs, batch_size=30, shuffle_seed=6, rank=r, world_size=world)
               for r in range(world)]
    for epoch in range(2):
        parts = [_rows(_epoch(ld, epoch)).tolist() for ld in loaders]
        assert sorted(sum(parts, [])) == list(range(ROWS))
        chunks = [{r // CHUNK for r in part} for part in parts]
        assert all(not (chunks[i] & chunks[j]) for i in range(world) for j in range(i + 1, world))
    even = [StreamLoader(cache, inputs=data.inputs, batch_size=30, shuffle_seed=6, rank=r, world_size=world,
                         even_batches=True) for r in range(world)]
    counts = [len(_epoch(ld, 0)) for ld in even]
    assert len(set(counts)) == 1 and counts[0] == min(ld.source.rank_rows(0) // 30 for ld in even)
    seen = sum((_rows(_epoch(ld, 0)).tolist() for ld in even), [])
    assert len(seen) == len(set(seen))


def test_epoch_groups_split_the_chunk_permutation():
    groups = epoch_groups(10, seed=0, epoch=3, rank=1, world_size=2, buffer_chunks=2, shuffle=True)
    order = np.random.default_rng([chunks._SEED_TAG, 0, 3]).permutation(10)
    assert [g.tolist() for g in groups] == [sorted(order[1::2][i:i + 2].tolist()) for i in range(0, 5, 2)]


def test_multi_view_stream_serves_the_same_view_as_memory_mode(tmp_path):
    data = _data(200, seed=1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    cache = build(teacher, data, str(tmp_path / "v.zarr"), views=3, augment="softcache.augment:shift", view_seed=2,
                  chunk_rows=32, progress=False)
    replay = cache_replay(cache, data.inputs)
    soft = torch.from_numpy(cache.train.soft_labels(view=None))
    memory = MemoryLoader(data.inputs, soft, data.labels, batch_size=20, replay=replay)
    streamed = StreamLoader(cache, inputs=data.inputs, batch_size=20, replay=replay)
    for epoch in range(2):
        by_row = {}
        for b in _epoch(memory, epoch):
            for r, s, x in zip(b.rows.tolist(), b.soft, b.inputs):
                by_row[r] = (s, x)
        for b in _epoch(streamed, epoch):
            for r, s, x in zip(b.rows.tolist(), b.soft, b.inputs):
                assert torch.equal(s, by_row[r][0]) and torch.equal(x, by_row[r][1])


def test_auto_mode_follows_the_memory_budget(small, monkeypatch):
    cache, data = small
    need = memory_bytes(cache.train, with_inputs=False)
    assert need == ROWS * 10 * 4
    assert choose_mode(cache.train, "auto", need) == "memory"
    assert choose_mode(cache.train, "auto", need - 1) == "stream"
    assert choose_mode(cache.train, "auto", need, with_inputs=True) == "stream"
    assert choose_mode(cache.train, "memory", 0) == "memory"
    monkeypatch.setenv(loaders.MEMORY_BUDGET_ENV, "1KB")
    assert choose_mode(cache.train) == "stream"
    assert isinstance(open_loader(cache, inputs=data.inputs, batch_size=8), StreamLoader)
    monkeypatch.setenv(loaders.MEMORY_BUDGET_ENV, "1GiB")
    assert isinstance(open_loader(cache, inputs=data.inputs, batch_size=8), MemoryLoader)
    with pytest.raises(UsageError):
        choose_mode(cache.train, "disk")  # type: ignore[arg-type]


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5k") == 1500
    assert parse_size(" 123 ") == 123
    with pytest.raises(UsageError):
        parse_size("lots")


def test_training_in_stream_mode_gives_a_leaderboard(small, tmp_path: Path):
    cache, data = small
    students = [StudentConfig(spec="softcache.models:mlp,hidden=8", seed=s) for s in (0, 1)]
    board = train(cache, students, data=data, out_dir=tmp_path,
                  config=TrainConfig(epochs=2, loader="stream", buffer_chunks=2), progress=False).leaderboard
    assert len(board) == 2 and board["final_loss"].is_not_null().all()
    assert (tmp_path / "leaderboard.parquet").exists()


def test_prefetcher_reraises_errors_in_order_and_stops():
    def source():
        yield 1
        yield 2
        raise KeyError("chunk 3")

    pre = Prefetcher(source(), depth=1)
    assert next(pre) == 1 and next(pre) == 2
    with pytest.raises(KeyError, match="chunk 3"):
        next(pre)
    endless = Prefetcher(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()


def test_stream_memory_bound_is_a_few_groups_whatever_the_cache_size(small):
    cache, data = small
    given = StreamLoader(cache, inputs=data.inputs, batch_size=32, buffer_chunks=2, prefetch=1)
    assert given.buffer_bytes() == 2 * CHUNK * 10 * 2  # float16 soft labels of 10 classes
    streamed = StreamLoader(cache, batch_size=32, buffer_chunks=2, prefetch=1)
    group = 2 * CHUNK * (10 * 2 + 64 * 4)  # plus the stored float32 inputs
    assert streamed.buffer_bytes() == group
    assert streamed.memory_bound() == (1 + 1 + 1) * group + group // 2
    assert streamed.memory_bound() < ROWS * (10 * 2 + 64 * 4)
