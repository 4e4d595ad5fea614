"""Stage 1 split over workers that share one store: shards, done-flags, joining, finalizing.

Work is cut into *units*: every shard of the training rows (``layout.shard_rows`` rows, whole
chunks), then every shard of the optional ``eval`` split, cut the same way and flagged in its own
``eval/shard_done``, so a large held-out set spreads over the workers too. Worker ``I`` of ``N``
owns units ``I, I+N, I+2N, ...``. ``N`` comes from ``--shard I/N`` (job arrays) or from the
``RANK``/``WORLD_SIZE`` that torchrun sets.

The protocol that keeps one shared store consistent without locks:

1. **Open the target** (:func:`open_target`). Nothing there: create the root group with the
   manifest in a single write, then every array, never with overwrite, so an array another worker
   already created (and maybe wrote) is left alone. Something there: it must be a softcache cache
   with the *same cache key and layout*; a shard worker joins it, a plain build joins it only with
   ``--resume``, anything else is refused with a one-line error. Under torchrun rank 0 opens the
   target first and the other ranks join after it succeeded (a gloo broadcast carries rank 0's
   error to every rank, so all ranks fail the same way).
2. **Label the units** not flagged done, writing whole chunks through the background writer; a
   unit's flag is set only after the writer has stored every chunk of that unit. Units never share
   a chunk: shards are whole chunks, and each flag has a chunk of its own.
3. **Finalize**: a worker that, after setting its last flag, sees every flag set checks the arrays,
   consolidates the metadata and marks the cache complete (:func:`finalize`; by hand:
   ``softcache finalize URL``). Every worker sets its flags before it looks, so at least one of the
   last two sees them all; two finalizing at once write the same result.

Why a killed worker never leaves a half-written chunk that a reader accepts: a chunk write is
atomic on the stores softcache writes to (zarr's local store writes a temporary file and renames
it; an object-store PUT is all or nothing), a unit without its flag is redone entirely on resume,
and its flag is written after its chunks. Workers of one build compute identical chunks (the cache
key fixes teacher, data and settings; batches start at shard boundaries, so use the same
``--batch-size`` everywhere), so a unit redone twice ends the same.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np
import zarr

from softcache.cache import lock as buildlock

from softcache.cache import store
from softcache.errors import CacheError, SoftcacheError, UsageError
from softcache.cache.manifest import MANIFEST_ATTR, Integrity, Manifest, now_iso

T = TypeVar("T")
TargetState = Literal["created", "joined", "complete"]
SplitArrays = Mapping[str, Mapping[str, store.ArraySpec]]
"""Arrays per split: ``{"train": {...}, "eval": {...}}``; the eval entry only when it is built."""


@dataclass(frozen=True)
class ShardSpec:
    """Which share of the work this process does: worker ``index`` of ``count``."""

    index: int = 0
    count: int = 1
    source: Literal["single", "shard", "torchrun"] = "single"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def joins(self) -> bool:
        """True when other workers may have created the store: it is joined, not refused."""
        return self.count > 1

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``I/N`` with ``0 <= I < N`` (job array task ids are usually already 0-based)."""
        head, sep, tail = str(text).partition("/")
        try:
            index, count = int(head), int(tail)
        except ValueError:
            raise UsageError(f"--shard must be I/N (for example 0/4), not {text!r}") from None
        if not sep or count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard {text}: need 0 <= I < N")
        return cls(index, count, "shard")


def shard_from_env(env: Mapping[str, str] | None = None) -> ShardSpec | None:
    """The torchrun share (``RANK``/``WORLD_SIZE``), or None outside a multi-process launch."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise UsageError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return ShardSpec(rank, world, "torchrun")


def resolve_shard(shard: str | ShardSpec | None, env: Mapping[str, str] | None = None) -> ShardSpec:
    """An explicit ``--shard`` or torchrun's ranks; both at once is ambiguous, so refused."""
    launched = shard_from_env(env)
    if shard is None:
        return launched or ShardSpec()
    spec = shard if isinstance(shard, ShardSpec) else ShardSpec.parse(shard)
    if launched is not None and spec.source != "torchrun":
        raise UsageError(f"--shard {spec} given inside a torchrun launch (RANK {launched.index} of "
                         f"{launched.count}); use one or the other")
    return spec


@dataclass(frozen=True)
class WorkUnit:
    """One shard of one split: the rows it covers and the flag that says they are stored."""

    split: Literal["train", "eval"]
    shard: int
    rows: range

    def __str__(self) -> str:
        return f"{self.split}:{self.shard}"


