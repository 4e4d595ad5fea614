"""Token rows streamed chunk-shuffled: every row once per epoch with the arrays the cache stores,
the same batches as the in-RAM loader gives row for row, disjoint chunks per rank, a memory bound
that does not grow with the cache, and a student trained from the stream."""

from __future__ import annotations

import importlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import lmkit
import softcache
from softcache.cache import layout
from softcache.cache.store import Cache, open_cache
from softcache.config import StudentConfig, TrainConfig
from softcache.errors import CacheError, UsageError
from softcache.sequences import next_token_targets
from softcache.student._batch import Batch, TopK
from softcache.student.loaders import choose_mode, memory_bytes
from softcache.student.sequence import SequenceLoader, open_sequence_loader
from softcache.student.stream import StreamLoader

T = 1.0
ROWS, LENGTH, VOCAB, K, CHUNK = 100, 16, 64, 8, 16  # 7 chunks, the last one short (4 rows)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return lmkit.teacher()


def _build(teacher: torch.nn.Module, out: Path, storage: str, rows: int = ROWS) -> Cache:
    return softcache.build(teacher, lmkit.rows(n=rows), str(out), eval_data=lmkit.rows(n=16, split="eval"),
                           storage=storage, temperature=T, progress=False, chunk_rows=CHUNK)


@pytest.fixture(scope="module")
def caches(teacher: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cache]:
    root = tmp_path_factory.mktemp("seqstream")
    return {storage: _build(teacher, root / f"{storage}.zarr", storage) for storage in ("full", "topk:8")}


def _stored(cache: Cache) -> dict[str, np.ndarray]:
    return {name: cache.train.read(name) for name in (layout.TOKENS, layout.LOSS_MASK, layout.SOFT,
                                                      layout.SOFT_IDS, layout.SOFT_REST) if name in cache.train.group}


def _check_rows(batches: list[Batch], stored: dict[str, np.ndarray]) -> torch.Tensor:
    """Every batch holds exactly what the cache stores for its rows, widened; returns the rows."""
    for b in batches:
        rows = b.rows.numpy()
        tokens = torch.from_numpy(stored[layout.TOKENS][rows]).long()
        mask = torch.from_numpy(stored[layout.LOSS_MASK][rows])
        assert b.inputs.dtype == torch.int64 and torch.equal(b.inputs, tokens)
        assert torch.equal(b.mask, mask > 0) and torch.equal(b.labels, next_token_targets(tokens, mask))
        values = torch.from_numpy(stored[layout.SOFT][rows]).float()
        if layout.SOFT_IDS in stored:
            assert isinstance(b.soft, TopK) and b.soft.ids.dtype == torch.int64
            assert torch.equal(b.soft.ids, torch.from_numpy(stored[layout.SOFT_IDS][rows]).long())
            assert torch.equal(b.soft.logp, values)
            assert torch.equal(b.soft.rest, torch.from_numpy(stored[layout.SOFT_REST][rows]))
        else:
            assert isinstance(b.soft, torch.Tensor) and b.soft.shape == (len(rows), LENGTH, VOCAB)
            assert torch.equal(b.soft, values)
    return torch.cat([b.rows for b in batches])


@pytest.mark.parametrize("storage", ["full", "topk:8"])
def test_both_loaders_serve_every_row_once_per_epoch_with_its_stored_arrays(caches: dict[str, Cache],
                                                                             storage: str) -> None:
    cache = caches[storage]
    stored = _stored(cache)
    memory = SequenceLoader(cache, batch_size=12)
    stream = StreamLoader(cache, batch_size=12, buffer_chunks=2)
    orders = []
    for epoch in (0, 1):
        for loader in (memory, stream):
            batches = list(loader.epoch(epoch))
            rows = _check_rows(batches, stored)
            assert sorted(rows.tolist()) == list(range(ROWS))
            assert [len(b.rows) for b in batches] == [12] * 8 + [4]  # only the epoch's last batch is short
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    stream.close()


