"""Locations: credentials never recorded or printed, machine paths never recorded, remote reads
time out with one line naming the URL, and file:// URLs work for writing as for reading."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr
from batchkit import EVAL, main, tiny_teacher

from softcache.cache import store
from softcache.errors import CacheError, UsageError
from softcache.cache.location import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    Location,
    default_timeout,
    record_location,
    record_value,
    redact,
    redact_text,
    resolve_recorded,
    timeout_scope,
)
from softcache.weights import load_model, save_model, weights_digest

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize("url, expected", [
    (f"http://alice:{SECRET}@host:8080/c.zarr", "http://host:8080/c.zarr"),
    (f"s3://AKIAKEY:{SECRET}@bucket/c.zarr", "s3://bucket/c.zarr"),
    (f"s3://AKIAKEY:ab/{SECRET}@bucket/c.zarr", "s3://bucket/c.zarr"),  # a secret holding "/" too
    (f"https://h/t.safetensors?X-Amz-Signature={SECRET}&X-Amz-Credential=k&v=2", "https://h/t.safetensors?v=2"),
    (f"https://h/t.safetensors?token={SECRET}&sig={SECRET}&api_key={SECRET}&split=a", "https://h/t.safetensors?split=a"),
    ("s3://bucket/runs@v2/c.zarr", "s3://bucket/runs@v2/c.zarr"),  # an @ in a key is not user info
    ("http://host:80/a@b", "http://host:80/a@b"),
    ("/home/alice/c.zarr", "/home/alice/c.zarr"),
])
def test_redact_strips_credentials_and_keeps_the_rest(url: str, expected: str) -> None:
    assert redact(url) == expected
    assert SECRET not in redact_text(f"softcache: error: {url}: no such cache")


def test_location_answers_remote_read_only_and_storage_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    http = Location.of(f"http://u:{SECRET}@127.0.0.1:9/c.zarr")
    assert (http.remote, http.read_only, str(http)) == (True, True, "http://127.0.0.1:9/c.zarr")
    timeout = http.storage_options["client_kwargs"]["timeout"]
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (DEFAULT_TIMEOUT, DEFAULT_TIMEOUT, None)
    s3 = Location.of("s3://bucket/c.zarr", timeout=7)
    assert (s3.remote, s3.read_only) == (True, False)
    assert s3.storage_options["config_kwargs"]["read_timeout"] == 7
    local = Location.of("file:///tmp/x.zarr")
    assert (local.remote, local.read_only, local.zarr_url, local.storage_options) == (False, False, "/tmp/x.zarr", {})
    assert Location.of("runs/c.zarr").local_path == Path("runs/c.zarr")

    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert Location.of("s3://b/c").timeout == 2.5
    with timeout_scope(0.5):
        assert default_timeout() == 0.5
    assert os.environ[TIMEOUT_ENV] == "2.5"  # restored
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=TIMEOUT_ENV):
            default_timeout()


def test_recorded_paths_are_relative_to_the_cache_or_a_name_and_digest(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "c.zarr").mkdir(parents=True)
    cache = Location.of(str(work / "c.zarr"))
    beside, inside, elsewhere = work / "teacher.safetensors", work / "c.zarr" / "w.bin", tmp_path / "far.safetensors"
    for path in (beside, inside, elsewhere):
        path.write_bytes(b"weights " + path.name.encode())
    assert record_location(str(beside), cache) == "../teacher.safetensors"
    assert record_location(f"file://{inside}", cache) == "./w.bin"
    digest = hashlib.sha256(elsewhere.read_bytes()).hexdigest()
    assert record_location(str(elsewhere), cache) == f"far.safetensors#sha256={digest}"
    assert record_location(str(elsewhere), Location.of("s3://bucket/c.zarr")) == f"far.safetensors#sha256={digest}"
    assert record_location(f"http://u:{SECRET}@h/t.safetensors", cache) == "http://h/t.safetensors"
    assert record_value({"path": str(beside), "split": "train", "files": [str(inside), "x"], "n": 3}, cache) == \
        {"path": "../teacher.safetensors", "split": "train", "files": ["./w.bin", "x"], "n": 3}

    assert resolve_recorded("../teacher.safetensors", cache) == str(beside)
    assert resolve_recorded("softcache.models:mlp", cache) == "softcache.models:mlp"
    with pytest.raises(UsageError, match="far.safetensors"):  # not next to the cache (yet)
        resolve_recorded(f"far.safetensors#sha256={digest}", cache)
    shutil.copy(elsewhere, work / "far.safetensors")
    assert resolve_recorded(f"far.safetensors#sha256={digest}", cache) == str(work / "far.safetensors")
    (work / "far.safetensors").write_bytes(b"other bytes")
    with pytest.raises(UsageError, match="digest"):
        resolve_recorded(f"far.safetensors#sha256={digest}", cache)


def test_no_machine_path_in_the_manifest_and_the_demo_teacher_spec_rebuilds(
        tmp_path: Path, teacher_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's layout (teacher.safetensors next to cache.zarr): the manifest names the teacher
    relative to the cache, and that SPEC, resolved, rebuilds a cache with the same key."""
    from softcache import demo
    from softcache.config import StudentConfig

    teacher, config = load_model(str(teacher_path)), demo.TrainConfig
    monkeypatch.setattr(demo, "train_teacher", lambda **kw: (teacher, 0.0))  # the demo's, minus minutes of training
    monkeypatch.setattr(demo, "demo_students", lambda seed=0: [StudentConfig(spec=demo.MLP, alpha=0.0)])
    monkeypatch.setattr(demo, "TrainConfig", lambda device=None: config(epochs=1, device=device))
    workdir = tmp_path / "demo"
    _, cache, _ = demo.run_demo(workdir, progress=False)

    raw = (workdir / "cache.zarr" / "zarr.json").read_text()
    assert str(tmp_path) not in raw and str(workdir) not in raw
    spec = cache.manifest.teacher.spec
    assert spec is not None and spec.target == "../teacher.safetensors"
    resolved = resolve_recorded(spec.target, Location.of(cache.url))
    assert weights_digest(load_model(resolved)) == cache.manifest.teacher.weights_digest
    out = tmp_path / "rebuilt.zarr"
    args = ["build", "--teacher", resolved, "--data", str(cache.manifest.source.spec), "--eval-data",
            str(cache.manifest.eval.source.spec), "--out", str(out), "--quiet", "--json"]  # type: ignore[union-attr]
    built = main(*args)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["cache_key"] == cache.manifest.cache_key


