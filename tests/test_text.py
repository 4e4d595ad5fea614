"""The language-model corpus (the stdlib's own source), its tokenizer, the GPT model and the LM teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from softcache import text
from softcache.errors import UsageError
from softcache.models import gpt
from softcache.sequences import TokenRows
from softcache.teacher.fit import lm_bits_per_token, train_lm_teacher


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token BPE trained on a handful of stdlib files: seconds, not the full corpus."""
    files = text.stdlib_files("train")[:8]
    return text.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400, files=files)


def write(path: Path, size: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n" * (size // 6 + 1))


def test_the_file_list_skips_tests_tables_and_giants_and_respects_the_cap(tmp_path: Path) -> None:
    kept = ["a.py", "pkg/mod.py", "pkg/sub/deep.py"]
    skipped = ["test/test_a.py", "pkg/tests/t.py", "idlelib/idle_test/t.py", "site-packages/lib.py",
               "encodings/cp1252.py", "pydoc_data/topics.py", "_sysconfigdata__linux.py", "notes.txt"]
    for rel in kept + skipped:
        write(tmp_path / rel)
    write(tmp_path / "huge.py", text.MAX_FILE_BYTES + 1)
    files = text.stdlib_files(root=tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == kept
    capped = text.stdlib_files(root=tmp_path, max_bytes=250)  # room for two of the three
    assert len(capped) == 2 and set(capped) < set(files)
    assert text.stdlib_files(root=tmp_path, max_bytes=250) == capped


def test_the_stdlib_corpus_is_deterministic_capped_and_split_by_file() -> None:
    root = text.stdlib_root()
    files = text.stdlib_files()
    assert files == text.stdlib_files() == sorted(files)
    assert len(files) > 100
    assert sum(p.stat().st_size for p in files) <= text.MAX_CORPUS_BYTES
    rels = [p.relative_to(root) for p in files]
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(r.parts) for r in rels)
    train, held_out = text.stdlib_files("train"), text.stdlib_files("eval")
    assert set(train).isdisjoint(held_out) and sorted(train + held_out) == files
    assert len(held_out) >= 5 and len(train) > 5 * len(held_out)
    assert all(text.split_of(p.relative_to(root)) == "eval" for p in held_out)
    assert text.files_digest(train) == text.files_digest(list(train))
    assert text.files_digest(train) != text.files_digest(held_out)


def test_the_tokenizer_round_trips_any_text_and_is_reused(tiny_tokenizer: Path) -> None:
    tok = text.load_tokenizer(tiny_tokenizer)
    assert tok.get_vocab_size() == 400
    sample = 'def f(x):\n    """Return x, naïvely ✓."""\n    return {"k": x}  # ünïcode\n'
    ids = tok.encode(sample).ids
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode())  # merges learned, not bytes only
    assert tok.token_to_id(text.EOT) is not None
    stamp = tiny_tokenizer.stat().st_mtime_ns
    files = text.stdlib_files("train")[:8]
    assert text.train_tokenizer(tiny_tokenizer, vocab_size=400, files=files) == tiny_tokenizer
    assert tiny_tokenizer.stat().st_mtime_ns == stamp  # same corpus digest: not retrained


def test_training_twice_gives_the_same_tokenizer(tmp_path: Path) -> None:
    files = text.stdlib_files("eval")[:3]
    a = text.train_tokenizer(tmp_path / "a" / "tokenizer.json", vocab_size=300, files=files)
    b = text.train_tokenizer(tmp_path / "b" / "tokenizer.json", vocab_size=300, files=files)
    assert a.read_bytes() == b.read_bytes()


