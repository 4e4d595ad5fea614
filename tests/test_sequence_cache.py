"""Token-sequence caches: what a build stores per position, the top-k losses, and training a
causal-LM student from the cache alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

import lmkit
import softcache
from softcache.cache.store import Cache
from softcache.config import StudentConfig, TrainConfig
from softcache.errors import CacheError, UsageError
from softcache.student._batch import TopK
from softcache.student.loss import distillation_loss, topk_kl

T = 1.0


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return lmkit.teacher()


def _build(teacher: torch.nn.Module, out: Path, storage: str) -> Cache:
    return softcache.build(teacher, lmkit.rows(), str(out), eval_data=lmkit.rows(n=16, split="eval"),
                           storage=storage, temperature=T, progress=False, chunk_rows=16)


@pytest.fixture(scope="module")
def full_cache(teacher: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return _build(teacher, tmp_path_factory.mktemp("seq") / "full.zarr", "full")


@pytest.fixture(scope="module")
def topk_cache(teacher: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return _build(teacher, tmp_path_factory.mktemp("seq") / "topk.zarr", "topk:8")


def test_full_storage_holds_every_position_logits_over_t(full_cache: Cache, teacher: torch.nn.Module) -> None:
    rows = lmkit.rows()
    with torch.no_grad():
        want = (teacher(rows.tokens) / T).numpy()
    stored = full_cache.train.read("soft_labels")
    assert stored.shape == (48, 16, 64) and stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), want, rtol=1e-3, atol=2e-3)
    assert np.array_equal(full_cache.train.read("tokens"), rows.tokens.numpy())
    assert full_cache.train.read("loss_mask").all()
    assert full_cache.train.read("stats/prediction").shape == (48, 16)


def test_topk_storage_keeps_the_k_largest_with_the_leftover_mass(topk_cache: Cache, teacher: torch.nn.Module) -> None:
    rows = lmkit.rows()
    with torch.no_grad():
        logp = torch.log_softmax(teacher(rows.tokens) / T, -1)
    ids = topk_cache.train.read("soft_ids")
    values = topk_cache.train.read("soft_labels").astype(np.float32)
    rest = topk_cache.train.read("soft_rest")
    assert ids.dtype == np.uint16 and ids.shape == (48, 16, 8)
    want_values, want_ids = logp.topk(8, -1)
    assert np.array_equal(ids.astype(np.int64), want_ids.numpy())
    np.testing.assert_allclose(values, want_values.numpy(), atol=1e-2)
    outside = 1 - want_values.exp().sum(-1)
    np.testing.assert_allclose(rest, outside.numpy(), atol=1e-6)
    assert (rest > 0.01).any()  # the teacher is not one-hot: the leftover matters


@pytest.mark.parametrize("classes,k", [(8192, 64), (50257, 16), (4099, 2), (600, 64)])
def test_top_classes_is_torch_topk(classes: int, k: int) -> None:
    from softcache.teacher.label import top_classes

    gen = torch.Generator().manual_seed(classes)
    z = torch.randn(40, classes, generator=gen) * 3
    z[0, -1] = 50.0  # the largest entry past the last whole group
    z[1, :] = z[1, :].round()  # many ties: the values still agree
    values, ids = top_classes(z, k)
    want_values, want_ids = z.topk(k, dim=-1)
    assert torch.equal(values, want_values)
    assert torch.equal(ids[2:], want_ids[2:]) and ids[0, 0] == classes - 1
    assert torch.equal(z.gather(1, ids), values)


def reference_stats(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """The statistics at T=1 the plain way (a log-softmax, its exponentials, a top-2, an argmax):
    the oracle the build's one-pass statistics are checked against."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    return {"stats/max_prob": top2[..., 0].numpy(), "stats/entropy": (-(p * logp).sum(-1)).numpy(),
            "stats/margin": (top2[..., 0] - top2[..., 1]).numpy(), "stats/prediction": p.argmax(-1).numpy()}


