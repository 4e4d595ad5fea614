"""Run many commands, each in its own process under a memory limit and a timeout.

    python hostile_launcher.py JOBS.json RESULTS.json

JOBS.json is a list of ``{"id", "argv", "cwd", "stdout", "stderr", "timeout", "memory"}`` where
``argv`` is what follows the interpreter (``["-m", "softcache", "validate", URL]`` or
``["-c", CODE, ARG...]``). Each job runs in a child process in a session of its own, with
``RLIMIT_AS`` set to ``memory`` bytes, killed (with its whole process group) after ``timeout``
seconds. RESULTS.json maps each id to its exit code, wall seconds, peak resident memory and
whether it was killed for time.

A fresh interpreter costs seconds of imports (torch, scikit-learn, polars) per command, which
is most of a refusal's time. So by default this process imports them once and forks a child per
job that then runs the job exactly as the interpreter would (``runpy`` for ``-m``, the code for
``-c``). ``SOFTCACHE_HOSTILE_FRESH=1`` execs a fresh interpreter per job instead.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback
from typing import Any

POLL_SECONDS = 0.02


def limit_memory(max_bytes: int) -> None:
    """Cap the address space (every allocation beyond it fails) and forbid core dumps."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def warm() -> None:
    """Import what the commands import, so a forked child starts with it in memory."""
    import importlib

    for name in ("softcache", "softcache._cli.main", "softcache.pipeline.run", "softcache.cache.check", "softcache.student.train",
                 "softcache.augment", "softcache.weights", "sklearn.datasets", "sklearn.model_selection",
                 "torch._dynamo", "polars", "safetensors.torch", "zarr", "fsspec"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module only costs the child time
            pass


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter does with ``sys.exit(value)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run_job(job: dict[str, Any], fresh: bool) -> None:
    """In the child: never returns."""
    code = 1
    try:
        os.setsid()
        limit_memory(int(job["memory"]))
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        argv = list(job["argv"])
        if fresh:
            os.execv(sys.executable, [sys.executable, *argv])
        sys.path[0] = os.getcwd()  # as for `python -m` / `python -c`
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            elif argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
            else:
                raise ValueError(f"argv must start with -m or -c, not {argv[0]!r}")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught error
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_all(jobs: list[dict[str, Any]], workers: int, fresh: bool) -> dict[str, dict[str, Any]]:
    """Run the jobs, ``workers`` at a time; a single-threaded loop, so forking is safe."""
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_job(job, fresh)
            running[pid] = {"job": job, "start": time.monotonic(), "killed": False}
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for child, state in running.items():
                if not state["killed"] and now - state["start"] > float(state["job"]["timeout"]):
                    _kill(child)
                    state["killed"] = True
            time.sleep(POLL_SECONDS)
            continue
        if pid not in running:
            continue
        state = running.pop(pid)
        _kill(pid)  # anything the job left running in its process group goes with it
        results[state["job"]["id"]] = {
            "rc": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - state["start"], 3),
            "peak_rss": int(usage.ru_maxrss) * 1024,
            "timed_out": bool(state["killed"]),
        }
    return results


def main(argv: list[str]) -> int:
    jobs_path, results_path = argv
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    fresh = os.environ.get("SOFTCACHE_HOSTILE_FRESH") == "1"
    workers = max(1, int(os.environ.get("SOFTCACHE_HOSTILE_WORKERS") or os.cpu_count() or 1))
    if not fresh:
        warm()
    results = run_all(jobs, workers, fresh)
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
