"""Classifiers trained from compact caches of classified samples (``--storage topk:K`` and
``sample:N``): both loaders serve the stored arrays as a ``TopK``, row for row and view for view;
the stacked students' closed-form loss is each student's own; students learn about as well as
from full storage, from Python and from the CLI; and the refusals (another temperature, ids
outside the classes, values that are not finite) come before any step, in one line."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from batchkit import main
from torch import nn

from softcache.cache import layout
from softcache.cache.store import Cache, open_cache
from softcache.config import StudentConfig, TrainConfig
from softcache.demo import DATA_SPEC, EVAL_SPEC
from softcache.digits import LabelledTensors, load
from softcache.errors import CacheError, UsageError
from softcache.student._batch import TopK
from softcache.student._choice import STACKED, PathChooser
from softcache.student.loaders import MemoryLoader, SoftLabelDataset, memory_bytes, open_loader
from softcache.student.loss import LossSettings, distillation_loss
from softcache.student.run import cached_soft, fit, make_run
from softcache.student._stacked_compact import CompactSettings, compact_stacked_loss
from softcache.student.stacked import StudentGroup
from softcache.student.stream import StreamLoader
from softcache.student.train import train
from softcache.teacher.build import build
from softcache.views import cache_replay

T = 4.0  # the temperature of conftest's digits cache, which is the full-storage reference here
COMPACT = ("topk:5", "sample:12")
DRAWS = 12
MLP = "softcache.models:mlp,hidden=32"
VIEWS = 3


@pytest.fixture(scope="module")
def digits(cache: Cache, teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cache]:
    """The digits with the same teacher, split and temperature in each storage."""
    root = tmp_path_factory.mktemp("compact")
    built = {storage: build(str(teacher_path), DATA_SPEC, str(root / f"{storage.replace(':', '-')}.zarr"),
                            eval_data=EVAL_SPEC, temperature=T, storage=storage, chunk_rows=256, progress=False)
             for storage in COMPACT}
    return {"full": cache, **built}


def _views_data() -> LabelledTensors:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(200, 1, 8, 8, generator=gen)
    return LabelledTensors(x, torch.randint(0, 10, (200,), generator=gen), None, {"rows": 200, "seed": 1})


@pytest.fixture(scope="module")
def augmented(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Cache, LabelledTensors]]:
    """Compact caches of three augmented views per row, 7 chunks (the last one short)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    data, root = _views_data(), tmp_path_factory.mktemp("views")
    return {storage: (build(teacher, data, str(root / f"{storage.replace(':', '-')}.zarr"), views=VIEWS,
                            augment="softcache.augment:shift", view_seed=2, chunk_rows=32, temperature=T,
                            storage=storage, progress=False), data)
            for storage in COMPACT}


def _by_row(batches: list) -> dict[int, tuple[torch.Tensor, ...]]:
    served = {}
    for b in batches:
        for i, row in enumerate(b.rows.tolist()):
            served[row] = (b.inputs[i], b.labels[i], b.soft.ids[i], b.soft.logp[i], b.soft.rest[i])
    return served


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- what the loaders serve -------------------------------------------------------------------


@pytest.mark.parametrize("storage", COMPACT)
def test_memory_mode_holds_the_compact_arrays_as_stored(digits: dict[str, Cache], storage: str) -> None:
    cache = digits[storage]
    loader = open_loader(cache, inputs=load("train").inputs, batch_size=64, mode="memory")
    assert isinstance(loader, MemoryLoader)
    topk = storage.startswith("topk")
    assert loader.soft.dtype == (torch.float16 if topk else torch.uint8) and loader.ids.dtype == torch.uint16
    assert (loader.rest is not None) == topk and loader.soft.shape == (1200, 1, 5 if topk else 10)
    stored = sum(zarr.open_group(cache.url, mode="r")[name].nbytes for name in layout.soft_arrays(cache.manifest))
    assert memory_bytes(cache.train) == stored == 1200 * (5 * (2 + 2) + 4 if topk else 10 * (1 + 2))