def test_the_stream_is_chunk_shuffled_and_deterministic_whatever_the_workers(caches: dict[str, Cache]) -> None:
    cache = caches["topk:8"]
    plain = [b.rows for b in StreamLoader(cache, batch_size=12, buffer_chunks=2, shuffle_seed=3).epoch(1)]
    with StreamLoader(cache, batch_size=12, buffer_chunks=2, shuffle_seed=3, workers=2) as workers:
        forked = [b.rows for b in workers.epoch(1)]
    assert len(plain) == len(forked) and all(torch.equal(a, b) for a, b in zip(plain, forked))
    first = plain[0]  # a batch draws from one group of buffer_chunks chunks
    assert len(set((first // CHUNK).tolist())) <= 2


def test_ranks_read_disjoint_chunks_that_cover_the_cache(caches: dict[str, Cache]) -> None:
    cache = caches["full"]
    for epoch in (0, 1):
        chunks = []
        for rank in range(3):
            loader = StreamLoader(cache, batch_size=8, buffer_chunks=1, rank=rank, world_size=3)
            rows = torch.cat([b.rows for b in loader.epoch(epoch)])
            mine = set((rows // CHUNK).tolist())
            assert len(rows) == sum(min(CHUNK, ROWS - c * CHUNK) for c in mine)  # whole chunks, each row once
            chunks.append(mine)
        assert set.union(*chunks) == set(range(7)) and sum(map(len, chunks)) == 7
    with pytest.raises(UsageError, match="no inputs, labels or replay"):
        StreamLoader(cache, batch_size=8, labels=torch.zeros(ROWS, dtype=torch.int64))


def test_the_memory_bound_counts_every_streamed_array_and_not_the_rows(
        teacher: torch.nn.Module, caches: dict[str, Cache], tmp_path: Path) -> None:
    small = caches["topk:8"]
    large = _build(teacher, tmp_path / "large.zarr", "topk:8", rows=3 * ROWS)
    # per position: int32 token, uint8 mask, K float16 log-probabilities, K uint16 ids, float32 leftover
    row = LENGTH * (4 + 1 + K * 2 + K * 2 + 4)
    bounds = []
    for cache in (small, large):
        loader = StreamLoader(cache, batch_size=8, buffer_chunks=2, prefetch=1)
        assert loader.buffer_bytes() == 2 * CHUNK * row
        bounds.append(loader.memory_bound())
    assert bounds[0] == bounds[1] == (1 + 1 + 1) * 2 * CHUNK * row + CHUNK * row
    assert memory_bytes(large.train) == 3 * memory_bytes(small.train) == 3 * ROWS * row  # memory mode grows
    full = StreamLoader(caches["full"], batch_size=8, buffer_chunks=2, prefetch=0)
    assert full.buffer_bytes() == 2 * CHUNK * LENGTH * (4 + 1 + VOCAB * 2)


def test_train_picks_the_stream_beyond_the_memory_budget(caches: dict[str, Cache]) -> None:
    cache = caches["topk:8"]
    need = memory_bytes(cache.train)
    assert choose_mode(cache.train, "auto", need) == "memory"
    assert choose_mode(cache.train, "auto", need - 1) == "stream"
    device = torch.device("cpu")
    fits = open_sequence_loader(cache, TrainConfig(memory_budget=need), device)
    assert isinstance(fits, SequenceLoader)
    streamed = open_sequence_loader(cache, TrainConfig(memory_budget=need - 1, buffer_chunks=3, workers=1), device)
    assert isinstance(streamed, StreamLoader)
    assert (streamed.source.buffer_chunks, streamed.workers) == (3, 1)
    assert torch.equal(streamed.probe(), fits.probe()) and streamed.probe().dtype == torch.int64
    streamed.close()


def test_streamed_ranks_share_the_global_batch_and_step_in_lockstep(caches: dict[str, Cache],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import softcache.student.sequence as sequence

    config = TrainConfig(batch_size=16, loader="stream", buffer_chunks=1)
    counts = []
    for rank in range(3):
        monkeypatch.setattr(sequence, "distributed_rank", lambda rank=rank: (rank, 3))
        loader = open_sequence_loader(caches["full"], config, torch.device("cpu"))
        assert isinstance(loader, StreamLoader) and (loader.source.rank, loader.batch_size) == (rank, 5)
        batches = list(loader.epoch(0))
        assert all(len(b.rows) == 5 for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1  # uneven chunk counts (3, 2, 2 of 7) cut to the smallest rank's


def test_a_student_trained_from_the_stream_learns_like_one_trained_in_ram(caches: dict[str, Cache]) -> None:
    students = [StudentConfig(spec="lmkit:student", alpha=0.0, lr=0.03, seed=s) for s in (0, 1)] + \
               [StudentConfig(spec="lmkit:student", alpha=0.8, temperature=T, lr=0.03, seed=s) for s in (0, 1)]
    bits = {}
    for mode in ("memory", "stream"):
        config = TrainConfig(epochs=4, batch_size=16, loader=mode, buffer_chunks=4)  # type: ignore[arg-type]
        board = softcache.train(caches["topk:8"], students, config=config, progress=False).leaderboard
        bits[mode] = {a: board.filter(board["alpha"] == a)["bits_per_token"].mean() for a in (0.0, 0.8)}
        assert bits[mode][0.8] < bits[mode][0.0]  # distilling beats cross-entropy alone
        assert all(0 < v <= 1 for v in board["teacher_agreement"].to_list())
    for alpha in (0.0, 0.8):  # another row order, the same result within a twentieth of a bit
        assert math.isclose(bits["stream"][alpha], bits["memory"][alpha], abs_tol=0.05)
    assert bits["stream"][0.8] < math.log2(VOCAB) - 1  # far better than chance


# -- garbage does not train from the stream either --------------------------------------------

@pytest.fixture()
def copy(caches: dict[str, Cache], tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(caches["topk:8"].url, target)
    return target


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("softcache.student.train")

    def fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a student trained on a cache that should have been refused")

    monkeypatch.setattr(module, "fit", fit)


def _tamper(path: Path, name: str, change: Callable[[np.ndarray], None]) -> None:
    array = zarr.open_array(str(path / name), mode="r+").with_config({"write_empty_chunks": True})
    values = array[:]
    change(values)
    array[:] = values


def _refusal(path: Path, loader: str) -> str:
    config = TrainConfig(epochs=1, batch_size=16, loader=loader, buffer_chunks=1)  # type: ignore[arg-type]
    with pytest.raises(CacheError) as info:
        softcache.train(str(path), StudentConfig(spec="lmkit:student", temperature=T), config=config, progress=False)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("loader", ["memory", "stream"])
@pytest.mark.parametrize(("name", "what"), [(layout.TOKENS, "token ids"), (layout.SOFT_IDS, "soft label ids")])
def test_ids_outside_the_vocabulary_are_refused(copy: Path, loader: str, name: str, what: str,
                                                no_training: None) -> None:
    _tamper(copy, name, lambda v: v.__setitem__((90, 3), VOCAB))  # in the last chunk
    assert f"train {what} fall outside the vocabulary [0, {VOCAB})" in _refusal(copy, loader)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_nonfinite_soft_labels_are_refused(copy: Path, loader: str, no_training: None) -> None:
    _tamper(copy, layout.SOFT, lambda v: v.__setitem__((40, 2, 0), np.nan))
    assert "[40]" in _refusal(copy, loader)


def test_the_checks_read_one_group_of_chunks_at_a_time(copy: Path) -> None:
    loader = StreamLoader(open_cache(str(copy)), batch_size=16, buffer_chunks=3)
    shapes = [(start, values.shape) for start, values in loader.soft_blocks()]
    assert shapes == [(0, (48, LENGTH, K)), (0, (48, LENGTH)), (48, (48, LENGTH, K)), (48, (48, LENGTH)),
                      (96, (4, LENGTH, K)), (96, (4, LENGTH))]
    assert [(s, tuple(b)) for s, b in loader.blocks(layout.TOKENS, layout.SOFT_IDS)] == \
        [(s, (layout.TOKENS, layout.SOFT_IDS)) for s in (0, 48, 96)]
