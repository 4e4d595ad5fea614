"""Who is building a cache right now, so that a build never deletes or races one in progress.

Every process that writes a cache registers itself beside the store, in ``URL + ".building/"``
(``cache.zarr`` -> ``cache.zarr.building/``), one small JSON entry per process: host, pid, pid
namespace, role, start time and the time it last said it was alive. The entries sit beside the
store, not in it, so Zarr never meets them and ``--overwrite`` can remove the old store without
touching them.

- Shard workers of one build (``--shard I/N``, torchrun ranks) register without looking at the
  others: joining a build on purpose is the point.
- A build that would replace or take over a store (``--overwrite``, ``--resume``) registers and
  then looks: if any other entry is live it withdraws its own and refuses with one line naming
  who holds the cache. Registering *before* looking means two such builds starting together
  cannot both proceed (at worst both refuse).
- An entry is live while its process is alive (same host and pid namespace: the pid is checked)
  or, for other hosts, while it was refreshed within ``STALE_S`` seconds: a background thread
  of the registering process rewrites it every ``REFRESH_S`` seconds. Dead entries are taken
  over (removed) by the next build.
- Finalizing a cache removes the whole directory; a refresh that races with it sees the cache
  complete and removes its entry again, so a finished cache leaves nothing behind. A build that
  fails keeps its entry until its process exits (a long-lived Python session holds the cache
  until then: remove the directory by hand if that session will not build it again).
- A cache at the root of a bucket (``s3://bucket``) has nothing beside it and is not guarded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from softcache.cache.location import Location
from softcache.cache.manifest import now_iso
from softcache.errors import UsageError

LOCK_SUFFIX = ".building"
REFRESH_S = 15.0
STALE_S = 120.0
RELEASE_JOIN_S = 5.0  # how long finalize waits for this process's refreshers to stop
MAX_ENTRY_BYTES = 4096


@dataclass(frozen=True)
class Holder:
    """One registered builder, as read from its entry."""

    path: str
    host: str
    pid: int
    pid_ns: str
    role: str
    started_at: str
    refreshed: float

    def describe(self, now: float) -> str:
        return (f"{self.role} by pid {self.pid} on {self.host}, started {self.started_at}, "
                f"last seen {max(0.0, now - self.refreshed):.0f}s ago")


def lock_dir(url: str | Location) -> tuple[fsspec.AbstractFileSystem, str | None]:
    """Where the entries of ``url``'s builders go; None for a cache at the root of a bucket,
    which has nothing beside it (such builds are not guarded)."""
    where = Location.of(url)
    beside = where.sibling(LOCK_SUFFIX)
    return where.fs, (where.path.rstrip("/") + LOCK_SUFFIX if beside is not None else None)


def _pid_namespace() -> str:
    """Processes in other pid namespaces (containers sharing a host name) cannot be checked by
    pid; they count as other hosts."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _identity() -> tuple[str, int, str]:
    return socket.gethostname(), os.getpid(), _pid_namespace()


