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
   error to every rank, so all ranks fail the same way: ``teacher.workers.WorkerGroup``).
   The group opened or created there is the one the worker writes through.
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr

from softcache.cache import lock as buildlock
from softcache.cache import store
from softcache.cache.check import CacheCheck, check_cache, content_digest
from softcache.cache.guard import GuardedStore, open_group, read_manifest
from softcache.cache.layout import EVAL, INDEX, SHARD_DONE, ArraySpec, flag_spec
from softcache.cache.location import Location
from softcache.cache.manifest import Integrity, Manifest, now_iso
from softcache.errors import CacheError, UsageError

TargetState = Literal["created", "joined", "complete"]
SplitArrays = Mapping[str, Mapping[str, ArraySpec]]
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
    return group if split == "train" else group[EVAL]  # type: ignore[return-value]


def with_flags(manifest: Manifest, arrays: SplitArrays) -> dict[str, dict[str, ArraySpec]]:
    """The split arrays plus each split's ``shard_done`` (one uint8 chunk per shard)."""
    rows = {"train": manifest.layout.rows, "eval": manifest.eval.rows if manifest.eval else 0}
    return {split: {**specs, SHARD_DONE: flag_spec(manifest, rows[split])} for split, specs in arrays.items()}


def _split_paths(arrays: SplitArrays) -> dict[str, ArraySpec]:
    """Array paths relative to the root, for ``store.ensure_arrays``."""
    return {("" if split == "train" else f"{EVAL}/") + name: spec
            for split, specs in arrays.items() for name, spec in specs.items()}  # type: ignore[misc]


class TargetMismatch(UsageError):
    """The target holds another cache (other key or layout): never joined, replaced only on request."""


def _same_build(url: Location, found: Manifest, wanted: Manifest) -> None:
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


def open_target(url: str | Location, manifest: Manifest, arrays: SplitArrays, *, overwrite: bool, resume: bool,
                joining: bool) -> tuple[TargetState, zarr.Group]:
    """Create the store at ``url`` or join the same build's store there (see the module doc).

    Returns the state, ``created``, ``joined`` (a partial store of this build) or ``complete``
    (nothing left to do), and the root group, opened once for writing. ``joining`` is set for
    shard workers, which expect others to have created the store.
    """
    where = Location.of(url)
    where.require_writable("write a cache")
    if overwrite and joining:
        raise UsageError("--overwrite cannot be combined with --shard: every worker would delete the others' "
                         "work; remove the old cache first, or launch the workers with torchrun")
    specs = _split_paths(with_flags(manifest, arrays))
    found = None if overwrite else store.peek(where, "r+")
    if found is None:
        try:
            store.prepare_target(where, overwrite=overwrite)
        except UsageError:
            # Job-array tasks start together: the path may be another worker's store caught
            # between its first file and its zarr.json. Give that worker a moment.
            if not (joining and _wait_for_manifest(where)):
                raise
            return open_target(where, manifest, arrays, overwrite=False, resume=resume, joining=joining)
        _register(where, "build", exclusive=False)  # before the first file: an overwrite elsewhere sees us
        try:
            group = store.create_root(where, manifest)
        except zarr.errors.ContainsGroupError:  # another worker created it a moment ago
            return open_target(where, manifest, arrays, overwrite=False, resume=resume, joining=joining)
        store.ensure_arrays(group, specs)
        return "created", group
    group, existing = found
    _same_build(where, existing, manifest)
    if existing.status.state == "complete":
        if resume or joining:
            return "complete", group
        raise UsageError(f"{where}: this cache is already built and complete (same cache key); "
                         "pass --overwrite to rebuild it")
    if not (resume or joining):
        done, total = units_done(group, existing)
        raise UsageError(f"{where}: a partial cache of this build is there ({done}/{total} shards done; still "
                         "running, or interrupted): pass --resume to finish it, or --overwrite to start over")
    # shard workers join a running build on purpose; --resume takes over only a build nobody runs
    _register(where, "join" if joining else "resume", exclusive=not joining)
    store.ensure_arrays(group, specs)
    return "joined", group


def _register(where: Location, role: str, exclusive: bool) -> None:
    """Record this process as a builder of ``where`` (see ``lock``): an ``--overwrite`` or
    ``--resume`` elsewhere is refused while it builds."""
    buildlock.register(where, role=role, exclusive=exclusive,
                       finished_since=lambda since: store.finished_since(where, since))