def shard_ranges(rows: int, shard_rows: int) -> list[range]:
    """Consecutive row ranges of ``shard_rows`` rows (the last one shorter) covering ``rows``."""
    return [range(s, min(s + shard_rows, rows)) for s in range(0, rows, shard_rows)]


def work_units(manifest: Manifest, with_eval: bool) -> list[WorkUnit]:
    """Every unit of a build in a fixed order: train shards, then eval shards."""
    lay = manifest.layout
    units = [WorkUnit("train", i, r) for i, r in enumerate(shard_ranges(lay.rows, lay.shard_rows))]
    if with_eval and manifest.eval is not None:
        units += [WorkUnit("eval", i, r) for i, r in enumerate(shard_ranges(manifest.eval.rows, lay.shard_rows))]
    return units


def assigned(units: list[WorkUnit], shard: ShardSpec) -> list[WorkUnit]:
    """Round-robin: worker ``I`` of ``N`` gets units ``I, I+N, ...`` (disjoint, together all)."""
    return units[shard.index :: shard.count]


def split_group(group: zarr.Group, split: str) -> zarr.Group:
    return group if split == "train" else group[store.EVAL]  # type: ignore[return-value]


def with_flags(manifest: Manifest, arrays: SplitArrays) -> dict[str, dict[str, store.ArraySpec]]:
    """The split arrays plus each split's ``shard_done`` (one uint8 chunk per shard)."""
    rows = {"train": manifest.layout.rows, "eval": manifest.eval.rows if manifest.eval else 0}
    return {split: {**specs, store.SHARD_DONE: store.flag_spec(manifest, rows[split])} for split, specs in arrays.items()}


def _split_paths(arrays: SplitArrays) -> dict[str, dict[str, store.ArraySpec]]:
    """Array paths relative to the root, for ``store.ensure_arrays``."""
    return {("" if split == "train" else f"{store.EVAL}/") + name: spec
            for split, specs in arrays.items() for name, spec in specs.items()}  # type: ignore[misc]


class TargetMismatch(UsageError):
    """The target holds another cache (other key or layout): never joined, replaced only on request."""


def _same_build(url: str, found: Manifest, wanted: Manifest) -> None:
    if found.cache_key != wanted.cache_key:
        raise TargetMismatch(
            f"{url}: holds a different cache (key {found.cache_key[:12]}, this build {wanted.cache_key[:12]}: "
            "other teacher, data or settings); pass --overwrite to replace it or write elsewhere"
        )
    a, b = found.layout, wanted.layout
    if (a.rows, a.chunk_rows, a.shard_rows) != (b.rows, b.chunk_rows, b.shard_rows):
        raise TargetMismatch(
            f"{url}: the same cache was started with chunk rows {a.chunk_rows} and shard rows {a.shard_rows}, "
            f"this build uses {b.chunk_rows} and {b.shard_rows}; use the same --chunk-rows and --shard-chunks"
        )


def open_target(url: str, manifest: Manifest, arrays: SplitArrays, *, overwrite: bool, resume: bool,
                joining: bool) -> TargetState:
    """Create the store at ``url`` or join the same build's store there (see the module doc).

    Returns ``created``, ``joined`` (a partial store of this build) or ``complete`` (nothing left
    to do). ``joining`` is set for shard workers, which expect others to have created the store.
    """
    if store.is_readonly(url):
        raise UsageError(f"{url}: http(s) URLs are read-only; write caches to a path, file:// or s3://")
    if overwrite and joining:
        raise UsageError("--overwrite cannot be combined with --shard: every worker would delete the others' "
                         "work; remove the old cache first, or launch the workers with torchrun")
    specs = _split_paths(with_flags(manifest, arrays))
    found = None if overwrite else store.peek_manifest(url)
    if found is None:
        try:
            store.prepare_target(url, overwrite=overwrite)
        except UsageError:
            # Job-array tasks start together: the path may be another worker's store caught
            # between its first file and its zarr.json. Give that worker a moment.
            found = _wait_for_manifest(url) if joining else None
            if found is None:
                raise
            return open_target(url, manifest, arrays, overwrite=False, resume=resume, joining=joining)
        _register(url, "build", exclusive=False)  # before the first file: an overwrite elsewhere sees us
        try:
            group = zarr.create_group(url, attributes={MANIFEST_ATTR: manifest.to_json()}, zarr_format=3,
                                      overwrite=False)
        except zarr.errors.ContainsGroupError:  # another worker created it a moment ago
            return open_target(url, manifest, arrays, overwrite=False, resume=resume, joining=joining)
        store.ensure_arrays(group, specs)
        return "created"
    _same_build(url, found, manifest)
    if found.status.state == "complete":
        if resume or joining:
            return "complete"
        raise UsageError(f"{url}: this cache is already built and complete (same cache key); "
                         "pass --overwrite to rebuild it")
    if not (resume or joining):
        done, total = units_done(store.open_group(url, "r"), found)
        raise UsageError(f"{url}: a partial cache of this build is there ({done}/{total} shards done; still "
                         "running, or interrupted): pass --resume to finish it, or --overwrite to start over")
    # shard workers join a running build on purpose; --resume takes over only a build nobody runs
    _register(url, "join" if joining else "resume", exclusive=not joining)
    store.ensure_arrays(store.open_group(url, "r+"), specs)
    return "joined"


