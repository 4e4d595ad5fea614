"""Remote stores: build to and train from s3:// (a local S3-compatible server), train from a
read-only http:// URL (also streaming it chunk-shuffled), and open a remote cache with a constant
number of requests; building and training for either row kind (``kind``: digits samples, token
rows with top-k soft labels)."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from batchkit import (  # noqa: F401 - fixtures
    Kind,
    assert_same_arrays,
    build_tiny,
    cli,
    cli_env,
    kind,
    main,
    reference,
    teacher_file,
)

from softcache.cache import store
from softcache.errors import CacheError, UsageError

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
werkzeug_serving = pytest.importorskip("werkzeug.serving")

SECRET = "softcache-test-secret-3e9a1c"
KEY_ID = "AKIASOFTCACHETEST01"


@dataclass
class RequestLog:
    """Every request a test server saw, as 'METHOD /path?query'."""

    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def during(self, fn: Any) -> tuple[Any, list[str], float]:
        """Run ``fn`` and return its result, the requests it made and the seconds it took."""
        with self.lock:
            start = len(self.lines)
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        with self.lock:
            return result, self.lines[start:], seconds


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    log: RequestLog


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1 (a free port), credentials and endpoint given the usual
    way: AWS_* environment variables, read by botocore under s3fs."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    log = RequestLog()
    app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        log.add(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}?{environ.get('QUERY_STRING', '')}")
        return app(environ, start_response)

    server = werkzeug_serving.make_server("127.0.0.1", 0, counting, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # no client bound to another endpoint
        if not fsspec.filesystem("s3").exists("caches"):  # moto's backend is per process: another module made it
            fsspec.filesystem("s3").mkdir("caches")
        yield S3Server(endpoint, env, log)
        s3fs.S3FileSystem.clear_instance_cache()
    server.shutdown()
    thread.join(timeout=10)


def _open_cold(log: RequestLog, url: str) -> tuple[store.Cache, list[str], float]:
    """Open a cache the way a fresh process does (no cached client or connection)."""
    s3fs.S3FileSystem.clear_instance_cache()
    return log.during(lambda: store.open_cache(url))


def test_build_to_s3_and_train_from_it_with_credentials_from_the_environment(
        s3: S3Server, tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    url = f"s3://caches/cli-{kind.name}.zarr"
    built = cli(*kind.args(url, "--json"), env=cli_env(**s3.env))
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["complete"] is True
    assert_same_arrays(url, kind.reference.url)

    trained = main(*kind.train_args(url, tmp_path / "students", "--json"))
    assert trained.returncode == 0, trained.stderr
    row = json.loads(trained.stdout)["leaderboard"][0]
    assert row[kind.score] is not None and row["teacher_agreement"] is not None

    fs = fsspec.filesystem("s3")
    objects = fs.find(url.removeprefix("s3://"))
    metadata = [o for o in objects if o.endswith("zarr.json")]
    assert len(metadata) > 10
    port = s3.endpoint.rsplit(":", 1)[1]
    for name in objects:  # credentials and endpoint come from the environment, never the cache
        blob = fs.cat_file(name)
        for secret in (SECRET, KEY_ID, s3.endpoint, f"127.0.0.1:{port}"):
            assert secret.encode() not in blob, f"{secret!r} found in {name}"


def test_shard_workers_share_one_s3_store(s3: S3Server, kind: Kind) -> None:  # noqa: F811
    url = f"s3://caches/sharded-{kind.name}.zarr"
    first = kind.build(url, shard="0/2")
    assert not first.complete
    with pytest.raises(CacheError, match="still being built"):
        store.open_cache(url)
    second = kind.build(url, shard="1/2")
    assert second.complete and second.build_report["target"] == "joined"
    assert_same_arrays(url, kind.reference.url)


def test_opening_an_s3_cache_costs_a_constant_number_of_requests(s3: S3Server, teacher_file: str) -> None:  # noqa: F811
    few = build_tiny(teacher_file, "s3://caches/few.zarr", chunk_rows=600, shard_chunks=1)
    many = build_tiny(teacher_file, "s3://caches/many.zarr", chunk_rows=100, shard_chunks=1, store_inputs=True)
    assert (few.manifest.layout.num_shards, many.manifest.layout.num_shards) == (2, 12)
    counts = []
    for url in (few.url, many.url):
        cache, requests, seconds = _open_cold(s3.log, url)
        assert cache.complete and cache.train.rows == 1200
        assert all("zarr.json" in r for r in requests), requests  # no per-array metadata, no listing
        counts.append(len(requests))
        print(f"open {url}: {len(requests)} requests, {1000 * seconds:.1f} ms")
    assert counts[0] == counts[1] <= 3


@dataclass
class HttpServer:
    root: Path
    base: str
    log: RequestLog


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A static file server (the standard library's) over a directory of caches."""
    root = tmp_path_factory.mktemp("www")
    log = RequestLog()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.add(self.requestline.rsplit(" ", 1)[0])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpServer(root, f"http://127.0.0.1:{server.server_port}", log)
    server.shutdown()
    thread.join(timeout=10)