def _wait_for_manifest(where: Location, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if store.peek_manifest(where) is not None:
            return True
    return False


def _flags(group: zarr.Group, manifest: Manifest, split: str) -> tuple[np.ndarray, int]:
    """A split's flags and its shard count by the layout; no flags array yet (a build killed while
    creating the store) reads as nothing done."""
    rows = manifest.layout.rows if split == "train" else (manifest.eval.rows if manifest.eval else 0)
    expected = len(shard_ranges(rows, manifest.layout.shard_rows))
    g = split_group(group, split)
    flags = store.shards_done(g) if SHARD_DONE in g else np.zeros(expected, dtype=bool)
    return flags, expected


def units_done(group: zarr.Group, manifest: Manifest) -> tuple[int, int]:
    """``(done, total)`` shard flags over every split present in the store."""
    done = total = 0
    for split in _splits(group, manifest):
        flags, expected = _flags(group, manifest, split)
        done, total = done + int(flags.sum()), total + expected
    return done, total


def _splits(group: zarr.Group, manifest: Manifest) -> list[str]:
    return ["train"] + (["eval"] if manifest.eval is not None and EVAL in group else [])


def pending(group: zarr.Group, units: list[WorkUnit]) -> list[WorkUnit]:
    """The units whose flag is not set (read once, one small request per flag)."""
    flags = {split: store.shards_done(split_group(group, split)) for split in {u.split for u in units}}
    return [u for u in units if not flags[u.split][u.shard]]


def check_arrays(group: zarr.Group, manifest: Manifest) -> CacheCheck:
    """What forbids marking the cache complete: an unset flag, any array the manifest implies
    missing or not as it implies (``check.check_cache``, the checker ``validate`` uses too), a
    chunk not stored, or rows never written (``sample_index`` -1). Reads the flags, one listing
    per array and the sample index; ``group`` must be opened read-only, so a missing chunk is an
    error rather than a fill value."""
    check = check_cache(group, manifest, listing=True, flags=True)
    for prefix, rows in (("", manifest.layout.rows), (f"{EVAL}/", manifest.eval.rows if manifest.eval else 0)):
        found = check.arrays.get(prefix + INDEX)
        if found is None or not rows:
            continue
        try:
            if int(np.asarray(found[0][:]).min()) < 0:
                check.errors.append(f"{prefix or 'train '}rows never written (sample_index holds -1)")
        except CacheError as exc:
            check.errors.append(str(exc))
    return check


def finalize(url: str | Location) -> Manifest:
    """Check the store, record its content digest, consolidate its metadata and mark it complete.

    The check covers every array the manifest implies (a cache missing one is never marked
    complete). The digest reads every chunk once (verifying its size and checksum) and is
    recorded in the manifest's ``integrity``; it covers the stored bytes, not the metadata, so it
    stays out of the cache key. Consolidation comes before the manifest update, so a complete
    cache always opens with one metadata read; a worker killed in between leaves a building cache
    that the next finalize completes. Idempotent: finalizing twice records the same digest.
    The root group is opened once (read-only, each array's own metadata); the manifest is
    written through the group that consolidation returns.
    """
    return _finalize(Location.of(url), again=True)


def _finalize(where: Location, again: bool, written: Mapping[str, str] | None = None) -> Manifest:
    """:func:`finalize`; with ``again`` False a cache already complete is left as it is.
    ``written``: digests of chunks this process stored (``guard.GuardedStore.written_digests``),
    taken as they are instead of read back; every other chunk is read."""
    where.require_writable("finalize a cache")
    group = open_group(where, "r", consolidated=False)
    manifest = read_manifest(group, where)
    if manifest.status.state == "complete" and not again:
        return manifest
    check = check_arrays(group, manifest)
    if check.errors:
        raise CacheError(f"{where}: cannot finalize: " + "; ".join(check.errors))
    store.remove_partial_files(where)
    digest, chunks = content_digest(group, check, written)
    integrity = Integrity(chunk_checksum=None if check.unverified else "crc32c", content_digest=digest, chunks=chunks)
    completing = manifest.status.state != "complete"
    consolidated = store.consolidate(where)
    if completing or manifest.integrity != integrity:
        manifest.integrity = integrity
        if completing:
            manifest.status.state = "complete"
            manifest.status.finished_at = now_iso()
        store.write_manifest(consolidated, manifest)
    if completing:
        buildlock.release_all(where)  # complete: nobody builds it any more
    return manifest


def finalize_if_done(url: str | Location, group: zarr.Group, all_mine: bool = False) -> bool:
    """Finalize when every flag is set (the last worker does it); True when the cache is complete.

    ``group`` is the worker's own root group from :func:`open_target`: its manifest is the one
    read or written when it was opened, and the flags are read through it, fresh. Finalizing
    opens the store read-only once more, and leaves it alone when another worker finished first.
    The chunks this worker wrote through ``group`` enter the content digest by the digests noted
    while they were written (the writer thread computed them beside the teacher); the others
    are read. ``all_mine``: this worker created the store and did every unit, so the flags are
    not counted first (the finalize check reads them all and refuses a cache with one unset)."""
    manifest = read_manifest(group, url)
    if manifest.status.state == "complete":
        return True
    if not all_mine:
        done, total = units_done(group, manifest)
        if done < total:
            return False
    store = group.store
    _finalize(Location.of(url), again=False,
              written=store.written_digests() if isinstance(store, GuardedStore) else None)
    return True


def build_report(url: str | Location, shard: ShardSpec, state: TargetState, mine: list[WorkUnit], written: list[WorkUnit],
                 complete: bool, seconds: float, total_units: int, teacher_seconds: float = 0.0,
                 teacher_core: int | None = None, teacher_core_released: bool = False) -> dict[str, Any]:
    """What one worker did, for ``build --json`` and pipelines (a stable, documented object).
    ``teacher_seconds`` of the ``seconds`` were the teacher's calls; the rest is the build's own.
    ``teacher_core``: the core the teacher's thread was kept on (None: not kept), and whether it
    was let go because another process shared that core (``teacher.cores``)."""
    return {
        "url": Location.of(url).url,
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
        "teacher_seconds": round(teacher_seconds, 3),
        "teacher_core": teacher_core,
        "teacher_core_released": teacher_core_released,
        "finished_at": now_iso(),
    }

