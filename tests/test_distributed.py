"""Data-parallel training under torchrun: 2 ranks take the steps of 1 process.

Each rank reads its slice of every global batch, divides its loss sums by the global batch's
counts and sums gradients across ranks (``softcache.student._distributed``), so 2 gloo ranks on
the CPU follow the loss curve of 1 process with the same batch size, step by step, to float
round-off, on a causal-LM (top-k) cache with uneven loss masks and on a digits cache.

This file is also the worker that torchrun launches, once for all the tests here
(:func:`worker`): each rank trains the tests' plans, and the CLI once, and saves what it saw into
``RESULTS/rank<R>.pt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lmkit
import softcache
import softcache.student.train as train_module
from softcache._cli.main import main as cli_main
from softcache.cache.store import Cache
from softcache.config import StudentConfig, TrainConfig
from softcache.sequences import TokenRows
from softcache.student._batch import Batch, TopK
from softcache.student._distributed import batch_counts
from softcache.student.loaders import MemoryLoader
from softcache.student.loss import distillation_loss

TESTS = Path(__file__).resolve().parent
T = 2.0

# the batch sizes leave a short last batch: 29 token rows in batches of 7 end with a batch of 1
# (rank 1's slice of it is empty), 1200 digits in batches of 61 with one of 41 (split 21 + 20)
DIGIT_STUDENTS = [StudentConfig(spec="softcache.models:mlp,hidden=16", alpha=0.7, temperature=3.0, lr=0.01, seed=s,
                                label_smoothing=0.1) for s in (0, 1)]
PLANS: dict[str, tuple[list[StudentConfig], TrainConfig]] = {
    "sequence": ([StudentConfig(spec="lmkit:student", alpha=a, temperature=T, lr=0.03, seed=s)
                  for a, s in ((0.8, 0), (0.3, 1))],
                 TrainConfig(epochs=2, batch_size=7, device="cpu")),
    "digits": (DIGIT_STUDENTS, TrainConfig(epochs=2, batch_size=61, device="cpu", loader="memory")),
    "stream": (DIGIT_STUDENTS, TrainConfig(epochs=1, batch_size=128, device="cpu", loader="stream")),
}
CLI_TRAIN = ["train", "--student", "lmkit:student", "--temperature", str(T), "--epochs", "1", "--batch-size", "7",
             "--device", "cpu", "--quiet", "--json"]


def train_recording(kind: str, cache: str, out: str | None = None) -> dict[str, Any]:
    """Train ``kind``'s plan; return each student's per-step loss history, final weights and the
    leaderboard (the pass's runs are caught on their way into ``fit``)."""
    students, config = PLANS[kind]
    caught: list[Any] = []
    real_fit = train_module.fit

    def recording_fit(runs: Any, *args: Any, **kwargs: Any) -> None:
        caught.extend(runs)
        real_fit(runs, *args, **kwargs)

    train_module.fit = recording_fit
    try:
        result = softcache.train(cache, students, config=config, out_dir=out, progress=False)
    finally:
        train_module.fit = real_fit
    return {"losses": [run.loss_history() for run in caught],
            "weights": [{k: v.detach().clone() for k, v in run.model.state_dict().items()} for run in caught],
            "board": result.leaderboard.to_dicts()}


def worker(sequence: str, digits: str, results: Path) -> None:
    """What each rank runs (several training calls in one launch, as a script may make)."""
    seen = {"sequence": train_recording("sequence", sequence),
            "digits": train_recording("digits", digits, str(results / "out")),
            "stream": train_recording("stream", digits)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main([*CLI_TRAIN, "--cache", sequence, "--out", str(results / "cli")])
    torch.save({**seen, "cli": (code, printed.getvalue())}, results / f"rank{os.environ['RANK']}.pt")


def _masked_rows() -> TokenRows:
    """Token rows whose loss masks count 6 to 16 positions, so ranks hold different counts."""
    rows = lmkit.rows(n=29)
    counted = 6 + (torch.arange(29) * 7) % 11
    mask = (torch.arange(rows.length)[None, :] < counted[:, None]).to(torch.uint8)
    return TokenRows(rows.tokens, mask, info=rows.info, tokenizer=rows.tokenizer, packing=rows.packing)


@pytest.fixture(scope="module")
def sequence_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return softcache.build(lmkit.teacher(steps=20), _masked_rows(), str(tmp_path_factory.mktemp("ddp") / "seq.zarr"),
                           eval_data=lmkit.rows(n=8, split="eval"), storage="topk:8", temperature=T,
                           chunk_rows=8, progress=False)


@pytest.fixture(scope="module")
def two_ranks(sequence_cache: Cache, cache: Cache, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One torchrun launch of 2 gloo ranks running :func:`worker`; what each rank saved."""
    results = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           __file__, str(sequence_cache.url), str(cache.url), str(results)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [{**torch.load(results / f"rank{r}.pt"), "out": results / "out"} for r in (0, 1)]


def _assert_same_weights(ranks: list[dict[str, Any]], kind: str) -> None:
    first, second = (rank[kind] for rank in ranks)
    assert first["board"] == second["board"]
    assert first["losses"] == second["losses"]
    for a, b in zip(first["weights"], second["weights"]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _assert_follows(got: dict[str, Any], alone: dict[str, Any]) -> None:
    """Per-step losses and final weights of the ranks are the lone process's, to round-off."""
    assert len(got["losses"]) == len(alone["losses"]) == 2
    for mine, want in zip(got["losses"], alone["losses"]):
        assert len(mine) == len(want) > 0
        assert torch.allclose(torch.tensor(mine), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for mine, want in zip(got["weights"], alone["weights"]):
        for name in want:
            assert torch.allclose(mine[name], want[name], rtol=1e-4, atol=1e-5), name
    assert [row["student"] for row in got["board"]] == [row["student"] for row in alone["board"]]
    for mine, want in zip(got["board"], alone["board"]):
        assert mine["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)


def test_two_ranks_follow_one_process_on_a_sequence_cache(sequence_cache: Cache,
                                                         two_ranks: list[dict[str, Any]]) -> None:
    alone = train_recording("sequence", str(sequence_cache.url))
    assert len(alone["losses"][0]) == 2 * 5  # 2 epochs of 29 rows in global batches of 7
    _assert_same_weights(two_ranks, "sequence")
    _assert_follows(two_ranks[0]["sequence"], alone)


def test_two_ranks_follow_one_process_on_a_digits_cache(cache: Cache, two_ranks: list[dict[str, Any]]) -> None:
    alone = train_recording("digits", str(cache.url))
    assert len(alone["losses"][0]) == 2 * 20  # 2 epochs of 1200 rows in global batches of 61
    _assert_same_weights(two_ranks, "digits")
    _assert_follows(two_ranks[0]["digits"], alone)


def test_only_rank_zero_writes_and_prints(two_ranks: list[dict[str, Any]]) -> None:
    out = two_ranks[0]["out"]
    written = sorted(p.name for p in (out / "students").iterdir())
    assert len(written) == 2 and (out / "leaderboard.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    for rank in two_ranks:  # every rank's leaderboard names the files rank 0 wrote
        assert sorted(Path(row["weights"]).name for row in rank["digits"]["board"]) == written
    (code0, printed0), (code1, printed1) = two_ranks[0]["cli"], two_ranks[1]["cli"]
    assert code0 == code1 == 0 and printed1 == ""
    assert json.loads(printed0)["leaderboard"][0]["spec"] == "lmkit:student"
    assert (out.parent / "cli" / "leaderboard.parquet").exists()


def test_streaming_ranks_step_in_lockstep_on_the_global_batch(two_ranks: list[dict[str, Any]]) -> None:
    """Chunks dealt to ranks: another batch order than one process, but the ranks agree (a rank
    stepping alone would wait for the other forever) and each step is a global batch of 2 x 64
    rows, as many as the rank dealt fewer rows has full batches of 64."""
    _assert_same_weights(two_ranks, "stream")
    steps = [len(losses) for losses in two_ranks[0]["stream"]["losses"]]
    assert steps[0] == steps[1] and 0 < steps[0] <= 1200 // 128


# -- the pieces, in one process ------------------------------------------------------------------


def _split_loss(logits: torch.Tensor, soft: torch.Tensor | TopK, labels: torch.Tensor, parts: list[torch.Tensor],
                **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and logit gradient of the whole batch as ranks holding ``parts`` compute them."""
    counts = (float(len(labels)), float((labels >= 0).sum()))
    total, grad = torch.zeros(()), torch.zeros_like(logits)
    for rows in parts:
        piece = logits[rows].detach().requires_grad_(True)
        share = soft.select(rows) if isinstance(soft, TopK) else soft[rows]
        loss = distillation_loss(piece, share, labels[rows], counts=counts, **kw)
        loss.backward()
        total, grad[rows] = total + loss.detach(), piece.grad
    return total, grad


@pytest.mark.parametrize("leftover", ["bucket", "label", "renormalize", None])
def test_count_normalised_loss_is_the_plain_mean_split_any_way(leftover: str | None) -> None:
    gen = torch.Generator().manual_seed(0)
    n, c, k = 13, 11, 4
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[[2, 5, 6]] = -1
    full = torch.randn(n, c, generator=gen, dtype=torch.float64)
    top = full.log_softmax(-1).topk(k)
    soft: torch.Tensor | TopK = full if leftover is None else \
        TopK(top.indices, top.values, 1 - top.values.exp().sum(-1))
    kw: dict[str, Any] = {"temperature": 1.0, "alpha": 0.6, "label_smoothing": 0.1,
                          "leftover": leftover or "bucket"}
    whole = logits.clone().requires_grad_(True)
    plain = distillation_loss(whole, soft, labels, **kw)
    plain.backward()
    for parts in ([torch.arange(n)], [torch.arange(n)[0::2], torch.arange(n)[1::2]],
                  [torch.arange(3), torch.arange(3, n), torch.arange(0)]):
        loss, grad = _split_loss(logits, soft, labels, parts, **kw)
        assert torch.allclose(loss, plain, rtol=1e-12) and torch.allclose(grad, whole.grad, rtol=1e-10, atol=1e-14)


def test_batch_counts_are_the_positions_that_count_and_their_known_labels() -> None:
    labels = torch.tensor([[3, 4, -1], [5, -1, -1]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    batch = Batch(rows=torch.arange(2), inputs=labels, soft=None, labels=labels, mask=mask)
    assert batch_counts(batch).tolist() == [4.0, 3.0]
    assert batch_counts(Batch(rows=torch.arange(2), inputs=labels, soft=None, labels=labels[:, 0])).tolist() == [2.0, 2.0]


def test_memory_loader_ranks_split_every_batch_of_one_process() -> None:
    inputs, labels = torch.randn(23, 3), torch.arange(23)
    alone = MemoryLoader(inputs, None, labels, batch_size=8, shuffle_seed=3)
    ranks = [MemoryLoader(inputs, None, labels, batch_size=8, shuffle_seed=3) for _ in range(3)]
    for r, loader in enumerate(ranks):
        loader.rank, loader.world_size = r, 3
    for epoch in (0, 1):
        batches = [list(loader.epoch(epoch)) for loader in ranks]
        for i, whole in enumerate(alone.epoch(epoch)):
            slices = [b[i].rows for b in batches]
            assert all(torch.equal(s, whole.rows[r::3]) for r, s in enumerate(slices))
            assert torch.equal(batches[1][i].inputs, inputs[whole.rows[1::3]])


@pytest.mark.parametrize("raw, expected", [("", 1800.0), ("  ", 1800.0), ("90", 90.0), ("2.5", 2.5)])
def test_the_collective_timeout_comes_from_one_variable(monkeypatch: pytest.MonkeyPatch, raw: str,
                                                        expected: float) -> None:
    from softcache.config import DIST_TIMEOUT_ENV, dist_timeout_s
    from softcache.teacher.workers import WorkerGroup
    from softcache.cache.shards import ShardSpec

    monkeypatch.setenv(DIST_TIMEOUT_ENV, raw)
    assert dist_timeout_s() == expected
    assert WorkerGroup(ShardSpec(0, 1, "single")).timeout_s == expected  # a build's ranks wait as long


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_collective_timeout_is_one_line(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from softcache.config import DIST_TIMEOUT_ENV, dist_timeout_s
    from softcache.errors import UsageError

    monkeypatch.setenv(DIST_TIMEOUT_ENV, raw)
    with pytest.raises(UsageError, match="SOFTCACHE_DIST_TIMEOUT") as info:
        dist_timeout_s()
    assert "\n" not in str(info.value)


def test_a_build_without_torchrun_never_reads_the_collective_timeout(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from softcache.config import DIST_TIMEOUT_ENV
    from softcache.models import mlp

    monkeypatch.setenv(DIST_TIMEOUT_ENV, "soon")  # wrong, but only torchrun ranks wait on each other
    cache = softcache.build(mlp(hidden=8), "softcache.digits:load,split=train", str(tmp_path / "c.zarr"),
                            progress=False)
    assert cache.complete


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