@pytest.mark.parametrize("mode", ["topk:32", "full", "sample:12"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_row_arrays_agree_with_the_full_distribution(temperature: float, mode: str) -> None:
    from softcache.teacher.plan import storage_info
    from softcache.teacher.label import RowBlock, block_arrays, compact

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8192, generator=gen) * 4
    storage = storage_info(mode, "float16", 8192)
    block = RowBlock(inputs=torch.zeros(64, 1), labels=None, sample_index=np.arange(64))
    got = {k: v[:, 0] for k, v in block_arrays(z.unsqueeze(1), block, 0, temperature, "float16", storage).items()
           if k.startswith(("soft", "stats"))}
    want = {k: v[:, 0] for k, v in compact(z.unsqueeze(1) / temperature, storage).items()} | reference_stats(z)
    assert set(want) - set(got) == set()
    if "soft_ids" in want:
        assert np.array_equal(got["soft_ids"], want["soft_ids"])
    for key in ("soft_labels", "soft_rest", "stats/max_prob", "stats/entropy", "stats/margin"):
        if key in want:
            np.testing.assert_allclose(got[key].astype(np.float32), want[key].astype(np.float32), rtol=1e-3, atol=1e-5)
    assert np.array_equal(got["stats/prediction"], want["stats/prediction"])


def test_uint8_topk_values_are_log_probabilities_in_recorded_steps(teacher: torch.nn.Module, tmp_path: Path) -> None:
    from softcache.cache.manifest import LOGPROB_STEP, StorageInfo
    from softcache.cache.summary import summarize

    cache = softcache.build(teacher, lmkit.rows(), str(tmp_path / "q.zarr"), eval_data=lmkit.rows(n=16, split="eval"),
                            storage="topk:8", dtype="uint8", temperature=T, progress=False, chunk_rows=16)
    st = cache.manifest.storage
    assert (st.dtype, st.scale, st.values) == ("uint8", LOGPROB_STEP, "logprobs")
    assert cache.manifest.to_json()["storage"]["scale"] == LOGPROB_STEP
    with torch.no_grad():
        want, want_ids = torch.log_softmax(teacher(lmkit.rows().tokens) / T, -1).topk(8, -1)
    stored = cache.train.read("soft_labels")
    assert stored.dtype == np.uint8
    assert np.array_equal(cache.train.read("soft_ids").astype(np.int64), want_ids.numpy())
    got = -stored.astype(np.float64) * LOGPROB_STEP
    inside = want.numpy() > -255 * LOGPROB_STEP
    assert inside.mean() > 0.9 and np.abs(got - want.numpy())[inside].max() <= LOGPROB_STEP / 2 + 1e-6
    assert (stored[~inside] == 255).all()
    assert summarize(cache)["bytes_per_token"] == pytest.approx(8 * (1 + 2) + 4)  # uint8 value, uint16 id; leftover
    # the loaders widen it back, and a student trains from it
    from softcache.student.sequence import SequenceLoader

    loader = SequenceLoader(cache, batch_size=8)
    batch = next(iter(loader.epoch(0)))
    assert torch.allclose(batch.soft.logp, torch.from_numpy(got[batch.rows.numpy()]).float())
    board = softcache.train(cache, StudentConfig(spec="lmkit:student", alpha=0.9, temperature=T, lr=0.03),
                            config=TrainConfig(epochs=1, batch_size=8), progress=False).leaderboard
    assert math.isfinite(board["bits_per_token"][0])
    # another scale is not this version's; float storage has none; full storage is never uint8
    assert StorageInfo(mode="topk", k=8, dtype="uint8", id_dtype="uint16", values="logprobs", scale=0.1).problem(64)
    assert StorageInfo(mode="topk", k=8, dtype="float16", id_dtype="uint16", values="logprobs",
                       scale=LOGPROB_STEP).problem(64)
    with pytest.raises(UsageError, match="uint8 quantises top-k"):
        softcache.build(teacher, lmkit.rows(), str(tmp_path / "f.zarr"), dtype="uint8", temperature=T, progress=False)
    assert not (tmp_path / "f.zarr").exists()


def test_manifest_records_the_sequence_section(topk_cache: Cache, full_cache: Cache) -> None:
    m = topk_cache.manifest
    assert (m.kind, m.schema_version, m.sequence.length, m.sequence.vocab_size) == ("sequence", 2, 16, 64)
    assert m.sequence.tokenizer.name == "lmkit" and m.sequence.packing["method"] == "synthetic"
    assert (m.storage.mode, m.storage.k, m.storage.id_dtype, m.storage.values) == ("topk", 8, "uint16", "logprobs")
    assert full_cache.manifest.cache_key != m.cache_key
    assert softcache.validate(topk_cache.url, deep=True)["valid"]


def test_the_recorded_weights_digest_is_the_teachers(teacher: torch.nn.Module, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Token-row builds hash a CPU teacher in the store-opening thread too, beside its first
    calls; the digest and the key are the teacher's own."""
    import threading

    from softcache import weights

    real, threads = weights.state_digest, []

    def recorded(state: object) -> str:
        threads.append(threading.current_thread().name)
        return real(state)  # type: ignore[arg-type]

    monkeypatch.setattr(weights, "state_digest", recorded)
    manifest = _build(teacher, tmp_path / "c.zarr", "topk:8").manifest
    assert threads == ["softcache-open"]
    assert manifest.teacher.weights_digest == real(teacher.state_dict()) and manifest.cache_key == manifest.key()


def test_a_plain_sample_cache_stays_format_version_1(cache: Cache) -> None:
    raw = json.loads((Path(cache.url) / "zarr.json").read_text())["attributes"]["softcache"]
    assert raw["schema_version"] == 1
    assert "kind" not in raw and "sequence" not in raw and set(raw["storage"]) == {"mode", "k", "dtype"}
    assert cache.manifest.key() == cache.manifest.cache_key


def test_numpy_rebuilds_the_teacher_distribution_at_one_position(topk_cache: Cache, teacher: torch.nn.Module) -> None:
    """The README's recipe, with zarr and numpy only."""
    group = zarr.open_group(topk_cache.url, mode="r")
    meta = group.attrs["softcache"]
    row, pos, vocab = 5, 3, meta["sequence"]["vocab_size"]
    ids = group["soft_ids"][row, pos].astype(np.int64)
    p = np.exp(group["soft_labels"][row, pos].astype(np.float64))
    rest = float(group["soft_rest"][row, pos])
    dist = np.full(vocab, rest / (vocab - len(ids)))  # the leftover spread over the classes not kept
    dist[ids] = p
    with torch.no_grad():
        want = torch.softmax(teacher(lmkit.rows().tokens[row : row + 1]) / meta["temperature"], -1)[0, pos].numpy()
    assert abs(dist.sum() - 1) < 1e-2
    np.testing.assert_allclose(dist[ids], want[ids], atol=2e-3)


def _topk(logits: torch.Tensor, k: int) -> TopK:
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    return TopK(ids, values, (1 - values.exp().sum(-1)).clamp(min=0))


def test_bucket_leftover_is_the_kl_of_the_coarsened_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 20, generator=gen) * 2, torch.randn(6, 20, generator=gen)
    soft = _topk(teacher, 5)
    log_q = torch.log_softmax(student, -1)
    got = topk_kl(log_q, soft, None, "bucket")
    p, q = teacher.softmax(-1), log_q.exp()
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(1, soft.ids, True)
    pc = torch.cat([torch.where(kept, p, 0), (p * ~kept).sum(1, keepdim=True)], 1)
    qc = torch.cat([torch.where(kept, q, 0), (q * ~kept).sum(1, keepdim=True)], 1)
    want = (torch.where(pc > 0, pc * (pc.log() - qc.clamp(min=1e-30).log()), 0)).sum() / 6
    assert torch.allclose(got, want, atol=1e-5)


def test_topk_of_every_class_is_full_kd() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen, requires_grad=True)
    full = distillation_loss(student, teacher, None, temperature=1.0, alpha=1.0)
    compact = distillation_loss(student, _topk(teacher, 7), None, temperature=1.0, alpha=1.0)
    assert torch.allclose(full, compact, atol=1e-5)