def _register(url: str, role: str, exclusive: bool) -> None:
    """Record this process as a builder of ``url`` (see ``buildlock``): an ``--overwrite`` or
    ``--resume`` elsewhere is refused while it builds."""
    buildlock.register(url, role=role, exclusive=exclusive, finished_since=lambda since: store.finished_since(url, since))


def _wait_for_manifest(url: str, seconds: float = 10.0) -> Manifest | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        found = store.peek_manifest(url)
        if found is not None:
            return found
    return None


def _flags(group: zarr.Group, manifest: Manifest, split: str) -> tuple[np.ndarray, int]:
    """A split's flags and its shard count by the layout; no flags array yet (a build killed while
    creating the store) reads as nothing done."""
    rows = manifest.layout.rows if split == "train" else (manifest.eval.rows if manifest.eval else 0)
    expected = len(shard_ranges(rows, manifest.layout.shard_rows))
    g = split_group(group, split)
    flags = store.shards_done(g) if store.SHARD_DONE in g else np.zeros(expected, dtype=bool)
    return flags, expected


def units_done(group: zarr.Group, manifest: Manifest) -> tuple[int, int]:
    """``(done, total)`` shard flags over every split present in the store."""
    done = total = 0
    for split in _splits(group, manifest):
        flags, expected = _flags(group, manifest, split)
        done, total = done + int(flags.sum()), total + expected
    return done, total


def _splits(group: zarr.Group, manifest: Manifest) -> list[str]:
    return ["train"] + (["eval"] if manifest.eval is not None and store.EVAL in group else [])


def pending(group: zarr.Group, units: list[WorkUnit]) -> list[WorkUnit]:
    """The units whose flag is not set (read once, one small request per flag)."""
    flags = {split: store.shards_done(split_group(group, split)) for split in {u.split for u in units}}
    return [u for u in units if not flags[u.split][u.shard]]


def check_arrays(group: zarr.Group, manifest: Manifest) -> store.CacheCheck:
    """What forbids marking the cache complete: an unset flag, any array the manifest implies
    missing or not as it implies (``store.check_cache``, the checker ``validate`` uses too), a
    chunk not stored, or rows never written (``sample_index`` -1). Reads the flags, one listing
    per array and the sample index; ``group`` must be opened read-only, so a missing chunk is an
    error rather than a fill value."""
    check = store.check_cache(group, manifest, listing=True, flags=True)
    for prefix, rows in (("", manifest.layout.rows), (f"{store.EVAL}/", manifest.eval.rows if manifest.eval else 0)):
        found = check.arrays.get(prefix + store.INDEX)
        if found is None or not rows:
            continue
        try:
            if int(np.asarray(found[0][:]).min()) < 0:
                check.errors.append(f"{prefix or 'train '}rows never written (sample_index holds -1)")
        except CacheError as exc:
            check.errors.append(str(exc))
    return check


