"""Where a build's threads run: a CPU teacher on a core of its own, its writer on the others.

A build runs the teacher in the calling thread and labels and writes in a writer thread (plus
zarr's event loop and a hashing thread). Left to the scheduler, those threads wake on the
teacher's core and the teacher's thread moves between cores: at 1,000 classes on a 2-core
machine it was preempted 127-155 times and moved 13-22 times in a 32,768-row build, and its calls
took 7-17% more CPU time than in a plain loop over the same batches, although switching the
writer's work off changed nothing. Kept on the core it was running on, with the other threads
kept off that core, it was preempted 10-14 times, and builds took a median 0.967 as long
(docs/performance.md, "Keeping the teacher on its core").

Only a teacher that computes on one core is kept there: a CPU device and one torch thread (the
setting of sweeps and job arrays, where every process runs one thread). A teacher on a GPU, or
using several intra-op threads, is left alone, as is a machine (or a job's CPU set) of one core.

A pinned thread cannot move away from another busy process that shares its core (two builds
started on one machine can both be running on core 0 at the moment they pin). So the pin is
watched: if the teacher's calls get less than ``SHARED_CORE`` of their wall time as CPU time over
a window, its thread is let go and every thread gets back the cores it had.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

SHARED_CORE = 0.8
"""CPU seconds per wall second of the teacher's calls below which its core is taken to be shared."""
WATCH_SECONDS = 0.5
"""Wall seconds of teacher calls in one window of the watch."""


def current_cpu() -> int | None:
    """The core the calling thread last ran on (Linux's ``/proc/thread-self/stat``), else None."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[36])  # field 39 of the whole line: "processor"
    except (OSError, ValueError, IndexError):
        return None


def _threads() -> set[int]:
    """The ids of this process's threads (Linux), else none."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return set()


def _cores_of(tid: int) -> set[int]:
    """The cores thread ``tid`` may run on; none when it has ended or is not ours to see."""
    try:
        return set(os.sched_getaffinity(tid))
    except (ProcessLookupError, PermissionError):
        return set()


def _set_cores(tid: int, cores: set[int]) -> None:
    try:
        os.sched_setaffinity(tid, cores)
    except (ProcessLookupError, PermissionError):  # the thread has ended, or is not ours to move
        pass


class TeacherCore:
    """Keeps the calling thread on its current core and every other thread of the process off it,
    from ``__enter__`` to ``__exit__``; then every thread has its cores back. Does nothing when
    ``mode`` is "off" or the teacher does not compute on one core (the module docstring)."""

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        self.cpu: int | None = None
        """The core the teacher was kept on (None: it was not), also after the build."""
        self.released = False
        """The watch let the teacher go: its core was shared."""
        self._active = False
        self._saved: set[int] = set()
        self._others: set[int] = set()
        self._moved: dict[int, set[int]] = {}  # thread id -> the cores it had
        self._window = [0.0, 0.0]  # wall, cpu seconds of the teacher's calls in this window

    def applies(self) -> bool:
        return (self.mode == "auto" and self.device.type == "cpu" and torch.get_num_threads() == 1
                and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2)

    def __enter__(self) -> TeacherCore:
        if not self.applies():
            return self
        self._saved = set(os.sched_getaffinity(0))
        cpu = current_cpu()
        cpu = cpu if cpu in self._saved else min(self._saved)
        self._others = self._saved - {cpu}
        os.sched_setaffinity(0, {cpu})
        self.cpu, self._active = cpu, True
        # the threads already running (zarr's event loop among them); those they start inherit it
        self._move_off(on_core_only=False)
        return self

    def keep_off(self, native_id: int | None) -> None:
        """Keep the thread ``native_id`` off the teacher's core: one the teacher's thread started
        while kept on its core (the build's writer), which inherited that core. Call at once."""
        if self._active and native_id is not None:
            self._moved[native_id] = set(self._saved)
            _set_cores(native_id, self._others)

    def sweep(self) -> None:
        """Keep off the teacher's core every thread that is on it but the teacher's: those started,
        while the core was being kept, by a thread not yet kept off it (the store's opening
        thread starts zarr's event loop and the build lock's refresher)."""
        if self._active:
            self._move_off(on_core_only=True)

    def _move_off(self, on_core_only: bool) -> None:
        """Take the teacher's core from every other thread not moved yet that has another core,
        noting the cores it had; ``on_core_only``: only from threads that may run on it (one whose
        cores are already the others' was started by a thread kept off, and gets every core back
        on release)."""
        assert self.cpu is not None
        for tid in _threads() - {threading.get_native_id()} - set(self._moved):
            had = _cores_of(tid)
            if had - {self.cpu} and (self.cpu in had or not on_core_only):
                self._moved[tid] = had
                _set_cores(tid, had - {self.cpu})

    def watch(self, wall: float, cpu: float) -> None:
        """Account one teacher call (its wall and thread CPU seconds); let go of a shared core."""
        if not self._active:
            return
        self._window[0] += wall
        self._window[1] += cpu
        if self._window[0] < WATCH_SECONDS:
            return
        shared = self._window[1] < SHARED_CORE * self._window[0]
        self._window = [0.0, 0.0]
        if shared:
            self.released = True
            self._release()

    def _release(self) -> None:
        if not self._active:
            return
        self._active = False
        for tid in _threads() - {threading.get_native_id()}:
            if tid in self._moved:
                _set_cores(tid, self._moved[tid])
            elif _cores_of(tid) == self._others:  # started meanwhile by a thread kept off the core
                _set_cores(tid, self._saved)
        self._moved.clear()
        os.sched_setaffinity(0, self._saved)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()