def _entry_name(host: str, pid: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', host)[:100]}.{pid}.json"


def _pid_alive(pid: int) -> bool:
    """True for a running process (a zombie, killed but not yet reaped, is not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def is_live(holder: Holder, now: float, stale_s: float = STALE_S) -> bool:
    host, _, pid_ns = _identity()
    if holder.host == host and holder.pid_ns == pid_ns:
        return _pid_alive(holder.pid)
    return now - holder.refreshed < stale_s


def holders(url: str | Location) -> list[Holder]:
    """Every readable entry; one that cannot be parsed (a half-written file of a killed process)
    is skipped: it says nothing about a live builder, whose entries are written whole."""
    fs, directory = lock_dir(url)
    if directory is None:
        return []
    fs.invalidate_cache(directory)  # object-store clients cache listings; other processes write here
    try:
        names = [p for p in fs.ls(directory, detail=False) if str(p).endswith(".json")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        try:
            raw = fs.cat_file(name)
            if len(raw) > MAX_ENTRY_BYTES:
                continue
            data = json.loads(raw)
            found.append(Holder(str(name), str(data["host"]), int(data["pid"]), str(data.get("pid_ns", "")),
                                str(data.get("role", "build")), str(data.get("started_at", "?")),
                                float(data["refreshed"])))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
    return found


def _write_entry(fs: fsspec.AbstractFileSystem, path: str, entry: dict[str, Any]) -> None:
    """One whole write: a temporary file renamed into place locally, one PUT on object stores."""
    data = json.dumps({**entry, "refreshed": time.time()}).encode()
    if _is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def register(url: str | Location, *, role: str, exclusive: bool, finished_since: Callable[[str], bool],
             refresh_s: float = REFRESH_S, stale_s: float = STALE_S) -> None:
    """Record this process as a builder of ``url`` and keep the record fresh until the cache is
    complete or the record is removed (by :func:`release_all`, or by a taking-over build).

    With ``exclusive``, refuse (UsageError) when another live builder is registered, before
    anything of the cache is touched. ``finished_since(t)`` says whether the cache was completed
    at or after ISO time ``t`` (the refreshing thread stops then; an older complete cache that an
    overwrite is about to remove does not count). Calling it again in the same process is harmless."""
    fs, directory = lock_dir(url)
    if directory is None:
        return
    host, pid, pid_ns = _identity()
    mine = f"{directory}/{_entry_name(host, pid)}"
    now = time.time()
    others = [h for h in holders(url) if h.path != mine]
    for stale in (h for h in others if not is_live(h, now, stale_s)):  # dead builders: take over
        _withdraw(fs, stale.path)
    live = [h for h in others if is_live(h, now, stale_s)]
    if exclusive and live:
        _refuse(url, directory, live[0], now, stale_s)
    entry = {"host": host, "pid": pid, "pid_ns": pid_ns, "role": role, "started_at": now_iso()}
    _write_entry(fs, mine, entry)
    if exclusive:  # a builder that registered meanwhile: one of us must give way (both may)
        now = time.time()
        late = [h for h in holders(url) if h.path != mine and is_live(h, now, stale_s)]
        if late:
            _withdraw(fs, mine)
            _refuse(url, directory, late[0], now, stale_s)
    _keep_fresh(fs, mine, finished_since, refresh_s)


def _refuse(url: str | Location, directory: str, holder: Holder, now: float, stale_s: float) -> None:
    raise UsageError(
        f"{Location.of(url)}: another process is building this cache now ({holder.describe(now)}); wait for it to finish or "
        f"stop it first. If it is gone, remove {directory} (entries of dead processes on this host, and of other "
        f"hosts not seen for {stale_s:.0f}s, are taken over automatically)"
    )


class _Refresher(threading.Thread):
    """The daemon that rewrites one entry every ``refresh_s`` seconds until the cache is
    finalized; ``stop`` ends it at once, without another request to the store."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, finished_since: Callable[[str], bool],
                 refresh_s: float):
        super().__init__(name=f"softcache-building:{path}", daemon=True)
        self.fs, self.path, self.finished_since, self.refresh_s = fs, path, finished_since, refresh_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.refresh_s):
            try:
                self.fs.invalidate_cache(self.path)
                entry = json.loads(self.fs.cat_file(self.path))  # gone: released by finalize, or taken over
                _write_entry(self.fs, self.path, entry)
                if self.finished_since(entry["started_at"]):  # finalized meanwhile: leave nothing behind
                    _withdraw(self.fs, self.path)
                    return
            except FileNotFoundError:
                return
            except Exception:
                continue


def _keep_fresh(fs: fsspec.AbstractFileSystem, path: str, finished_since: Callable[[str], bool],
                refresh_s: float) -> None:
    """One refreshing thread per entry; it refreshes whatever this process last registered there."""
    if any(isinstance(t, _Refresher) and t.path == path and t.is_alive() for t in threading.enumerate()):
        return
    _Refresher(fs, path, finished_since, refresh_s).start()


def _withdraw(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove one entry, and the directory when it was the last (local directories outlive
    their files; object stores have no empty directories)."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    if _is_local(fs):
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty: other builders are registered
            pass


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def release_all(url: str | Location) -> None:
    """Remove every entry: the cache is complete, nobody is building it any more."""
    fs, directory = lock_dir(url)
    if directory is None:
        return
    # this process's refreshers of that cache stop without a request, and are waited for: one
    # caught between reading its entry and writing it back would otherwise put a file into the
    # directory while it is being removed
    refreshers = [t for t in threading.enumerate() if isinstance(t, _Refresher)
                  and t.path.startswith(f"{directory.rstrip('/')}/") and t is not threading.current_thread()]
    for thread in refreshers:
        thread.stop.set()
    for thread in refreshers:
        thread.join(timeout=RELEASE_JOIN_S)
    for attempt in range(3):  # another process's refresh may still land in a local directory being removed
        try:
            fs.rm(directory, recursive=True)
            return
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as error:
            if error.errno != errno.ENOTEMPTY or attempt == 2:
                raise
