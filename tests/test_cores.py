"""A one-core CPU teacher stays on its core during a build, its writer keeps off it, and every
thread has its cores back afterwards, also when the build fails or another process shares the
core (``softcache.teacher.cores``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import softcache.teacher.build as build_module
from softcache.data import LabelledTensors
from softcache.teacher.build import build
from softcache.teacher.cores import WATCH_SECONDS, TeacherCore, current_cpu

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="placing threads on cores needs Linux and at least 2 cores")
CPU = torch.device("cpu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cores() -> Iterator[set[int]]:
    """The cores this thread may use, restored whatever a test does."""
    allowed = os.sched_getaffinity(0)
    yield set(allowed)
    os.sched_setaffinity(0, allowed)


class _Parked(threading.Thread):
    """A thread that reports its own cores when asked."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ask, self.answered = threading.Event(), threading.Event()
        self.seen: set[int] = set()

    def run(self) -> None:
        self.ask.wait()
        self.seen = set(os.sched_getaffinity(0))
        self.answered.set()

    def cores(self) -> set[int]:
        self.ask.set()
        self.answered.wait(10)
        return self.seen


def test_current_cpu_is_one_of_the_threads_cores(cores: set[int]) -> None:
    assert current_cpu() in cores


def test_the_teacher_keeps_its_core_and_a_writer_keeps_off_it(one_thread: None, cores: set[int]) -> None:
    writer = _Parked()
    writer.start()
    with TeacherCore("auto", CPU) as core:
        assert core.cpu in cores
        assert os.sched_getaffinity(0) == {core.cpu}
        core.keep_off(writer.native_id)
        assert writer.cores() == cores - {core.cpu}
    assert os.sched_getaffinity(0) == cores
    assert core.cpu is not None and not core.released  # the report still names the core


@pytest.mark.parametrize("mode, device, threads", [("off", "cpu", 1), ("auto", "meta", 1), ("auto", "cpu", 2)])
def test_nothing_is_pinned_unless_the_teacher_computes_on_one_cpu_core(mode: str, device: str, threads: int,
                                                                      cores: set[int]) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with TeacherCore(mode, torch.device(device)) as core:
            assert core.cpu is None and os.sched_getaffinity(0) == cores
            core.keep_off(threading.get_native_id())  # a no-op: nothing to keep off
            assert os.sched_getaffinity(0) == cores
    finally:
        torch.set_num_threads(before)


def test_a_shared_core_is_let_go(one_thread: None, cores: set[int]) -> None:
    """Calls that get half their wall time as CPU time: another process runs on the core."""
    writer = _Parked()
    writer.start()
    with TeacherCore("auto", CPU) as core:
        core.keep_off(writer.native_id)
        core.watch(WATCH_SECONDS / 2, WATCH_SECONDS / 2)  # a full core so far, and the window not over
        assert os.sched_getaffinity(0) == {core.cpu}
        core.watch(WATCH_SECONDS, WATCH_SECONDS / 4)  # 0.75 s of CPU in 1.5 s
        assert core.released
        assert os.sched_getaffinity(0) == cores
        assert writer.cores() == cores
    assert os.sched_getaffinity(0) == cores


def test_a_teacher_with_its_core_to_itself_keeps_it(one_thread: None, cores: set[int]) -> None:
    with TeacherCore("auto", CPU) as core:
        for _ in range(4):
            core.watch(WATCH_SECONDS, 0.95 * WATCH_SECONDS)
        assert not core.released and os.sched_getaffinity(0) == {core.cpu}


