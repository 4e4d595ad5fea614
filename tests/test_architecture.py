"""The package's shape, checked on every run.

The import contracts live in pyproject.toml (``[tool.importlinter]``) and are checked by
import-linter, the tool ``.ci/run`` also runs: stages flow one way (``cache`` <- ``teacher``,
``student`` <- ``pipeline`` <- ``_cli``), stage 1 and stage 2 are independent, the format never
imports torch, the library never imports the demo, the CLI or the benchmark, and no sibling
modules import each other in a cycle. A second check bounds the size of every module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "softcache"

MAX_MODULE_LINES = 450
"""The rule: a module holds one concept, and about 400 lines is where a second one starts to hide
in it; the test allows 450 so that a docstring growing by a few lines is not a failure, a second
concept is."""


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with pyproject's contracts, as ``.ci/run`` runs it (no cache written)."""
    beside = Path(sys.executable).with_name("lint-imports")
    exe = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports is not installed: pip install -e '.[test]' (import-linter>=2)"
    return subprocess.run([exe, "--no-cache", "pyproject.toml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{len(contracts())} kept, 0 broken" in proc.stdout


def test_the_contracts_state_the_design() -> None:
    """Deleting or loosening a contract is a failure too, not a quiet pass."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for contract in contracts():
        by_type.setdefault(contract["type"], []).append(contract)

    (layers,) = [c["layers"] for c in by_type["layers"]]
    order = [{name.strip() for name in layer.split("|")} for layer in layers]
    position = {module: i for i, layer in enumerate(order) for module in layer}
    chain = ["softcache._cli", "softcache.pipeline", "softcache.teacher", "softcache.views", "softcache.augment",
             "softcache.data", "softcache.spec", "softcache.cache"]
    assert [position[m] for m in chain] == sorted(position[m] for m in chain), layers
    assert len(set(position[m] for m in chain)) == len(chain), "each of these sits in its own layer"
    assert position["softcache.teacher"] == position["softcache.student"]  # siblings joined by "|": independent
    # the benchmark measures the demos' teachers and students: it sits above them
    assert order[1] == {"softcache._bench"} and {"softcache.demo", "softcache.demo_lm"} <= order[2]

    assert any({"softcache.teacher", "softcache.student"} <= set(c["modules"]) for c in by_type["independence"])
    forbidden = [(set(c["source_modules"]), set(c["forbidden_modules"])) for c in by_type["forbidden"]]
    assert ({"softcache.cache"}, {"torch"}) in forbidden
    library = {"softcache.cache", "softcache.spec", "softcache.weights", "softcache.data", "softcache.config",
               "softcache.augment", "softcache.views", "softcache.teacher", "softcache.student", "softcache.pipeline"}
    assert any(library <= src and {"softcache.demo", "softcache._cli", "softcache._bench"} <= banned
               for src, banned in forbidden)
    assert any(c["ancestors"] == ["softcache"] for c in by_type["acyclic_siblings"])


def test_a_broken_contract_is_caught(tmp_path: Path) -> None:
    """The check is live: the same tree with one upward import (the format importing the demo)
    fails, naming that import."""
    shutil.copytree(PACKAGE, tmp_path / "softcache", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    manifest = tmp_path / "softcache" / "cache" / "manifest.py"
    manifest.write_text(manifest.read_text() + "\nimport softcache.demo  # noqa: E402,F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = lint_imports(tmp_path, env)
    assert proc.returncode != 0
    assert "softcache.cache.manifest -> softcache.demo" in proc.stdout, proc.stdout[-4000:]


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(sizes) > 20  # the walk found the package
    over = {path: lines for path, lines in sorted(sizes.items()) if lines > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {over}"