def test_label_and_renormalize_leftovers() -> None:
    gen = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    soft, log_q = _topk(teacher, 3), torch.log_softmax(student, -1)
    outside = int(next(c for c in range(9) if c not in soft.ids[1].tolist()))
    labels = torch.tensor([int(soft.ids[0, 1]), outside, -1])  # a label the teacher kept, one it did not, none
    got = topk_kl(log_q, soft, labels, "label")
    p = soft.logp.exp()
    want = []
    for row in range(3):  # the KL of the teacher's target, written out densely
        target = torch.zeros(9).scatter(0, soft.ids[row], p[row])
        if labels[row] >= 0:  # the leftover joins the label's mass: one class, one term
            target[labels[row]] += soft.rest[row]
            live = target > 0
            want.append((target[live] * (target[live].log() - log_q[row][live])).sum())
        else:  # the bucket: the student's mass outside the kept ids
            q_rest = 1 - log_q[row].gather(0, soft.ids[row]).exp().sum()
            kept = (p[row] * (soft.logp[row] - log_q[row].gather(0, soft.ids[row]))).sum()
            want.append(kept + soft.rest[row] * (soft.rest[row].log() - q_rest.log()))
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-5)
    renorm = topk_kl(log_q, soft, None, "renormalize")
    pn = p / p.sum(1, keepdim=True)
    assert torch.allclose(renorm, (pn * (pn.log() - log_q.gather(1, soft.ids))).sum(1).mean(), atol=1e-5)