class _Recording(nn.Module):
    """A linear teacher that records the cores of the thread calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.seen: list[set[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(set(os.sched_getaffinity(0)))
        return self.fc(x)


def _data(rows: int = 512) -> LabelledTensors:
    return LabelledTensors(torch.randn(rows, 16), torch.arange(rows) % 10, None, {"rows": rows})


def test_a_build_keeps_its_teacher_and_writer_apart(one_thread: None, cores: set[int], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    writer_cores: list[set[int]] = []
    labelled = build_module.stored_arrays

    def recorded(*args: object, **kwargs: object) -> object:
        writer_cores.append(set(os.sched_getaffinity(0)))
        return labelled(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build_module, "stored_arrays", recorded)
    teacher = _Recording()
    cache = build(teacher, _data(), str(tmp_path / "c.zarr"), batch_size=64, chunk_rows=128, progress=False)
    report = cache.build_report
    assert report is not None and report["teacher_core"] in cores and report["teacher_core_released"] is False
    pinned = report["teacher_core"]
    calls = teacher.seen[1:]  # the first call is the shape probe, before labelling starts
    assert len(calls) == 8 and all(seen == {pinned} for seen in calls)
    assert len(writer_cores) == 8 and all(seen == cores - {pinned} for seen in writer_cores)
    assert os.sched_getaffinity(0) == cores


def test_pin_threads_off_leaves_every_thread_where_it_was(one_thread: None, cores: set[int], tmp_path: Path) -> None:
    teacher = _Recording()
    cache = build(teacher, _data(), str(tmp_path / "c.zarr"), batch_size=64, progress=False, pin_threads="off")
    assert cache.build_report is not None and cache.build_report["teacher_core"] is None
    assert all(seen == cores for seen in teacher.seen)


class _Failing(_Recording):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.seen) == 3:
            raise RuntimeError("teacher failed")
        return super().forward(x)


def test_a_failed_build_gives_the_cores_back(one_thread: None, cores: set[int], tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="teacher failed"):
        build(_Failing(), _data(), str(tmp_path / "c.zarr"), batch_size=64, progress=False)
    assert os.sched_getaffinity(0) == cores


@pytest.mark.parametrize("flag, pinned", [([], True), (["--pin-threads", "off"], False)])
def test_the_cli_reports_the_teachers_core(teacher_path: Path, tmp_path: Path, flag: list[str], pinned: bool) -> None:
    """``softcache build`` runs one torch thread unless told otherwise, so its teacher is kept on a
    core by default; ``--pin-threads off`` leaves it alone; both say so in ``--json``."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "softcache", "build", "--teacher", str(teacher_path),
                           "--data", "softcache.digits:load,split=test", "--out", str(tmp_path / "c.zarr"),
                           "--json", "--quiet", *flag], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    worker = json.loads(proc.stdout)["worker"]
    # the core is named even when the build let go of it (another test's process shared it)
    assert (worker["teacher_core"] in os.sched_getaffinity(0)) if pinned else worker["teacher_core"] is None


def test_an_unknown_pin_mode_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "softcache", "build", "--teacher", "x", "--data", "y",
                           "--out", str(tmp_path / "c.zarr"), "--pin-threads", "always"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--pin-threads" in proc.stderr and "Traceback" not in proc.stderr


def test_threads_the_store_opening_starts_are_kept_off_the_teachers_core(
        one_thread: None, cores: set[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is opened in a thread beside the teacher's first calls; a thread that opening
    starts with every core (as zarr's event loop can be, started before the opening thread is kept
    off the teacher's core) is kept off it once the store is open."""
    import time

    main, started = threading.get_native_id(), {}
    real = build_module.distributed.open_target

    def opening(*args: object, **kwargs: object) -> object:
        deadline = time.monotonic() + 10
        while len(os.sched_getaffinity(main)) != 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # the teacher is kept on its core from here
        parked = started["thread"] = _Parked()
        parked.start()
        os.sched_setaffinity(parked.native_id, cores)  # as a thread started a moment earlier would have
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build_module.distributed, "open_target", opening)
    seen: list[set[int]] = []

    class Asking(_Recording):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(self.seen) == 16:  # the last block: the store has long been open
                seen.append(started["thread"].cores())
            return super().forward(x)

    cache = build(Asking(), _data(1024), str(tmp_path / "c.zarr"), batch_size=64, chunk_rows=128, progress=False)
    pinned = cache.build_report["teacher_core"]  # type: ignore[index]
    assert pinned in cores and seen == [cores - {pinned}]