def finalize(url: str) -> Manifest:
    """Check the store, record its content digest, consolidate its metadata and mark it complete.

    The check covers every array the manifest implies (a cache missing one is never marked
    complete). The digest reads every chunk once (verifying its size and checksum) and is
    recorded in the manifest's ``integrity``; it covers the stored bytes, not the metadata, so it
    stays out of the cache key. Consolidation comes before the manifest update, so a complete
    cache always opens with one metadata read; a worker killed in between leaves a building cache
    that the next finalize completes. Idempotent: finalizing twice records the same digest.
    """
    if store.is_readonly(url):
        raise UsageError(f"{url}: http(s) URLs are read-only; finalize the cache where it is written")
    group = store.open_group(url, "r", consolidated=False)
    manifest = store.read_manifest(group, url)
    check = check_arrays(group, manifest)
    if check.errors:
        raise CacheError(f"{url}: cannot finalize: " + "; ".join(check.errors))
    store.remove_partial_files(url)
    digest, chunks = store.content_digest(group, check)
    integrity = Integrity(chunk_checksum=None if check.unverified else "crc32c", content_digest=digest, chunks=chunks)
    store.consolidate(url)
    group = store.open_group(url, "r+")
    manifest = store.read_manifest(group, url)
    completing = manifest.status.state != "complete"
    if completing or manifest.integrity != integrity:
        manifest.integrity = integrity
        if completing:
            manifest.status.state = "complete"
            manifest.status.finished_at = now_iso()
        store.write_manifest(group, manifest)
    if completing:
        buildlock.release_all(url)  # complete: nobody builds it any more
    return manifest


def finalize_if_done(url: str) -> bool:
    """Finalize when every flag is set (the last worker does it); True when the cache is complete."""
    group = store.open_group(url, "r")
    manifest = store.read_manifest(group, url)
    if manifest.status.state == "complete":
        return True
    done, total = units_done(group, manifest)
    if done < total:
        return False
    finalize(url)
    return True


class WorkerGroup:
    """The torchrun process group (gloo, CPU) when launched by torchrun; a no-op otherwise.

    Only the start of a build is collective: :meth:`first` runs on rank 0 before the other ranks
    and carries rank 0's outcome to them. The end is not: the last worker to finish finalizes,
    so a fast rank never waits (and never times out) on a slow one.
    """

    def __init__(self, shard: ShardSpec, timeout_s: float | None = None):
        self.shard = shard
        self.active = shard.source == "torchrun"
        self.timeout_s = timeout_s or float(os.environ.get("SOFTCACHE_DIST_TIMEOUT", "1800"))
        self._owner = False

    def __enter__(self) -> WorkerGroup:
        if self.active:
            import torch.distributed as dist

            if not dist.is_available():
                raise UsageError("this torch build has no torch.distributed; use --shard I/N instead of torchrun")
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(seconds=self.timeout_s))
                self._owner = True
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._owner:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owner = False

    def first(self, fn: Callable[[], T], then: Callable[[], T] | None = None) -> T:
        """Run ``fn`` on rank 0; after it succeeds the other ranks run ``then`` (default ``fn``).
        An error on rank 0 is raised on every rank, as the same kind of error."""
        if not self.active:
            return fn()
        if self.shard.index == 0:
            try:
                result = fn()
            except SoftcacheError as exc:
                self._broadcast(f"{'usage' if isinstance(exc, UsageError) else 'cache'}:{exc}")
                raise
            except BaseException as exc:
                self._broadcast(f"cache:rank 0 failed: {type(exc).__name__}: {exc}")
                raise
            self._broadcast("ok:")
            return result
        kind, _, message = self._broadcast("").partition(":")
        if kind == "usage":
            raise UsageError(message)
        if kind != "ok":
            raise CacheError(message)
        return (then or fn)()

    def _broadcast(self, text: str) -> str:
        """Rank 0's text to every rank, as bytes in tensors (no pickling)."""
        import torch
        import torch.distributed as dist

        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0)
        buf = data if self.shard.index == 0 else torch.empty(int(size.item()), dtype=torch.uint8)
        if int(size.item()):
            dist.broadcast(buf, src=0)
        return bytes(buf.tolist()).decode()


def build_report(url: str, shard: ShardSpec, state: TargetState, mine: list[WorkUnit], written: list[WorkUnit],
                 complete: bool, seconds: float, total_units: int) -> dict[str, Any]:
    """What one worker did, for ``build --json`` and pipelines (a stable, documented object)."""
    return {
        "url": url,
        "shard": str(shard),
        "launcher": shard.source,
        "target": state,
        "units_total": total_units,
        "units_assigned": len(mine),
        "units_written": [str(u) for u in written],
        "units_skipped": len(mine) - len(written),
        "rows_written": sum(len(u.rows) for u in written),
        "complete": complete,
        "seconds": round(seconds, 3),
        "finished_at": now_iso(),
    }