def test_the_label_leftover_kl_is_never_negative() -> None:
    """A student that is the merged target itself has KL 0, whether the label was kept or not."""
    gen = torch.Generator().manual_seed(3)
    soft = _topk(torch.randn(2, 9, generator=gen) * 2, 3)
    labels = torch.tensor([int(soft.ids[0, 0]), int(next(c for c in range(9) if c not in soft.ids[1].tolist()))])
    target = torch.zeros(2, 9).scatter(1, soft.ids, soft.logp.exp())
    target[torch.arange(2), labels] += soft.rest
    for row in range(2):
        got = topk_kl(target[row : row + 1].clamp(min=1e-12).log(), soft.select(torch.tensor([row])),
                      labels[row : row + 1], "label")
        assert abs(float(got)) < 1e-5


def test_distilling_from_the_topk_cache_beats_cross_entropy(topk_cache: Cache) -> None:
    students = [StudentConfig(spec="lmkit:student", alpha=0.0, lr=0.03, seed=s) for s in (0, 1)] + \
               [StudentConfig(spec="lmkit:student", alpha=0.8, temperature=T, lr=0.03, seed=s) for s in (0, 1)]
    board = softcache.train(topk_cache, students, config=TrainConfig(epochs=8, batch_size=16), progress=False).leaderboard
    assert {"bits_per_token", "perplexity", "accuracy", "teacher_agreement"} <= set(board.columns)
    bits = {a: board.filter(board["alpha"] == a)["bits_per_token"].mean() for a in (0.0, 0.8)}
    assert bits[0.8] < bits[0.0]
    assert board["bits_per_token"].to_list() == sorted(board["bits_per_token"].to_list())
    row = board.row(0, named=True)
    assert math.isclose(row["perplexity"], 2 ** row["bits_per_token"], rel_tol=1e-9)
    assert 0 < row["teacher_agreement"] <= 1


def test_a_student_of_another_vocabulary_is_refused(topk_cache: Cache) -> None:
    with pytest.raises(CacheError, match="vocabulary has 64 tokens") as info:
        softcache.train(topk_cache, StudentConfig(spec="lmkit:student,vocab=80", temperature=T), progress=False)
    assert "\n" not in str(info.value)


def test_a_topk_cache_trains_only_at_its_own_temperature(topk_cache: Cache) -> None:
    with pytest.raises(UsageError, match="T=1"):
        softcache.train(topk_cache, StudentConfig(spec="lmkit:student", temperature=4.0), progress=False)


def test_stats_and_inspect_speak_of_positions_and_tokens(topk_cache: Cache) -> None:
    stats = topk_cache.train.stats()
    assert {"position", "token", "target", "prediction", "correct"} <= set(stats.columns)
    assert len(stats) == 48 * 16
    assert stats.filter(stats["position"] == 15)["target"].to_list() == [-1] * 48
    from softcache.cache.summary import summarize

    info = summarize(topk_cache)
    per_token = 8 * 2 + 8 * 2 + 4  # values (fp16), ids (uint16), leftover (fp32)
    assert info["kind"] == "sequence" and info["bytes_per_token"] == pytest.approx(per_token)


@pytest.mark.parametrize("leftover", ["bucket", "label"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("counts", [None, (80.0, 70.0)])
def test_the_closed_form_compact_loss_is_the_autograd_one(leftover: str, alpha: float, sampled: bool,
                                                           counts: tuple[float, float] | None) -> None:
    """At T=1 a compact target takes the closed-form path; its loss and gradient must be those of
    the plain autograd composition (topk_kl + cross-entropy), also with a rank's global counts."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(40, 30, generator=gen) * 2).requires_grad_()
    logp_all = torch.log_softmax(torch.randn(40, 30, generator=gen) * 2, -1)
    if sampled:
        draws = torch.multinomial(logp_all.exp(), 12, replacement=True, generator=gen)
        counts_per_id = torch.zeros(40, 30).scatter_add_(1, draws, torch.ones(40, 12))
        c, i = counts_per_id.sort(-1, descending=True)
        soft = TopK.sampled(torch.where(c[:, :12] > 0, i[:, :12], 0), c[:, :12])
    else:
        values, ids = logp_all.topk(6, -1)
        soft = TopK(ids, values, (1 - values.exp().sum(-1)).clamp(min=0))
    labels = torch.randint(-1, 30, (40,), generator=gen)
    fused = distillation_loss(z, soft, labels, temperature=1.0, alpha=alpha, leftover=leftover, counts=counts)
    (g_fused,) = torch.autograd.grad(fused, z)
    log_q = F.log_softmax(z, -1)
    ref = alpha * topk_kl(log_q, soft, labels, leftover, count=None if counts is None else counts[0])
    if alpha < 1:
        ce = F.cross_entropy(z, labels, ignore_index=-1, reduction="sum")
        ref = ref + (1 - alpha) * ce / (int((labels >= 0).sum()) if counts is None else counts[1])
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(fused, ref, rtol=1e-5)
    assert torch.allclose(g_fused, g_ref, atol=1e-7)
