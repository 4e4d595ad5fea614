"""A build never deletes or races a cache another process is building: ``--overwrite`` and
``--resume`` are refused while a live builder is registered beside the store, shard workers still
join, dead builders are taken over, and a finished build leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from batchkit import (  # noqa: F401 - fixtures
    assert_same_arrays,
    build_args,
    build_tiny,
    cli,
    cli_env,
    flags_set,
    reference,
    teacher_file,
)

from softcache.cache import lock as buildlock

from softcache.cache import store

from softcache.cache.check import validate
from softcache.errors import UsageError

GATED = '''
"""A build that stops part-way until the test lets it go: deterministic, however slow the machine."""
import os
import time

from batchkit import tiny_teacher


def gated_teacher(gate: str, free_calls: int = 10):
    model = tiny_teacher()
    calls = [0]

    def wait_at_the_gate(module, inputs):
        calls[0] += 1  # the first call probes the output shape; the next ones label batches
        while calls[0] > free_calls and os.path.exists(gate):
            time.sleep(0.02)

    model.register_forward_pre_hook(wait_at_the_gate)
    return model


if __name__ == "__main__":  # a build through the Python API in a process of its own
    import json
    import sys

    from batchkit import build_tiny

    cache = build_tiny(gated_teacher(sys.argv[1]), sys.argv[2])
    print(json.dumps({"complete": cache.complete}))
'''


def _lock_entries(out: Path) -> list[Path]:
    return sorted(Path(f"{out}{buildlock.LOCK_SUFFIX}").glob("*.json"))


def _fake_entry(out: Path, *, host: str, pid: int, refreshed: float, role: str = "build") -> Path:
    """An entry as another builder would have written it."""
    folder = Path(f"{out}{buildlock.LOCK_SUFFIX}")
    folder.mkdir(exist_ok=True)
    entry = folder / f"{host}.{pid}.json"
    pid_ns = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""
    entry.write_text(json.dumps({"host": host, "pid": pid, "pid_ns": pid_ns, "role": role,
                                 "started_at": "2030-01-01T00:00:00+00:00", "refreshed": refreshed}))
    return entry


@pytest.fixture
def live_process() -> Iterator[int]:
    """A process of this host that stays alive during the test (stands for another builder)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait(timeout=30)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_overwrite_is_refused_while_another_process_builds(tmp_path: Path, teacher_file: str,  # noqa: F811
                                                        reference) -> None:  # noqa: F811
    helpers, gate, out = tmp_path / "helpers", tmp_path / "gate", tmp_path / "busy.zarr"
    helpers.mkdir()
    (helpers / "gated.py").write_text(GATED)
    gate.touch()
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(helpers), env["PYTHONPATH"]])
    first = subprocess.Popen([sys.executable, str(helpers / "gated.py"), str(gate), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and flags_set(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None and flags_set(out) >= 1, "the first build did not reach its gate"
        holder = [json.loads(p.read_text()) for p in _lock_entries(out)]
        assert [(h["pid"], h["host"]) for h in holder] == [(first.pid, socket.gethostname())]

        second = cli(*build_args(teacher_file, out, "--overwrite"))  # another process, another build
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("softcache: error:") and second.stderr.count("\n") == 1
        assert "another process is building this cache now" in second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # still at its gate: the refusal was against a running build
    finally:
        gate.unlink()
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["complete"] is True
    assert store.open_cache(str(out)).complete
    assert validate(str(out), deep=True)["valid"]
    assert_same_arrays(out, reference.url)  # whole and identical to an undisturbed build
    assert not Path(f"{out}{buildlock.LOCK_SUFFIX}").exists()  # a finished build leaves nothing behind

    again = cli(*build_args(teacher_file, out, "--overwrite", "--json"))  # nobody builds it now
    assert again.returncode == 0, again.stderr


def test_resume_and_overwrite_wait_for_a_live_builder_but_shard_workers_join(
        tmp_path: Path, teacher_file: str, live_process: int) -> None:  # noqa: F811
    out = tmp_path / "shared.zarr"
    assert not build_tiny(teacher_file, out, shard="0/2").complete
    _fake_entry(out, host=socket.gethostname(), pid=live_process, refreshed=time.time())
    with pytest.raises(UsageError, match=f"another process is building.*pid {live_process}"):
        build_tiny(teacher_file, out, resume=True)
    with pytest.raises(UsageError, match="another process is building"):
        build_tiny(teacher_file, out, overwrite=True)
    assert store.peek_manifest(str(out)) is not None  # nothing was deleted

    joined = build_tiny(teacher_file, out, shard="1/2")  # a worker of the same build joins on purpose
    assert joined.complete and joined.build_report["target"] == "joined"
    assert not Path(f"{out}{buildlock.LOCK_SUFFIX}").exists()


def test_dead_and_silent_builders_are_taken_over(tmp_path: Path, teacher_file: str) -> None:  # noqa: F811
    out = tmp_path / "orphan.zarr"
    assert not build_tiny(teacher_file, out, shard="0/3").complete
    dead = _fake_entry(out, host=socket.gethostname(), pid=_dead_pid(), refreshed=time.time())
    silent = _fake_entry(out, host="elsewhere.example", pid=4242, refreshed=time.time() - buildlock.STALE_S - 5)
    resumed = build_tiny(teacher_file, out, resume=True)
    assert resumed.complete
    assert not dead.exists() and not silent.exists()


def test_a_builder_on_another_host_holds_the_cache_while_it_refreshes(
        tmp_path: Path, teacher_file: str) -> None:  # noqa: F811
    out = tmp_path / "remote-holder.zarr"
    build_tiny(teacher_file, out)
    entry = _fake_entry(out, host="elsewhere.example", pid=os.getpid(), refreshed=time.time() - 10, role="overwrite")
    with pytest.raises(UsageError, match="overwrite by pid .* on elsewhere.example.*last seen 1[0-9]s ago"):
        build_tiny(teacher_file, out, overwrite=True)
    assert store.open_cache(str(out)).complete and entry.exists()
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "refreshed": time.time() - buildlock.STALE_S - 1}))
    assert build_tiny(teacher_file, out, overwrite=True).complete


