"""Sampled soft labels (``--storage sample:N``): N draws from the teacher's distribution at T per
position, stored as distinct ids and uint8 counts. What a build stores, that the draws depend on
nothing but (seed, row, position, draw) and the teacher, that their mean is the teacher's
distribution (and that the same check catches a biased sampler), the loss on zero-mass slots,
students trained from such a cache, and the one-line refusals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchkit import main
from torch import nn

import lmkit
import softcache
from softcache.cache import layout
from softcache.cache.manifest import Manifest, StorageInfo
from softcache.cache.store import Cache
from softcache.cache.summary import summarize
from softcache.config import StudentConfig, TrainConfig
from softcache.errors import CacheError, UsageError
from softcache.student._batch import TopK
from softcache.student.loss import distillation_loss, topk_kl
from softcache.student.sequence import SequenceLoader
from softcache.student.stream import StreamLoader
from softcache.teacher.label import compact, draw_uniforms

T = 1.0
N = 12
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return lmkit.teacher()


def _build(teacher: nn.Module, out: Path, storage: str = f"sample:{N}", **options: object) -> Cache:
    options = {"chunk_rows": 16, **options}
    return softcache.build(teacher, lmkit.rows(), str(out), eval_data=lmkit.rows(n=16, split="eval"),
                           storage=storage, temperature=T, progress=False, **options)


@pytest.fixture(scope="module")
def sampled(teacher: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return _build(teacher, tmp_path_factory.mktemp("sampled") / "s.zarr")


def _soft(cache: Cache, split: str = "train") -> dict[str, np.ndarray]:
    chosen = cache.train if split == "train" else cache.eval
    return {name: chosen.read(name) for name in (layout.SOFT, layout.SOFT_IDS, layout.SOFT_REST)
            if name in chosen.group}


# -- what a build stores ----------------------------------------------------------------------


def test_counts_and_ids_in_fixed_slots_most_drawn_first(sampled: Cache) -> None:
    stored = _soft(sampled)
    ids, counts = stored[layout.SOFT_IDS], stored[layout.SOFT]
    assert set(stored) == {layout.SOFT, layout.SOFT_IDS}  # no leftover: the counts sum to N
    assert (ids.dtype, ids.shape, counts.dtype, counts.shape) == (np.uint16, (48, 16, N), np.uint8, (48, 16, N))
    assert (counts.astype(int).sum(-1) == N).all()
    assert (np.diff(counts.astype(int), axis=-1) <= 0).all()  # most drawn first
    used = counts > 0
    assert (ids[~used] == 0).all() and used[..., 0].all()
    for row, pos in [(0, 0), (7, 3), (47, 15)]:  # the used slots hold distinct ids
        drawn = ids[row, pos][used[row, pos]]
        assert len(set(drawn.tolist())) == len(drawn)
    assert 1 < used.sum(-1).mean() < N  # neither one-hot nor all distinct: the test data has a spread teacher


def test_the_stored_draws_follow_the_documented_rule(sampled: Cache, teacher: nn.Module) -> None:
    """Rebuilt with zarr-free code: log-softmax at T of the teacher's logits, then compact() with the
    manifest's storage, rows numbered from 0."""
    with torch.no_grad():
        scaled = teacher(lmkit.rows().tokens) / T
    want = compact(scaled, sampled.manifest.storage, first_row=0)
    stored = _soft(sampled)
    assert np.array_equal(stored[layout.SOFT_IDS], want[layout.SOFT_IDS])
    assert np.array_equal(stored[layout.SOFT], want[layout.SOFT])


def test_teacher_statistics_stay_exact(sampled: Cache, teacher: nn.Module) -> None:
    with torch.no_grad():
        p = teacher(lmkit.rows().tokens).softmax(-1)
    np.testing.assert_allclose(sampled.train.read("stats/max_prob"), p.max(-1).values.numpy(), rtol=1e-5)
    assert np.array_equal(sampled.train.read("stats/prediction"), p.argmax(-1).numpy())


def test_manifest_records_the_draws_and_the_seed(sampled: Cache, teacher: nn.Module, tmp_path: Path) -> None:
    m = sampled.manifest
    st = m.storage
    assert (st.mode, st.k, st.dtype, st.id_dtype, st.values, st.seed) == ("sample", N, "uint8", "uint16", "counts", 0)
    assert m.schema_version == 2 and m.key() == m.cache_key
    raw = m.to_json()
    assert raw["storage"]["seed"] == 0 and raw["storage"]["sampler"] == st.sampler == "systematic"
    jsonschema.validate(raw, json.loads((SCHEMAS / "manifest.schema.json").read_text()))
    assert softcache.validate(sampled.url, deep=True)["valid"]
    info = summarize(sampled)
    assert info["bytes_per_token"] == pytest.approx(3 * N)  # uint8 count + uint16 id per slot
    other = _build(teacher, tmp_path / "seed3.zarr", f"sample:{N}:3")
    assert other.manifest.storage.seed == 3 and other.manifest.cache_key != m.cache_key
    assert not np.array_equal(_soft(other)[layout.SOFT_IDS], _soft(sampled)[layout.SOFT_IDS])


