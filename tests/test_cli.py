"""The CLI as a new user runs it: the demo, the acceptance commands, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

ENV = {**os.environ, "SOFTCACHE_THREADS": "1"}


def sc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "softcache", *args], capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"softcache {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    sc("demo", "--workdir", str(workdir), "--quiet")
    return workdir


def test_demo_outputs_and_distillation_helps(demo_dir: Path) -> None:
    board = pl.read_parquet(demo_dir / "leaderboard.parquet")
    assert {"student", "temperature", "alpha", "test_accuracy", "teacher_agreement"} <= set(board.columns)
    assert board.height >= 4 and (board["alpha"] == 0).any()
    for path in board["weights"]:
        assert Path(path).is_file() and path.endswith(".safetensors")
    mlp = board.filter(pl.col("spec").str.contains("mlp") & (pl.col("label_smoothing") == 0))
    hard = mlp.filter(pl.col("alpha") == 0)["test_accuracy"].max()
    distilled = mlp.filter(pl.col("alpha") > 0)["test_accuracy"].max()
    assert distilled > hard, board
    assert board["test_accuracy"].min() > 0.9


def test_validate_and_inspect_json(demo_dir: Path) -> None:
    url = str(demo_dir / "cache.zarr")
    result = json.loads(sc("validate", url, "--json", "--deep").stdout)
    assert result["valid"] is True and result["errors"] == []
    info = json.loads(sc("inspect", url, "--json").stdout)
    assert info["rows"] == 1200 and info["eval_rows"] == 597 and info["classes"] == 10
    assert info["manifest"]["source"]["info"]["split"] == "train"


def test_plain_zarr_reader_never_imports_softcache(demo_dir: Path) -> None:
    """Another team opens the cache with zarr + jsonschema only."""
    schema = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"
    code = textwrap.dedent(f"""
        import json, sys, jsonschema, numpy as np, zarr
        g = zarr.open_group({str(demo_dir / 'cache.zarr')!r}, mode="r")
        manifest = g.attrs["softcache"]
        jsonschema.validate(manifest, json.load(open({str(schema)!r})))
        soft = g["soft_labels"][:]
        assert soft.shape == (1200, 1, 10) and soft.dtype == np.float16
        assert (soft.argmax(-1)[:, 0] == g["stats/prediction"][:, 0]).all()
        assert "softcache" not in sys.modules
        print(manifest["schema_version"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_recorded_specs_rebuild_the_same_cache(demo_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads(sc("inspect", str(demo_dir / "cache.zarr"), "--json").stdout)["manifest"]
    spec = lambda s: ",".join([s["target"], *(f"{k}={v}" for k, v in s["kwargs"].items())])  # noqa: E731
    out = tmp_path / "rebuilt.zarr"
    from softcache.cache.location import Location, resolve_recorded  # paths are recorded relative to the cache

    teacher = manifest["teacher"]["spec"]
    teacher = {**teacher, "target": resolve_recorded(teacher["target"], Location.of(str(demo_dir / "cache.zarr")))}
    sc("build", "--teacher", spec(teacher), "--data", spec(manifest["source"]["spec"]),
       "--eval-data", spec(manifest["eval"]["source"]["spec"]), "--out", str(out), "--temperature",
       str(manifest["temperature"]), "--quiet")
    rebuilt = json.loads(sc("inspect", str(out), "--json").stdout)
    assert rebuilt["cache_key"] == manifest["cache_key"]
    import zarr

    a, b = zarr.open_group(str(demo_dir / "cache.zarr"), mode="r"), zarr.open_group(str(out), mode="r")
    assert (a["soft_labels"][:] == b["soft_labels"][:]).all()


def test_train_from_cli_with_a_grid(demo_dir: Path, tmp_path: Path) -> None:
    proc = sc("train", "--cache", str(demo_dir / "cache.zarr"), "--student", "softcache.models:mlp,hidden=16",
              "--temperature", "2", "4", "--alpha", "0", "0.9", "--epochs", "2", "--out", str(tmp_path), "--json", "--quiet")
    rows = json.loads(proc.stdout)["leaderboard"]
    assert len(rows) == 3  # alpha 0 once, alpha 0.9 at T=2 and T=4
    assert (tmp_path / "leaderboard.parquet").is_file()


@pytest.mark.parametrize("args, code, needle", [
    (["inspect", "/nonexistent/cache.zarr"], 1, "does not exist"),
    (["validate", "/nonexistent/cache.zarr"], 1, "does not exist"),
    (["build", "--teacher", "nosuchmodule:fn", "--data", "softcache.digits:load", "--out", "{tmp}/x.zarr"], 2, "cannot import"),
    (["build", "--teacher", "softcache.models:mlp", "--data", "softcache.digits:load", "--out", "{tmp}/y.zarr",
      "--temperature", "-1"], 2, "temperature"),
    (["train", "--cache", "{demo}/cache.zarr", "--student", "softcache.models:mlp,num_classes=3", "--out", "{tmp}/t"], 1, "classes"),
    (["train", "--cache", "{demo}/cache.zarr", "--student", "softcache.models:mlp", "--data",
      "softcache.digits:load,split=test", "--out", "{tmp}/t"], 1, "samples"),
    (["train", "--cache", "{tmp}", "--student", "softcache.models:mlp", "--out", "{tmp}/t"], 1, "not a"),
    (["build", "--teacher", "softcache.models:mlp"], 2, "required"),
    (["demo", "--workdir", "{demo}"], 2, "--overwrite"),
    (["train", "--cache", "{demo}/cache.zarr", "--student", "softcache.models:mlp", "--out", "{demo}/leaderboard.parquet"],
     2, "not a directory"),
    (["build", "--teacher", "softcache.models:mlp", "--data", "softcache.models:mlp", "--out", "{tmp}/z.zarr"],
     2, "not a map-style Dataset"),
    (["build", "--teacher", "softcache.models:mlp,in_features=5", "--data", "softcache.digits:load", "--out",
      "{tmp}/w.zarr"], 1, "cannot run on inputs"),
    (["train", "--cache", "{demo}/cache.zarr", "--student", "softcache.models:mlp,in_features=5", "--out", "{tmp}/t"],
     1, "cannot run on inputs"),
    (["stats", "{demo}/cache.zarr", "--out", "{tmp}/no/such/dir/s.parquet"], 2, "existing directory"),
])
def test_errors_are_one_line(demo_dir: Path, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    args = [a.format(tmp=tmp_path, demo=demo_dir) for a in args]
    proc = sc(*args, "--quiet", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("softcache: error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_multi_line_message_is_still_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from softcache._cli.main import main

    (tmp_path / "multiline_spec.py").write_text("def boom(**kw):\n    raise TypeError('line one\\nline two')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["build", "--teacher", "multiline_spec:boom", "--data", "softcache.digits:load",
                 "--out", str(tmp_path / "x.zarr"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("softcache: error:") and "line one line two" in err