def test_entries_are_refreshed_until_the_cache_is_complete(tmp_path: Path, teacher_file: str) -> None:  # noqa: F811
    out = tmp_path / "fresh.zarr"
    url = str(out)
    buildlock.register(url, role="test", exclusive=False, refresh_s=0.05,
                       finished_since=lambda since: store.finished_since(url, since))
    [entry] = _lock_entries(out)
    first = json.loads(entry.read_text())["refreshed"]
    time.sleep(0.5)
    assert json.loads(entry.read_text())["refreshed"] > first
    assert build_tiny(teacher_file, out).complete  # the same process builds; finalize removes every entry
    time.sleep(0.5)  # a refresh racing with the removal must not bring the entry back
    assert not Path(f"{out}{buildlock.LOCK_SUFFIX}").exists()


def test_finalize_waits_for_a_refresh_caught_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresher that has read its entry and not yet written it back when the cache is
    released: the release waits for it, so the removal never races the write (which left the
    directory, or failed the removal with "Directory not empty")."""
    import threading

    url = str(tmp_path / "race.zarr")
    inside, real_write = threading.Event(), buildlock._write_entry

    def slow_write(fs, path, entry):  # type: ignore[no-untyped-def]
        inside.set()
        time.sleep(0.3)
        real_write(fs, path, entry)

    buildlock.register(url, role="test", exclusive=False, refresh_s=0.02, finished_since=lambda since: False)
    monkeypatch.setattr(buildlock, "_write_entry", slow_write)
    assert inside.wait(5)
    buildlock.release_all(url)
    assert not Path(f"{url}{buildlock.LOCK_SUFFIX}").exists()
    time.sleep(0.1)
    assert not any(isinstance(t, buildlock._Refresher) and t.path.startswith(url) and t.is_alive()
                   for t in threading.enumerate())


def test_two_overwrites_racing_never_both_proceed(tmp_path: Path, teacher_file: str,  # noqa: F811
                                                  live_process: int) -> None:
    """The second registrant sees the first even when both checked before either wrote."""
    out = tmp_path / "race.zarr"
    build_tiny(teacher_file, out)
    url = str(out)
    done = lambda since: store.finished_since(url, since)  # noqa: E731
    real_holders = buildlock.holders
    calls = {"n": 0}

    def late_arrival(where: str) -> list[buildlock.Holder]:
        """The first look finds nobody; meanwhile another overwrite registers."""
        calls["n"] += 1
        if calls["n"] == 1:
            _fake_entry(out, host=socket.gethostname(), pid=live_process, refreshed=time.time(), role="overwrite")
            return []
        return real_holders(where)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(buildlock, "holders", late_arrival)
        with pytest.raises(UsageError, match="another process is building"):
            buildlock.register(url, role="overwrite", exclusive=True, finished_since=done)
    assert [json.loads(p.read_text())["pid"] for p in _lock_entries(out)] == [live_process]  # ours withdrawn