def test_a_compact_manifest_without_draws_records_no_seed(sampled: Cache) -> None:
    data = sampled.manifest.to_json()
    data["storage"] = {"mode": "topk", "k": 8, "dtype": "float16", "id_dtype": "uint16", "values": "logprobs"}
    topk = Manifest.from_json(data)
    assert "seed" not in topk.to_json()["storage"]


@pytest.mark.parametrize("storage, words", [
    ({"k": 300}, "1 <= k <= 255"),
    ({"seed": None}, "a seed"),
    ({"dtype": "float16"}, "uint8 values 'counts'"),
    ({"values": "logprobs"}, "uint8 values 'counts'"),
])
def test_an_inconsistent_sample_manifest_is_one_line(sampled: Cache, storage: dict, words: str) -> None:
    data = sampled.manifest.to_json()
    data["storage"] = data["storage"] | storage
    with pytest.raises(CacheError, match=words) as info:
        Manifest.from_json(data)
    assert "\n" not in str(info.value)


def test_same_draws_on_rebuild_sharded_and_resumed_builds(sampled: Cache, teacher: nn.Module, tmp_path: Path) -> None:
    """Other chunking and teacher batches than the reference build, and rows written by two
    workers or across a resume: the draws are the same, split by split."""
    rebuilt = _build(teacher, tmp_path / "again.zarr", chunk_rows=8, batch_size=5)
    sharded = tmp_path / "sharded.zarr"
    _build(teacher, sharded, chunk_rows=8, shard_chunks=1, shard="0/2")
    both = _build(teacher, sharded, chunk_rows=8, shard_chunks=1, shard="1/2")
    resumed = tmp_path / "resumed.zarr"
    part = _build(teacher, resumed, chunk_rows=8, shard_chunks=1, shard="0/2")
    assert part.manifest.status.state == "building"
    finished = _build(teacher, resumed, chunk_rows=8, shard_chunks=1, resume=True)
    for cache in (rebuilt, both, finished):
        assert cache.complete
        for split in ("train", "eval"):
            got, want = _soft(cache, split), _soft(sampled, split)
            assert all(np.array_equal(got[name], want[name]) for name in want), (cache.url, split)


