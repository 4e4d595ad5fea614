"""Bad input for language-model caches, through the command line: each mistake is one line on
stderr (``softcache: error: ...``) with the exit code that says whose it is (1: the data or the
cache, 2: the command), and a cache already at the target, complete or part-built, is left byte
for byte as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from batchkit import main

from softcache.cache import store
from softcache.errors import CacheError
from softcache.sequences import TokenRows, as_token_rows

GOOD = {"--teacher": "lmkit:teacher", "--data": "lmkit:rows,n=8", "--eval-data": "lmkit:rows,split=eval,n=4",
        "--storage": "topk:8", "--chunk-rows": "4", "--shard-chunks": "1"}
"""A tiny top-k build: 8 training rows of 16 tokens (2 shards), 4 held-out rows (1 shard)."""


@dataclass(frozen=True)
class Bad:
    """One mistake: the flags that make it, the exit code and the words of its one line."""

    name: str
    flags: dict[str, str]
    code: int
    message: str
    writes: bool = False
    """The mistake shows only once the teacher runs, so a new target is left part-built."""
    overwrite: bool = True
    """An ``--overwrite`` build leaves an old cache alone: the mistake is found before the target is touched."""


BAD = [
    Bad("ids-outside-the-vocabulary", {"--data": "lmkit:rows,n=8,vocab=80,tokenizer_vocab=64"}, 1,
        "training token ids: row 0 holds id 79, outside the vocabulary [0, 64)"),
    Bad("held-out-ids-outside-the-vocabulary", {"--eval-data": "lmkit:rows,split=eval,n=4,vocab=70,tokenizer_vocab=64"},
        1, "held-out token ids: row 1 holds id 67, outside the vocabulary [0, 64) (3 rows in all)"),
    Bad("held-out-rows-longer-than-the-declared-length", {"--eval-data": "lmkit:rows,split=eval,n=4,length=20"}, 1,
        "held-out sequence rows have 20 tokens, longer than the declared length 16"),
    Bad("teacher-vocabulary-disagrees-with-the-tokenizer", {"--data": "lmkit:rows,n=8,tokenizer_vocab=80"}, 2,
        "the teacher's vocabulary has 64 entries but the tokenizer 'lmkit' has 80"),
    Bad("empty-corpus", {"--data": "lmkit:rows,n=0"}, 1, "dataset is empty"),
    Bad("empty-held-out-corpus", {"--eval-data": "lmkit:rows,split=eval,n=0"}, 1, "held-out corpus is empty"),
    Bad("nan-logits", {"--teacher": "lmkit:nan_teacher"}, 1, "teacher produced NaN/Inf logits for rows [0]",
        writes=True, overwrite=False),
    Bad("topk-k-equal-to-the-vocabulary", {"--storage": "topk:64"}, 2, "K=64 keeps all 64 of the teacher's classes"),
    Bad("topk-k-above-the-vocabulary", {"--storage": "topk:100"}, 2, "K=100 keeps all 64 of the teacher's classes"),
]


def build_args(out: Path, flags: dict[str, str] | None = None, *extra: str) -> list[str]:
    return ["build", *[x for pair in {**GOOD, **(flags or {})}.items() for x in pair], "--out", str(out), "--quiet",
            *extra]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line(result, code: int, message: str = "") -> None:  # noqa: ANN001 - batchkit.Result
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("softcache: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The good build, complete, and the same build with one of its two training shards done."""
    root = tmp_path_factory.mktemp("good")
    made = {"complete": root / "complete.zarr", "partial": root / "partial.zarr"}
    assert main(*build_args(made["complete"])).returncode == 0
    assert main(*build_args(made["partial"], None, "--shard", "0/2")).returncode == 0
    assert store.peek_manifest(str(made["partial"])).status.state == "building"
    return made


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_bad_input_is_one_line_and_an_existing_cache_is_left_as_it_was(
        bad: Bad, caches: dict[str, Path], tmp_path: Path) -> None:
    fresh = tmp_path / "new.zarr"
    assert_one_line(main(*build_args(fresh, bad.flags)), bad.code, bad.message)
    if bad.writes:  # rows were labelled before the mistake showed: the part-built cache never claims to be done
        assert store.peek_manifest(str(fresh)).status.state == "building"
    else:
        assert not fresh.exists()

    attempts = [("complete", ()), ("complete", ("--resume",)), ("partial", ("--resume",)), ("partial", ())]
    attempts += [("complete", ("--overwrite",)), ("partial", ("--overwrite",))] if bad.overwrite else []
    for state, extra in attempts:
        target = tmp_path / f"{state}{''.join(extra)}.zarr"
        shutil.copytree(caches[state], target)
        before = snapshot(target)
        result = main(*build_args(target, bad.flags, *extra))
        # the same mistake, or (found only when the teacher runs) the refusal to mix two builds in one target
        assert_one_line(result, bad.code if bad.overwrite else 2, bad.message if bad.overwrite else "")
        assert snapshot(target) == before, f"{state} cache changed by a failed build with {extra or 'no flag'}"


def test_a_student_of_another_vocabulary_is_one_line_and_earlier_results_stay(
        caches: dict[str, Path], tmp_path: Path) -> None:
    out, cache = tmp_path / "students", caches["complete"]
    train = ["train", "--cache", str(cache), "--epochs", "1", "--alpha", "0.8", "--temperature", "4", "--out", str(out)]
    assert main(*train, "--student", "lmkit:student").returncode == 0
    results, cached = snapshot(out), snapshot(cache)
    refused = main(*train, "--student", "lmkit:student,vocab=80", "--overwrite")
    assert_one_line(refused, 1, "student lmkit:student,vocab=80 outputs shape (16, 80) per token row but the "
                    "cache's vocabulary has 64 tokens")
    assert snapshot(out) == results and snapshot(cache) == cached


def test_rows_longer_than_the_declared_length_are_bad_data_and_shorter_ones_are_padded() -> None:
    items = [torch.arange(5), torch.arange(9), torch.arange(3)]
    with pytest.raises(CacheError, match=r"^held-out sequence item 1 has 9 tokens, longer than the declared length 8$"):
        as_token_rows(items, 8, "held-out sequence")  # type: ignore[arg-type]
    rows = as_token_rows(items)  # no declared length: the longest item's, the others padded with mask 0
    assert rows.tokens.shape == (3, 9) and rows.loss_mask.sum(1).tolist() == [5, 9, 3]
    with pytest.raises(CacheError, match="sequence item 0 is a Tensor, not a 1-D integer tensor"):
        as_token_rows([torch.zeros(4)])  # type: ignore[arg-type]
    short = as_token_rows(TokenRows(torch.full((2, 5), 7)), 8)  # shorter rows are padded, not refused
    assert short.tokens[:, 5:].eq(0).all() and short.loss_mask.sum(1).tolist() == [5, 5] and short.length == 8
    with pytest.raises(CacheError, match=r"^held-out sequence rows have 9 tokens, longer than the declared length 8$"):
        as_token_rows(TokenRows(torch.ones(2, 9, dtype=torch.int64)), 8, "held-out sequence")
