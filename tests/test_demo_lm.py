"""``softcache demo --lm`` end to end at toy sizes: the real corpus code path (a few standard
library files), the real tokenizer, teacher, cache and students; the sizes that make
distillation pay are the demo's own and are measured by running it (README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

import softcache.demo_lm as demo  # noqa: E402
import softcache.text as text  # noqa: E402
from softcache._cli.main import main  # noqa: E402


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    files = text.stdlib_files(max_bytes=150_000)
    monkeypatch.setattr(text, "stdlib_files", lambda split=None, **_: [f for f in files if split is None or
                                                                      text.split_of(f.relative_to(text.stdlib_root().resolve())) == split])
    monkeypatch.setattr(demo, "VOCAB", 300)
    monkeypatch.setattr(demo, "LENGTH", 16)
    monkeypatch.setattr(demo, "TEACHER", "softcache.models:gpt,vocab_size=300,length=16,layers=1,width=32,heads=2")
    monkeypatch.setattr(demo, "STUDENT", "softcache.models:gpt,vocab_size=300,length=16,layers=1,width=16,heads=2")
    monkeypatch.setattr(demo, "TEACHER_STEPS", 30)
    monkeypatch.setattr(demo, "STUDENT_ROWS", 64)
    monkeypatch.setattr(demo, "STORAGE", "topk:8")


def test_the_lm_demo_runs_and_reuses_its_teacher(tiny: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "lm"
    assert main(["--quiet", "demo", "--lm", "--workdir", str(work), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    board = first["leaderboard"]
    assert len(board) == 6 and {r["alpha"] for r in board} == {0.0, demo.ALPHA}
    assert all(r["bits_per_token"] > 0 and 0 <= r["teacher_agreement"] <= 1 for r in board)
    assert first["bytes_per_token"] == 8 * 2 + 8 * 2 + 4 and not first["teacher_reused"]
    assert {r["kind"] for r in first["summary"]} == {"cross-entropy", "distilled"}
    assert (work / "tokenizer.json").is_file() and (work / "teacher.safetensors").is_file()
    cache = json.loads((work / "cache.zarr" / "zarr.json").read_text())["attributes"]["softcache"]
    assert cache["kind"] == "sequence" and cache["source"]["info"]["corpus"] == "python-stdlib"
    assert cache["source"]["info"]["files_digest"] and cache["sequence"]["tokenizer"]["vocab_size"] == 300
    assert main(["--quiet", "demo", "--lm", "--workdir", str(work)]) == 2  # results there: needs --overwrite
    assert main(["--quiet", "demo", "--lm", "--workdir", str(work), "--overwrite", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["teacher_reused"] and again["teacher_bits_per_token"] == first["teacher_bits_per_token"]
    assert [r["bits_per_token"] for r in again["leaderboard"]] == [r["bits_per_token"] for r in board]