def test_a_classified_sample_cache_stores_draws_per_view(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    few = softcache.build(teacher, "softcache.digits:load,split=test", str(tmp_path / "few.zarr"), storage="sample:5",
                          progress=False)
    many = softcache.build(teacher, "softcache.digits:load,split=test", str(tmp_path / "many.zarr"),
                           storage="sample:30", progress=False)
    ids, counts = few.train.read(layout.SOFT_IDS), few.train.read(layout.SOFT)
    assert (ids.dtype, ids.shape, counts.shape) == (np.uint16, (597, 1, 5), (597, 1, 5))
    assert (counts.astype(int).sum(-1) == 5).all()
    # at most 10 distinct classes: 30 draws need 10 slots, not 30
    assert many.train.read(layout.SOFT).shape == (597, 1, 10) and (many.train.read(layout.SOFT).sum(-1) == 30).all()
    assert softcache.validate(many.url, deep=True)["valid"]
    board = softcache.train(few, StudentConfig(spec="softcache.models:mlp"), config=TrainConfig(epochs=1),
                            progress=False).leaderboard  # tests/test_compact_samples.py trains them in depth
    assert len(board) == 1 and math.isfinite(board["final_loss"][0])


# -- unbiasedness -----------------------------------------------------------------------------


SEEDS = 400
Z = 5.0


def matches_teacher(mean: np.ndarray, p: np.ndarray, draws: int, z: float = Z) -> bool:
    """Whether ``mean`` (the average of ``counts / N`` over independent seeds, ``draws`` draws in
    all per position) is the teacher's ``p`` within ``z`` standard errors for every class, the
    error of a class being ``sqrt(p (1 - p) / draws)`` (the binomial count of ``draws`` draws).
    A class of probability 0 must never be drawn at all."""
    sigma = np.sqrt(p * (1 - p) / draws)
    never = p == 0
    return bool((mean[never] == 0).all() and (np.abs(mean - p)[~never] < z * sigma[~never]).all())


def _distributions() -> torch.Tensor:
    """z / T ``(2, 3, 20)``: sharp, flat and middling positions, with two impossible classes."""
    gen = torch.Generator().manual_seed(5)
    scaled = torch.randn(2, 3, 20, generator=gen) * torch.tensor([0.5, 1.5, 3.0]).view(1, 3, 1)
    scaled[0, 1, 4] = scaled[1, 2, 19] = -math.inf
    return scaled


def _dense(stored: dict[str, np.ndarray], classes: int) -> np.ndarray:
    counts, ids = stored[layout.SOFT].astype(np.float64), stored[layout.SOFT_IDS].astype(np.int64)
    out = np.zeros((*counts.shape[:-1], classes))
    for slot in range(ids.shape[-1]):  # unused slots add 0 to class 0
        np.add.at(out, (*np.indices(ids.shape[:-1]), ids[..., slot]), counts[..., slot])
    return out / counts.sum(-1, keepdims=True)


Sampler = Callable[[torch.Tensor, int], dict[str, np.ndarray]]


def _storage(seed: int, sampler: str | None = "systematic") -> StorageInfo:
    """Sampled storage as builds write it (systematic draws), or with independent draws."""
    return StorageInfo(mode="sample", k=N, dtype="uint8", id_dtype="uint16", values="counts", seed=seed,
                       sampler=sampler)  # type: ignore[arg-type]


def _stored_sampler(scaled: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    return compact(scaled, _storage(seed), first_row=3)


def _independent_sampler(scaled: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    return compact(scaled, _storage(seed, None), first_row=3)


def _sharpened_sampler(scaled: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Draws from p^1.5, renormalised: a sampler at the wrong temperature."""
    return compact(scaled * 1.5, _storage(seed), first_row=3)


def _topk_sampler(scaled: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Draws from the 6 most probable classes only, renormalised."""
    cut = scaled.topk(6, -1).values[..., -1:]
    return compact(scaled.masked_fill(scaled < cut, -math.inf), _storage(seed), first_row=3)


def _mean_target(sampler: Sampler, scaled: torch.Tensor) -> np.ndarray:
    return sum(_dense(sampler(scaled, seed), scaled.shape[-1]) for seed in range(SEEDS)) / SEEDS


@pytest.mark.parametrize("sampler", [_stored_sampler, _independent_sampler], ids=["systematic", "independent"])
def test_the_mean_of_sampled_targets_is_the_teacher_distribution(sampler: Sampler) -> None:
    scaled = _distributions()
    p = scaled.softmax(-1).double().numpy()
    mean = _mean_target(sampler, scaled)
    assert matches_teacher(mean, p, N * SEEDS)
    assert np.allclose(mean.sum(-1), 1) and (mean[0, 1, 4], mean[1, 2, 19]) == (0, 0)
    # the check is not vacuous: a single seed's target is far from p, and the tolerance is tight
    assert not matches_teacher(_dense(sampler(scaled, 0), 20), p, N * SEEDS)


def test_systematic_draws_give_every_class_the_floor_or_ceiling_of_its_expected_count() -> None:
    """What makes systematic draws worth it: no class strays from ``N p`` by a whole draw, where
    independent draws stray by several."""
    scaled = _distributions()
    expected = scaled.softmax(-1).double().numpy() * N
    spread = {}
    for name, sampler in (("systematic", _stored_sampler), ("independent", _independent_sampler)):
        counts = np.stack([_dense(sampler(scaled, seed), 20) * N for seed in range(50)])
        spread[name] = np.abs(counts - expected).max()
        if name == "systematic":
            assert ((counts >= np.floor(expected) - 1e-9) & (counts <= np.ceil(expected) + 1e-9)).all()
    assert spread["systematic"] < 1 < spread["independent"]


@pytest.mark.parametrize("biased", [_sharpened_sampler, _topk_sampler], ids=["p^1.5", "top-6 only"])
def test_a_biased_sampler_fails_the_same_check(biased: Sampler) -> None:
    scaled = _distributions()
    p = scaled.softmax(-1).double().numpy()
    assert not matches_teacher(_mean_target(biased, scaled), p, N * SEEDS)


def test_uniforms_are_a_function_of_seed_row_position_and_draw() -> None:
    whole = draw_uniforms(7, np.arange(10, 20), 4, 6)
    assert np.array_equal(whole[3:5], draw_uniforms(7, np.array([13, 14]), 4, 6))
    assert np.array_equal(whole[:, :2, :3], draw_uniforms(7, np.arange(10, 20), 2, 3))
    assert not np.array_equal(whole, draw_uniforms(8, np.arange(10, 20), 4, 6))
    assert whole.min() >= 0 and whole.max() < 1 and abs(whole.mean() - 0.5) < 0.05


# -- the loss on sampled targets --------------------------------------------------------------


def _sampled_target() -> tuple[TopK, torch.Tensor]:
    """Counts with unused slots (id 0, count 0), one position all unused (damaged), and the dense
    target ``counts / N`` they stand for."""
    ids = torch.tensor([[3, 1, 0, 0], [0, 2, 5, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    counts = torch.tensor([[7, 5, 0, 0], [6, 3, 3, 0], [12, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    dense = torch.zeros(4, 6).scatter_add_(1, ids, counts.float()) / N
    return TopK.sampled(ids, counts), dense


@pytest.mark.parametrize("leftover", ["bucket", "label", "renormalize"])
def test_zero_mass_slots_add_nothing_to_the_loss_or_its_gradient(leftover: str) -> None:
    target, dense = _sampled_target()
    assert torch.isinf(target.logp[0, 2:]).all() and (target.rest == 0).all()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=gen, requires_grad=True)
    got = topk_kl(F.log_softmax(logits, -1), target, torch.tensor([1, 2, -1, 0]), leftover)  # type: ignore[arg-type]
    got.backward()
    grad, logits.grad = logits.grad.clone(), None
    want = F.kl_div(F.log_softmax(logits, -1), dense, reduction="batchmean")  # dense KL; xlogy(0, 0) = 0
    want.backward()
    assert torch.isfinite(got) and torch.isfinite(grad).all()
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(grad, logits.grad, atol=1e-6)


def test_distillation_loss_on_sampled_counts_matches_dense_kd() -> None:
    target, dense = _sampled_target()
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    got = distillation_loss(logits, target, None, temperature=1.0, alpha=1.0)
    want = F.kl_div(F.log_softmax(logits, -1), dense, reduction="batchmean")
    assert torch.allclose(got, want, atol=1e-6)


# -- training ---------------------------------------------------------------------------------


def test_both_loaders_serve_the_counts_as_a_normalised_target(sampled: Cache) -> None:
    stored = _soft(sampled)
    memory = SequenceLoader(sampled, batch_size=16)
    with StreamLoader(sampled, batch_size=16, buffer_chunks=2) as stream:
        for loader in (memory, stream):
            for batch in loader.epoch(0):
                rows = batch.rows.numpy()
                soft = batch.soft
                assert isinstance(soft, TopK)
                counts = torch.from_numpy(stored[layout.SOFT][rows].astype(np.float32))
                assert torch.equal(soft.ids, torch.from_numpy(stored[layout.SOFT_IDS][rows].astype(np.int64)))
                assert torch.allclose(soft.logp.exp(), counts / N) and (soft.rest == 0).all()


def test_distilling_from_a_sample_cache_beats_cross_entropy(sampled: Cache) -> None:
    students = [StudentConfig(spec="lmkit:student", alpha=0.0, lr=0.03, seed=s) for s in (0, 1)] + \
               [StudentConfig(spec="lmkit:student", alpha=0.8, temperature=T, lr=0.03, seed=s) for s in (0, 1)]
    board = softcache.train(sampled, students, config=TrainConfig(epochs=8, batch_size=16), progress=False).leaderboard
    bits = {a: board.filter(board["alpha"] == a)["bits_per_token"].mean() for a in (0.0, 0.8)}
    assert bits[0.8] < bits[0.0] - 0.05, bits
    assert all(math.isfinite(x) for x in board["final_loss"].to_list())


def test_a_sample_cache_trains_only_at_its_own_temperature(sampled: Cache) -> None:
    with pytest.raises(UsageError, match="holds draws from the teacher's distribution at T=1") as info:
        softcache.train(sampled, StudentConfig(spec="lmkit:student", temperature=4.0), progress=False)
    assert "\n" not in str(info.value)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("storage, words", [
    ("sample:0", "N must be a whole number from 1 to 255"),
    ("sample:300", "N must be a whole number from 1 to 255"),
    ("sample:x", "N must be a whole number from 1 to 255"),
    ("sample:", "N must be a whole number from 1 to 255"),
    ("sample:12:x", "SEED must be a whole number"),
])
def test_bad_sample_storage_is_one_line_exit_2(storage: str, words: str, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    result = main("build", "--teacher", "lmkit:teacher", "--data", "lmkit:rows,n=8", "--storage", storage,
                  "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("softcache: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