def _served(http_root: HttpServer, kind: Kind) -> str:
    """The kind's reference cache, served read-only over http (copied once per module)."""
    name = f"ref-{kind.name}.zarr"
    if not (http_root.root / name).exists():
        shutil.copytree(kind.reference.url, http_root.root / name)
    return f"{http_root.base}/{name}"


def test_train_from_a_read_only_http_url(http_root: HttpServer, tmp_path: Path, kind: Kind) -> None:  # noqa: F811
    url = _served(http_root, kind)
    trained = main(*kind.train_args(url, tmp_path / "students", "--json"))
    assert trained.returncode == 0, trained.stderr
    row = json.loads(trained.stdout)["leaderboard"][0]
    assert row[kind.score] is not None and row["teacher_agreement"] is not None

    with pytest.raises(UsageError, match="read-only"):
        kind.build(f"{http_root.base}/new-{kind.name}.zarr")


def test_stream_training_from_a_read_only_http_url(http_root: HttpServer, kind: Kind,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """``loader='stream'`` trains through the chunk-shuffled stream loader, reading the remote
    chunks group by group instead of holding the cache in RAM."""
    from softcache.config import StudentConfig, TrainConfig
    from softcache.student import stream
    from softcache.student.train import train

    url = _served(http_root, kind)
    streams: list[stream.StreamLoader] = []
    original = stream.StreamLoader.__init__

    def spy(self: stream.StreamLoader, *args: Any, **kwargs: Any) -> None:
        streams.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(stream.StreamLoader, "__init__", spy)
    fields = {k: v for k, v in kind.student.items() if k != "student"}
    student = StudentConfig(spec=kind.student["student"], **fields)
    result = train(url, [student], config=TrainConfig(epochs=2, batch_size=8, loader="stream", buffer_chunks=2),
                   progress=False)
    assert len(streams) == 1, "loader='stream' did not train through the stream loader"
    row = result.leaderboard.row(0, named=True)
    assert row["epochs"] == 2 and 0.0 <= row["teacher_agreement"] <= 1.0
    assert row[kind.score] is not None and row[kind.score] > 0.0


def test_opening_an_http_cache_is_one_request_and_a_partial_one_is_refused(
        http_root: HttpServer, tmp_path: Path, teacher_file: str) -> None:  # noqa: F811
    counts = []
    for name, layout in (("few", {"chunk_rows": 600, "shard_chunks": 1}), ("many", {"chunk_rows": 50, "shard_chunks": 1})):
        build_tiny(teacher_file, http_root.root / f"{name}.zarr", **layout)
        cache, requests, seconds = http_root.log.during(lambda: store.open_cache(f"{http_root.base}/{name}.zarr"))
        assert cache.complete
        counts.append(len(requests))
        print(f"open http {name}: {requests} in {1000 * seconds:.1f} ms")
    assert counts == [1, 1]

    build_tiny(teacher_file, http_root.root / "partial.zarr", shard="0/2")
    with pytest.raises(CacheError, match="still being built"):
        store.open_cache(f"{http_root.base}/partial.zarr")
    assert not store.open_cache(f"{http_root.base}/partial.zarr", allow_incomplete=True).complete
