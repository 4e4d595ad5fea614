"""README's "Your own teacher and data" runs as written: every fenced block of that section, in
order, in a fresh directory. A python block whose first line is ``# file: NAME`` is written to
NAME; other python blocks run with ``python``; bash blocks run with ``bash -e``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Your own teacher and data"


def blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end > 0 else None]
    return re.findall(r"```(python|bash)\n(.*?)```", body, flags=re.S)


def test_the_section_has_the_steps_a_user_follows() -> None:
    found = blocks()
    kinds = [kind for kind, _ in found]
    assert kinds.count("bash") >= 1 and kinds.count("python") >= 3
    assert any(code.startswith("# file: ") for _, code in found)
    assert any("softcache.save_model" in code for _, code in found)


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SOFTCACHE_THREADS": "1"}
    env.pop(("SOFTCACHE_TRUSTED_MODULES"), None)  # the walk-through says it itself
    for kind, code in blocks():
        first = code.splitlines()[0]
        if kind == "python" and first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(code)
            continue
        command = [sys.executable, "-c", code] if kind == "python" else ["bash", "-e", "-c", code]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{kind} block failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs/own/teacher.safetensors").is_file()
    assert (tmp_path / "runs/own/sweep/leaderboard.parquet").is_file()