def test_stdlib_rows_are_packed_token_rows_with_their_record(tiny_tokenizer: Path) -> None:
    rows = text.stdlib_rows(str(tiny_tokenizer), length=32, split="eval")
    assert isinstance(rows, TokenRows)
    n_files = len(text.stdlib_files("eval"))
    assert rows.tokens.ndim == 2 and rows.length == 32 and len(rows) > 100
    assert int(rows.tokens.min()) >= 0 and int(rows.tokens.max()) < 400
    eot = rows.tokenizer["special_ids"][text.EOT]
    assert n_files - 1 <= int((rows.tokens == eot).sum()) <= n_files
    assert rows.info["split"] == "eval" and rows.info["files"] == n_files
    assert rows.info["corpus"] == "python-stdlib" and rows.info["tokens"] == rows.tokens.numel()
    assert rows.info["files_digest"] == text.files_digest(text.stdlib_files("eval"))
    assert rows.tokenizer["vocab_size"] == 400 and len(rows.tokenizer["digest"]) == 64
    assert rows.packing == {"method": "concat", "separator": eot, "documents": n_files, "length": 32}
    assert list(tiny_tokenizer.parent.glob("tokenizer.eval.*.npz"))  # encodings kept for the next call
    again = text.stdlib_rows(tiny_tokenizer, length=32, split="eval")
    assert torch.equal(again.tokens, rows.tokens)
    few = text.stdlib_rows(tiny_tokenizer, length=32, split="eval", max_rows=10)
    assert len(few) == 10 and torch.equal(few.tokens[0], rows.tokens[0]) and torch.equal(few.tokens[-1], rows.tokens[-1])


@pytest.mark.parametrize("call, message", [
    (lambda tok: text.stdlib_rows(tok.parent / "missing.json"), "no such tokenizer file"),
    (lambda tok: text.stdlib_rows(tok, length=1), "sequence length must be at least 2"),
    (lambda tok: text.stdlib_rows(tok, split="dev"), "unknown split 'dev'"),
    (lambda tok: text.stdlib_rows(tok, max_rows=0), "max_rows must be at least 1"),
    (lambda tok: text.train_tokenizer(tok.parent / "t.json", vocab_size=100), "vocabulary size must be at least"),
    (lambda tok: gpt(width=130, heads=4), "width divisible by heads"),
])
def test_bad_requests_are_one_line_usage_errors(tiny_tokenizer: Path, call, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        call(tiny_tokenizer)
    assert "\n" not in str(info.value)


def test_a_corrupt_tokenizer_file_is_a_one_line_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UsageError, match="not a readable tokenizer file") as info:
        text.stdlib_rows(bad)
    assert "\n" not in str(info.value)


def test_gpt_maps_rows_to_logits_and_is_causal() -> None:
    torch.manual_seed(0)
    model = gpt(vocab_size=50, length=16, layers=2, width=32, heads=4).eval()
    tokens = torch.randint(0, 50, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 50) and logits.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    after = model(changed)
    assert torch.equal(after[:, :9], logits[:, :9])  # positions before the change cannot see it
    assert not torch.allclose(after[:, 9:], logits[:, 9:])
    assert torch.allclose(model(tokens[:, :5]), logits[:, :5], atol=1e-5)  # shorter rows are fine
    assert model.tokens.weight is dict(model.named_parameters())["tokens.weight"]  # the output layer is tied
    with pytest.raises(ValueError, match="longer than the model's 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_the_lm_teacher_learns_a_pattern_and_repeats_for_a_seed() -> None:
    pattern = torch.tensor([1, 5, 2, 7, 3, 1, 4, 6] * 4)
    rows = TokenRows(torch.stack([pattern.roll(-k)[:16] for k in range(8)]))
    spec = "softcache.models:gpt,vocab_size=8,length=16,layers=1,width=32,heads=2"
    untrained = lm_bits_per_token(gpt(vocab_size=8, length=16, layers=1, width=32, heads=2), rows)
    assert untrained == pytest.approx(math.log2(8), abs=0.3)
    model = train_lm_teacher(rows, steps=120, batch_size=8, lr=1e-2, seed=3, spec=spec)
    assert lm_bits_per_token(model, rows) < 0.5
    again = train_lm_teacher(rows, steps=120, batch_size=8, lr=1e-2, seed=3, spec=spec)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(UsageError, match="steps >= 1"):
        train_lm_teacher(rows, steps=0, spec=spec)