def test_the_dataset_of_full_soft_labels_refuses_compact_storage(digits: dict[str, Cache]) -> None:
    with pytest.raises(UsageError, match="serves full soft labels, not this cache's topk storage") as info:
        SoftLabelDataset(digits["topk:5"].train, load("train"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("storage", COMPACT)
def test_memory_and_stream_loaders_serve_the_same_batches(digits: dict[str, Cache], storage: str) -> None:
    """In storage order batch for batch; shuffled, every row the same in both."""
    cache, inputs = digits[storage], load("train").inputs
    held = open_loader(cache, inputs=inputs, batch_size=100, mode="memory")
    in_order = MemoryLoader(held.inputs, held.soft, held.labels, ids=held.ids, rest=held.rest, batch_size=100,
                            shuffle=False)
    streamed = open_loader(cache, inputs=inputs, batch_size=100, mode="stream", shuffle=False, buffer_chunks=2)
    assert isinstance(streamed, StreamLoader)
    a, b = list(in_order.epoch(0)), list(streamed.epoch(0))
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
        assert isinstance(x.soft, TopK) and isinstance(y.soft, TopK)
        assert all(torch.equal(p, q) for p, q in zip((x.soft.ids, x.soft.logp, x.soft.rest),
                                                     (y.soft.ids, y.soft.logp, y.soft.rest)))
    shuffled = open_loader(cache, inputs=inputs, batch_size=64, mode="stream", buffer_chunks=2)
    for epoch in range(2):
        mine, theirs = _by_row(list(held.epoch(epoch))), _by_row(list(shuffled.epoch(epoch)))
        assert sorted(mine) == sorted(theirs) == list(range(1200))
        assert all(_equal(mine[r], theirs[r]) for r in mine)


@pytest.mark.parametrize("storage", COMPACT)
def test_every_view_of_ids_values_and_leftover_is_served_in_turn(augmented, storage: str) -> None:
    """The TopK of each row is the stored view ``(row + epoch) % V`` of every array, read here with
    plain zarr: ids widened, top-k log-probabilities widened, sampled counts as ``log(count / N)``."""
    cache, data = augmented[storage]
    raw = zarr.open_group(cache.url, mode="r")
    ids, values = np.asarray(raw[layout.SOFT_IDS][...]), np.asarray(raw[layout.SOFT][...])
    rest = np.asarray(raw[layout.SOFT_REST][...]) if layout.SOFT_REST in raw else None
    replay = cache_replay(cache, data.inputs)
    memory = open_loader(cache, inputs=data.inputs, batch_size=24, mode="memory", replay=replay)
    stream = open_loader(cache, inputs=data.inputs, batch_size=24, mode="stream", buffer_chunks=3, replay=replay)
    views_seen = set()
    for epoch in range(VIEWS):
        served = {}
        for name, loader in (("memory", memory), ("stream", stream)):
            served[name] = batches = _by_row(list(loader.epoch(epoch)))
            rows = np.array(sorted(batches))
            view = (rows + epoch) % VIEWS
            views_seen |= set(view.tolist())
            got_ids = torch.stack([batches[r][2] for r in rows]).numpy()
            got_logp = torch.stack([batches[r][3] for r in rows]).numpy()
            got_rest = torch.stack([batches[r][4] for r in rows]).numpy()
            assert got_ids.dtype == np.int64 and np.array_equal(got_ids, ids[rows, view].astype(np.int64))
            if rest is not None:
                assert np.array_equal(got_logp, values[rows, view].astype(np.float32))
                assert np.array_equal(got_rest, rest[rows, view])
            else:
                counts = values[rows, view].astype(np.float64)
                with np.errstate(divide="ignore"):
                    want = np.log(counts / DRAWS)
                assert np.array_equal(np.isinf(got_logp), counts == 0) and (counts.sum(-1) == DRAWS).all()
                np.testing.assert_allclose(got_logp[counts > 0], want[counts > 0], rtol=1e-6)
                assert (got_rest == 0).all()
        assert all(_equal(served["memory"][r], served["stream"][r]) for r in range(200))
    assert views_seen == set(range(VIEWS))


# -- the loss of stacked students -------------------------------------------------------------


def _teachers() -> dict[str, TopK]:
    """A top-k teacher (float16-rounded log-probabilities, so kept + leftover mass is not exactly
    1) and sampled counts (unused slots id 0 count 0) for 16 rows of 10 classes."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(16, 10, generator=gen) * 2).log_softmax(-1)
    kept, ids = logp.topk(4, -1)
    topk = TopK(ids, kept.half().float(), (1 - kept.exp().sum(-1)).clamp(min=0))
    picks = torch.multinomial(logp.exp(), DRAWS, replacement=True, generator=gen)
    counts = torch.zeros(16, 10).scatter_add_(-1, picks, torch.ones(16, DRAWS))
    order = counts.sort(-1, descending=True)
    slots = order.values[:, :6]
    return {"topk": topk, "sample": TopK.sampled(torch.where(slots > 0, order.indices[:, :6], 0), slots)}


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_the_stacked_compact_loss_and_gradient_are_each_students_own(kind: str) -> None:
    """Every combination of T (1 takes the closed-form single-student path, 3 autograd), alpha,
    label smoothing and leftover against ``distillation_loss`` differentiated by autograd."""
    teacher = _teachers()[kind]
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (16,), generator=gen)
    labels[:4] = -1
    configs = [StudentConfig(spec=MLP, temperature=t, alpha=a, label_smoothing=ls, leftover=lo)
               for t, a, ls, lo in itertools.product((1.0, 3.0), (0.0, 0.6, 1.0), (0.0, 0.1),
                                                     ("bucket", "label", "renormalize"))]
    logits = torch.randn(len(configs), 16, 10, generator=gen) * 3
    settings = LossSettings.make([c.temperature for c in configs], [c.alpha for c in configs],
                                 [c.label_smoothing for c in configs], T, logits)
    loss, grad = compact_stacked_loss(logits, teacher, labels, settings, CompactSettings.make(configs, logits))
    for k, c in enumerate(configs):
        z = logits[k].clone().requires_grad_(True)
        ref = distillation_loss(z, teacher, labels, temperature=c.temperature, alpha=c.alpha,
                                label_smoothing=c.label_smoothing, leftover=c.leftover)
        ref.backward()
        assert float(loss[k]) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6), c
        assert torch.allclose(grad[k], z.grad, atol=1e-6), c


def test_a_nan_in_one_student_stays_in_that_student() -> None:
    teacher = _teachers()["topk"]
    configs = [StudentConfig(spec=MLP, temperature=T, alpha=0.9), StudentConfig(spec=MLP, temperature=T, alpha=0.5)]
    logits = torch.randn(2, 16, 10)
    logits[0, 3, 2] = math.nan
    settings = LossSettings.make([T, T], [0.9, 0.5], [0.0, 0.0], T, logits)
    loss, grad = compact_stacked_loss(logits, teacher, torch.arange(16) % 10, settings,
                                      CompactSettings.make(configs, logits))
    assert loss[0].isnan() and loss[1].isfinite() and grad[1].isfinite().all()


STACKED_ALWAYS = PathChooser(lambda path, step: (step(), 1.0 if path == STACKED else 2.0)[1])


def _max_gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("storage", COMPACT)
def test_students_stacked_end_with_the_weights_they_reach_alone(digits: dict[str, Cache], storage: str) -> None:
    cache = digits[storage]
    loader = open_loader(cache, inputs=load("train").inputs, batch_size=128, mode="memory")
    rows = [(0.9, "bucket", 0.01, 0.0, 0), (0.5, "label", 0.003, 0.1, 1), (1.0, "renormalize", 0.01, 0.0, 2),
            (0.0, "bucket", 0.02, 0.0, 3)]
    configs = [StudentConfig(spec="softcache.models:mlp,hidden=16", temperature=T if a > 0 else 2.0, alpha=a,
                             leftover=lo, lr=lr, label_smoothing=ls, seed=s) for a, lo, lr, ls, s in rows]

    def runs() -> list:
        return [make_run(c, 10, loader.inputs[:2], torch.device("cpu")) for c in configs]

    grouped, alone, initial = runs(), runs(), runs()
    group = StudentGroup(grouped, STACKED_ALWAYS)
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            group.step(batch, batch.soft, T)
    group.export_state()
    assert group.mode == "sequential-layers"  # stacked, not one by one
    for run in alone:
        fit([run], loader, 2, cached_soft, T, group=False)
    for g, a, i in zip(grouped, alone, initial):
        assert _max_gap(g.model, a.model) < 1e-4
        assert _max_gap(g.model, i.model) > 1e-2  # it did train
        assert g.loss_history() == pytest.approx(a.loss_history(), rel=1e-4, abs=1e-5)


# -- students trained from compact caches -----------------------------------------------------


def test_students_from_compact_caches_learn_about_as_well_as_from_full(digits: dict[str, Cache]) -> None:
    students = [StudentConfig(spec=MLP, lr=3e-3, seed=s) for s in (0, 1)]
    accuracy = {}
    for storage, loader in (("full", "memory"), ("topk:5", "memory"), ("sample:12", "stream")):
        board = train(digits[storage], students, config=TrainConfig(epochs=15, batch_size=64, loader=loader),
                      progress=False).leaderboard
        assert board["final_loss"].is_finite().all()
        accuracy[storage] = min(board["test_accuracy"].to_list())
    assert all(a > 0.8 for a in accuracy.values()), accuracy  # measured: 0.94 full, 0.94 topk, 0.88 sample
    assert all(accuracy[s] > accuracy["full"] - 0.12 for s in COMPACT), accuracy


def test_the_leftover_treatments_train_different_students(digits: dict[str, Cache]) -> None:
    """Top-k keeps a leftover mass, which each treatment uses differently; sampled counts leave
    nothing over, so bucket and label are the same student there (renormalize to float round-off)."""
    students = [StudentConfig(spec="softcache.models:mlp,hidden=16", leftover=lo, name=lo)
                for lo in ("bucket", "label", "renormalize")]
    for storage in COMPACT:
        result = train(digits[storage], students, config=TrainConfig(epochs=2, batch_size=64), progress=False)
        board = result.leaderboard
        loss = dict(zip(board["student"].to_list(), board["final_loss"].to_list()))
        weights = result.models
        if storage.startswith("topk"):
            assert len({round(v, 4) for v in loss.values()}) == 3, loss
            assert all(_max_gap(weights[a], weights[b]) > 1e-3 for a, b in itertools.combinations(weights, 2))
        else:
            assert loss["bucket"] == loss["label"] and loss["renormalize"] == pytest.approx(loss["bucket"], rel=1e-4)
            assert _max_gap(weights["bucket"], weights["label"]) == 0


def test_an_augmented_compact_cache_trains_with_either_loader(augmented) -> None:
    for storage in COMPACT:
        cache, data = augmented[storage]
        for loader in ("memory", "stream"):
            board = train(cache, StudentConfig(spec="softcache.models:mlp,hidden=8"), data=data,
                          config=TrainConfig(epochs=2, batch_size=32, loader=loader), progress=False).leaderboard
            assert len(board) == 1 and math.isfinite(board["final_loss"][0])


def test_the_cli_trains_from_a_compact_cache(digits: dict[str, Cache], tmp_path: Path) -> None:
    result = main("train", "--cache", digits["sample:12"].url, "--student", MLP, "--lr", "0.003", "--epochs", "15",
                  "--batch-size", "64", "--leftover", "bucket", "label", "--out", str(tmp_path / "out"), "--json",
                  "--quiet")
    assert result.returncode == 0, result.stderr
    board = json.loads(result.stdout)["leaderboard"]
    assert len(board) == 2 and all(row["test_accuracy"] > 0.8 for row in board)
    assert (tmp_path / "out" / "leaderboard.parquet").exists()


def test_uint8_topk_values_build_and_train_from_the_cli(teacher_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.zarr"
    built = main("build", "--teacher", str(teacher_path), "--data", DATA_SPEC, "--eval-data", EVAL_SPEC, "--out",
                 str(out), "--storage", "topk:5", "--dtype", "uint8", "--temperature", "4", "--json", "--quiet")
    assert built.returncode == 0, built.stderr
    cache = open_cache(str(out))
    assert cache.train.read(layout.SOFT).dtype == np.uint8 and cache.manifest.storage.scale == 1 / 16
    result = main("train", "--cache", str(out), "--student", MLP, "--lr", "0.003", "--epochs", "15",
                  "--batch-size", "64", "--loader", "stream", "--out", str(tmp_path / "out"), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["leaderboard"]
    assert row["test_accuracy"] > 0.8
    refused = _one_line_refusal("build", "--teacher", str(teacher_path), "--data", DATA_SPEC, "--out",
                                str(tmp_path / "full.zarr"), "--dtype", "uint8")
    assert "uint8 quantises top-k" in refused and not (tmp_path / "full.zarr").exists()


@pytest.mark.parametrize("storage, bytes_per_label, warns", [
    ("full", 20, False), ("topk:3", 16, False), ("topk:5", 24, True), ("sample:6", 18, False), ("sample:12", 30, True)])
def test_a_compact_mode_no_smaller_than_full_storage_builds_with_a_warning(storage: str, bytes_per_label: int,
                                                                           warns: bool, tmp_path: Path) -> None:
    """Over 10 classes full float16 storage takes 20 bytes a sample; a compact mode that takes as
    many or more saves nothing and loses exactness, which the build says (and the CLI in one line)."""
    data = LabelledTensors(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                           torch.arange(64) % 10, None, {"rows": 64})
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = build(teacher, data, str(tmp_path / "c.zarr"), temperature=T, storage=storage, progress=False)
    said = [str(w.message) for w in caught if "no fewer than full float16 storage" in str(w.message)]
    assert len(said) == int(warns)
    if warns:
        assert said[0].startswith(f"storage {storage} keeps {bytes_per_label} bytes per soft label") and "20 for 10" in said[0]
    arrays = [cache.train.array(name) for name in layout.soft_arrays(cache.manifest)]
    stored = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in arrays)  # one view: per sample
    assert layout.label_bytes(cache.manifest.storage, 10) == stored == bytes_per_label


def test_the_cli_prints_the_storage_warning_in_one_line(teacher_path: Path, tmp_path: Path) -> None:
    result = main("build", "--teacher", str(teacher_path), "--data", DATA_SPEC, "--out", str(tmp_path / "s.zarr"),
                  "--storage", "sample:12", "--temperature", "4", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines == ["softcache: warning: storage sample:12 keeps 30 bytes per soft label, no fewer than full float16 "
                     "storage's 20 for 10 classes, which is exact and trains at any temperature: --storage full is "
                     "the smaller choice here"], result.stderr
    assert json.loads(result.stdout)["rows"] > 0


# -- refusals ---------------------------------------------------------------------------------


def _one_line_refusal(*args: str) -> str:
    result = main(*args, "--quiet")
    assert result.returncode != 0
    assert result.stderr.startswith("softcache: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("storage, holds", [("topk:5", "the teacher's probabilities"),
                                            ("sample:12", "draws from the teacher's distribution")])
def test_another_temperature_is_refused_in_one_line(digits: dict[str, Cache], storage: str, holds: str,
                                                    tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"holds {holds} at T=4; .* asks for T=2") as info:
        train(digits[storage], StudentConfig(spec=MLP, temperature=2.0), progress=False)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    stderr = _one_line_refusal("train", "--cache", digits[storage].url, "--student", MLP, "--temperature", "2",
                               "--out", str(out))
    assert "train at --temperature 4" in stderr and not out.exists()
    # a student without a soft term reads no soft labels, at any temperature
    board = train(digits[storage], StudentConfig(spec=MLP, temperature=2.0, alpha=0.0),
                  config=TrainConfig(epochs=1), progress=False).leaderboard
    assert len(board) == 1


# -- another temperature by a named approximation ---------------------------------------------


def test_uniform_tail_is_exact_when_the_tail_is_uniform() -> None:
    """Teacher logits whose classes outside the top 4 are all equal: powering the kept
    probabilities and a uniform tail is then the distribution at the new temperature exactly."""
    from softcache.student.loss import retemper

    gen = torch.Generator().manual_seed(0)
    z = torch.full((6, 10), -1.0)
    z[:, :4] = torch.randn(6, 4, generator=gen).abs() * 3  # all above the tail: the top 4 are these
    t_cache, t = 2.0, 5.0
    logp = torch.log_softmax(z / t_cache, -1)
    kept, ids = logp.topk(4, -1)
    teacher = TopK(ids, kept, 1 - kept.exp().sum(-1))
    moved = retemper(teacher, 10, t_cache, t)
    want = torch.log_softmax(z / t, -1)
    torch.testing.assert_close(moved.logp, want.gather(-1, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.rest, 1 - want.gather(-1, ids).exp().sum(-1), atol=1e-5, rtol=1e-5)
    assert retemper(teacher, 10, t_cache, t_cache) is teacher


def test_uniform_tail_powers_sampled_counts_and_keeps_unused_slots_empty() -> None:
    from softcache.student.loss import retemper

    counts = torch.tensor([[6.0, 3.0, 3.0, 0.0]])
    teacher = TopK.sampled(torch.tensor([[7, 2, 5, 0]]), counts)
    moved = retemper(teacher, 10, 1.0, 2.0)
    weights = torch.tensor([6.0, 3.0, 3.0]).sqrt()
    torch.testing.assert_close(moved.logp[0, :3].exp(), weights / weights.sum())
    assert moved.logp[0, 3] == -math.inf and moved.rest[0] == 0


def test_a_named_approximation_trains_at_another_temperature(digits: dict[str, Cache], tmp_path: Path) -> None:
    result = main("train", "--cache", digits["topk:5"].url, "--student", MLP, "--temperature", "2", "--lr", "0.003",
                  "--epochs", "10", "--batch-size", "64", "--retemper", "uniform-tail", "--out", str(tmp_path / "out"),
                  "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["leaderboard"]
    assert "T=2" in row["student"] and "uniform-tail" in row["student"] and row["test_accuracy"] > 0.8
    # its targets are its own: it steps alone, never stacked with students of the cache's targets
    from softcache.student.stacked import stackable

    cfg = StudentConfig(spec=MLP, temperature=2.0, retemper="uniform-tail")
    run = make_run(cfg, 10, torch.zeros(2, 1, 8, 8), torch.device("cpu"))
    assert not stackable(run) and stackable(make_run(StudentConfig(spec=MLP), 10, torch.zeros(2, 1, 8, 8),
                                                      torch.device("cpu")))


def _tampered(cache: Cache, tmp_path: Path, name: str, row: int, value: float) -> str:
    copy = tmp_path / "tampered.zarr"
    shutil.copytree(cache.url, copy)
    array = zarr.open_group(str(copy), mode="r+")[name]
    index = (row, 0, 2)[: array.ndim]
    array[index] = value
    return str(copy)


@pytest.mark.parametrize("storage", COMPACT)
def test_ids_outside_the_classes_are_refused_before_training(digits: dict[str, Cache], storage: str,
                                                             tmp_path: Path) -> None:
    url = _tampered(digits[storage], tmp_path, layout.SOFT_IDS, 700, 60000)
    for loader in ("memory", "stream"):
        with pytest.raises(CacheError, match=r"soft label ids fall outside the vocabulary \[0, 10\)") as info:
            train(url, MLP, config=TrainConfig(epochs=1, loader=loader), progress=False)
        assert "\n" not in str(info.value)
    out = tmp_path / "out"
    stderr = _one_line_refusal("train", "--cache", url, "--student", MLP, "--out", str(out))
    assert "soft label ids fall outside" in stderr and not out.exists()


@pytest.mark.parametrize("name", [layout.SOFT, layout.SOFT_REST])
def test_values_that_are_not_finite_are_refused_before_training(digits: dict[str, Cache], name: str,
                                                                tmp_path: Path) -> None:
    url = _tampered(digits["topk:5"], tmp_path, name, 700, math.nan)
    assert open_cache(url).manifest.storage.mode == "topk"
    for loader in ("memory", "stream"):
        with pytest.raises(CacheError, match=r"soft labels of 1 of 1200 training rows are NaN or infinite "
                                             r"\(first rows \[700\]\)") as info:
            train(url, MLP, config=TrainConfig(epochs=1, loader=loader), progress=False)
        assert "\n" not in str(info.value)