@pytest.fixture()
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1 over a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", root
    server.shutdown()
    thread.join(timeout=10)


def test_credentials_in_a_teacher_url_are_never_recorded_or_printed(www: tuple[str, Path], tmp_path: Path) -> None:
    host, root = www
    save_model(tiny_teacher(), root / "teacher.safetensors", "softcache.models:teacher_cnn,width=4")
    url = f"http://alice:{SECRET}@{host}/teacher.safetensors?token={SECRET}"
    out = tmp_path / "c.zarr"
    built = main("build", "--teacher", url, "--data", EVAL, "--out", str(out), "--quiet", "--json")
    assert built.returncode == 0, built.stderr
    for meta in out.rglob("zarr.json"):
        assert SECRET not in meta.read_text() and "alice" not in meta.read_text(), meta
    shown = main("inspect", str(out), "--json")
    assert shown.returncode == 0 and SECRET not in shown.stdout
    assert json.loads(shown.stdout)["manifest"]["teacher"]["spec"]["target"] == f"http://{host}/teacher.safetensors"

    missing = main("inspect", f"http://alice:{SECRET}@{host}/missing.zarr")
    assert missing.returncode == 1 and SECRET not in missing.stderr and f"http://{host}/missing.zarr" in missing.stderr


@pytest.fixture()
def slow_server() -> Iterator[str]:
    """An HTTP server that answers nothing for 5 s: longer than the 1 s timeouts below."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(5)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_slow_server_is_one_line_naming_the_url_within_the_timeout(
        slow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"http://bob:{SECRET}@{slow_server}/c.zarr"
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    for command in (["inspect", url], ["validate", url], ["train", "--cache", url, "--student", "softcache.models:mlp",
                                                          "--out", str(tmp_path / "t")]):
        start = time.perf_counter()
        result = main(*command, "--timeout", "1")
        seconds = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, result.stderr
        assert seconds < 4.5, f"{command[0]} took {seconds:.1f}s"
        assert len(lines) == 1 and lines[0].startswith("softcache: error:"), result.stderr
        assert f"http://{slow_server}/c.zarr" in lines[0] and "no answer within 1 s" in lines[0]
        assert SECRET not in result.stderr and SECRET not in result.stdout
    assert TIMEOUT_ENV not in os.environ  # --timeout lasts one command
    before = main("--timeout", "1", "inspect", url)  # a global flag: before the command too
    assert before.returncode == 1 and "no answer within 1 s" in before.stderr, before.stderr

    monkeypatch.setenv(TIMEOUT_ENV, "1")
    with pytest.raises(CacheError, match="no answer within 1 s"):
        store.open_cache(url)
    with pytest.raises(CacheError, match="no answer within 1 s"):
        load_model(f"http://{slow_server}/teacher.safetensors")


def test_file_urls_work_for_writing_caches_and_results(tmp_path: Path) -> None:
    cache_url = f"file://{tmp_path}/new/dir/c.zarr"
    built = main("build", "--teacher", "softcache.models:teacher_cnn,width=4", "--data", EVAL, "--out", cache_url,
                 "--chunk-rows", "200", "--quiet")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "new" / "dir" / "c.zarr" / "zarr.json").is_file()
    assert store.open_cache(cache_url).train.rows == 597
    trained = main("train", "--cache", cache_url, "--student", "softcache.models:mlp,hidden=4", "--epochs", "1",
                   "--out", f"file://{tmp_path}/results", "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "results" / "leaderboard.parquet").is_file()
    assert not (Path.cwd() / "file:").exists()
    reread = zarr.open_group(str(tmp_path / "new" / "dir" / "c.zarr"), mode="r")
    assert "softcache" in reread.attrs
