"""The one integrity checker, and what ``softcache validate`` reports.

:func:`check_cache` compares a store with what its manifest implies (``layout``) before any array
is read: every array's metadata against the format (``layout.array_format``), shapes, dtypes,
chunking, no stray arrays, and optionally every shard flag and every chunk's presence. It is the
one checker: ``open_cache`` runs it on every open, ``finalize`` before marking a cache complete,
and :func:`validate` before reading the contents.

Validation then reads every array chunk row by chunk row, so it runs in bounded memory on caches
larger than RAM: each read checks the chunk's size and crc32c, and a missing chunk is an error.
It collects every problem instead of stopping at the first, so one run tells the whole story, and
it reports a bad cache, never raises for one. ``--deep`` adds the costly checks: stored
predictions against the soft labels, the cache key, and the content digest over every stored byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.array import AsyncArray

from softcache.cache import guard
from softcache.cache.layout import (
    EVAL,
    FORMAT_DTYPES,
    INDEX,
    INPUTS,
    LABELS,
    PREDICTION,
    SHARD_DONE,
    SOFT,
    ArrayFormat,
    ArraySpec,
    array_format,
    chunk_key,
    flag_spec,
    split_arrays,
    split_prefix,
)
from softcache.cache.location import Location
from softcache.cache.manifest import Manifest
from softcache.cache.trust import recorded_spec_problems
from softcache.errors import CacheError


class UnverifiedCacheWarning(UserWarning):
    """The cache was written without chunk checksums (softcache 0.1): it opens and trains, but
    changed or damaged bytes cannot be detected."""


def unverified_message(where: str | Location, paths: list[str]) -> str:
    return (f"{where}: {len(paths)} array(s) carry no chunk checksums (written by softcache 0.1?), e.g. {paths[0]!r}: "
            "changed or damaged bytes cannot be detected; rebuild the cache to make it verifiable")


@dataclass
class CacheCheck:
    """What :func:`check_cache` found: one line per problem, the arrays fit to read (path from
    the root -> the array and its checked format) and the paths whose chunks carry no checksum."""

    errors: list[str] = field(default_factory=list)
    arrays: dict[str, tuple[zarr.Array, ArrayFormat]] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)

    def formats(self) -> dict[str, ArrayFormat]:
        return {path: fmt for path, (_, fmt) in self.arrays.items()}


def _unreadable(exc: Exception) -> str:
    """One line for metadata that zarr cannot parse, from a store we do not trust."""
    return f"the store holds metadata that cannot be read ({type(exc).__name__}: {str(exc)[:200]})"


Member = tuple[Any, "str | None"]
"""``(node, None)``, ``(None, None)`` when absent, or ``(None, why)`` when its metadata is refused."""


def _classified(outcome: Any) -> Member:
    if isinstance(outcome, KeyError):
        return None, None
    if isinstance(outcome, CacheError):
        return None, str(outcome)
    if isinstance(outcome, Exception):
        return None, f"unreadable metadata ({type(outcome).__name__}: {str(outcome)[:200]})"
    if isinstance(outcome, BaseException):
        raise outcome
    return (zarr.Array(outcome) if isinstance(outcome, AsyncArray) else zarr.Group(outcome)), None


def _members(group: zarr.Group, paths: list[str]) -> dict[str, Member]:
    """Each path's :data:`Member`, the metadata read concurrently in one call into zarr's event
    loop: one after the other, these reads were a third of the finalize check."""
    async def read_all() -> list[Any]:
        return await asyncio.gather(*(group._async_group.getitem(p) for p in paths), return_exceptions=True)

    return {path: _classified(outcome) for path, outcome in zip(paths, guard.run(read_all()))}


def _split_rows(manifest: Manifest) -> list[tuple[str, int]]:
    """``(path prefix, rows)`` of each split the manifest records."""
    return [("", manifest.layout.rows)] + ([(f"{EVAL}/", manifest.eval.rows)] if manifest.eval is not None else [])


def _candidates(manifest: Manifest) -> list[str]:
    """Every node a cache of ``manifest`` may hold, optional ones included (inputs, labels, the
    eval split and its flags)."""
    paths = [EVAL] if manifest.eval is not None else []
    for prefix, rows in _split_rows(manifest):
        names = split_arrays(manifest, rows, store_inputs=True, with_labels=True, eval_split=bool(prefix))
        paths += [prefix + name for name in [*names, INPUTS, LABELS, SHARD_DONE]]
    return list(dict.fromkeys(paths))


def _expected(found: dict[str, Member], manifest: Manifest, check: CacheCheck
              ) -> tuple[dict[str, ArraySpec], dict[str, str]]:
    """Every array the manifest implies, by path from the root, and each split's flags path by label."""
    expected: dict[str, ArraySpec] = {}
    flags: dict[str, str] = {}
    for prefix, rows in _split_rows(manifest):
        if prefix:
            node, problem = found[EVAL]
            if not isinstance(node, zarr.Group):
                check.errors.append(problem or f"the manifest records an eval split but group {EVAL!r} is missing")
                continue

        def has(name: str) -> bool:
            return found[prefix + name] != (None, None)

        specs = split_arrays(manifest, rows, store_inputs=has(INPUTS), with_labels=has(LABELS), eval_split=bool(prefix))
        if not prefix or has(SHARD_DONE):  # caches may or may not carry flags for their eval split
            specs[SHARD_DONE] = flag_spec(manifest, rows)
            flags[prefix or "train "] = prefix + SHARD_DONE
        expected.update({prefix + name: spec for name, spec in specs.items()})
    return expected, flags


def _array_problems(path: str, meta: dict[str, Any], spec: ArraySpec, checksums_recorded: bool
                    ) -> tuple[list[str], ArrayFormat | None]:
    """Why an array cannot be read (its encoding first: that is what protects the reader) and
    how it differs from what the manifest implies; the format when there is nothing to say."""
    problems = []
    try:
        fmt: ArrayFormat | None = array_format(meta)
    except ValueError as exc:
        fmt = None
        problems.append(f"array {path!r}: {exc}")
    shape, dtype = tuple(meta.get("shape") or ()), meta.get("data_type")
    if shape != spec.shape:
        problems.append(f"array {path!r} has shape {shape}, the manifest implies {spec.shape}")
    if dtype != spec.dtype and dtype in FORMAT_DTYPES:  # any other dtype was refused above
        problems.append(f"array {path!r} has dtype {dtype}, expected {spec.dtype}")
    if fmt is not None and fmt.chunks != spec.chunks:
        problems.append(f"array {path!r} has chunks {fmt.chunks}, the manifest implies {spec.chunks}")
    if fmt is not None and checksums_recorded and not fmt.checksummed:
        problems.append(f"array {path!r} has no crc32c checksums, although the manifest says every chunk has one")
    return problems, None if problems else fmt


def check_cache(group: zarr.Group, manifest: Manifest, *, listing: bool = False, flags: bool = False) -> CacheCheck:
    """Check every array the manifest implies before any of them is read; reads metadata only,
    plus the shard flags with ``flags`` and one listing per array with ``listing``.

    Each array must exist with the manifest's shape (rows included), dtype and chunking and the
    format's encoding (``layout.array_format``); no other array may be present. With
    ``listing`` (stores that can be listed), every chunk of the grid must be stored: that finds
    missing chunks, or a declared size no store holds, in one request per thousand chunks.
    Arrays of a split whose shards are not all done are not counted (their rows are unwritten)."""
    check = CacheCheck()
    found = _members(group, _candidates(manifest))
    expected, flag_paths = _expected(found, manifest, check)
    recorded = manifest.integrity is not None and manifest.integrity.chunk_checksum == "crc32c"
    for path, spec in expected.items():
        node, problem = found[path] if path in found else _members(group, [path])[path]
        if problem is not None or not isinstance(node, zarr.Array):
            what = f": {problem}" if problem else f" is {'missing' if node is None else 'a group, not an array'}"
            check.errors.append(f"array {path!r}{what}")
            continue
        problems, fmt = _array_problems(path, node.metadata.to_dict(), spec, recorded)
        check.errors.extend(problems)
        if fmt is not None:
            check.arrays[path] = (node, fmt)
            if not fmt.checksummed:
                check.unverified.append(path)
    store = group.store
    listing = listing and isinstance(store, guard.GuardedStore) and store.listable  # http cannot list
    if listing or group.metadata.consolidated_metadata is not None:
        node_paths, problem = _array_paths(group)
        check.errors.extend([problem] if problem else [])
        check.errors.extend(f"array {p!r} is not part of the format" for p in sorted(set(node_paths) - set(expected)))
    unwritten: set[str] = set()
    for label, path in flag_paths.items() if flags else ():
        if path in check.arrays:
            try:
                done = read_flags(check.arrays[path][0])
            except CacheError as exc:
                check.errors.append(str(exc))
                continue
            if not done.all():
                undone = np.flatnonzero(~done)
                more = f" ({len(undone)} of {len(done)} shards)" if len(undone) > 20 else ""
                check.errors.append(f"{label}shards not done: {undone[:20].tolist()}{more}")
                unwritten.add(path.removesuffix(SHARD_DONE))
    for path in [p for p in check.arrays if p.rsplit("/", 1)[-1] != SHARD_DONE]:
        if split_prefix(path) in unwritten:
            del check.arrays[path]  # rows of unfinished shards are not written: nothing to count or read
        elif listing:
            fmt = check.arrays[path][1]
            strays: list[str] = []
            present = guard.present_chunks(store, path, fmt, strays).reshape(-1)  # type: ignore[arg-type]
            if strays:  # not read by anyone, but not what was finalized either: the store was edited
                check.errors.append(f"array {path!r}: {len(strays)} stored object(s) outside its chunk grid "
                                    f"(first: {strays[0]})")
            if not present.all():
                grid = np.unravel_index(np.flatnonzero(~present)[:3], fmt.grid)
                first = [chunk_key(path, coords) for coords in zip(*grid)]
                check.errors.append(f"array {path!r}: {int((~present).sum())} of {fmt.nchunks} chunks are missing "
                                    f"(first: {', '.join(first)})")
                del check.arrays[path]
    return check


def content_digest(group: zarr.Group, check: CacheCheck, written: Mapping[str, str] | None = None) -> tuple[str, int]:
    """``(sha256 hex, chunks)`` over every chunk of the checked arrays (see ``guard.content_digest``;
    ``written``: digests of chunks this process stored, not read again)."""
    store = group.store
    if not isinstance(store, guard.GuardedStore):
        raise TypeError("content_digest needs a group opened with guard.open_group")
    return guard.content_digest(store, check.formats(), written=written)


def _array_paths(group: zarr.Group) -> tuple[list[str], str | None]:
    try:
        return [p for p, node in group.members(max_depth=None) if isinstance(node, zarr.Array)], None
    except CacheError as exc:
        return [], str(exc)
    except Exception as exc:
        return [], _unreadable(exc)

def read_flags(node: zarr.Array) -> np.ndarray:
    """Shard flags as booleans. Where the store can be listed, only the flags that are stored
    are read (one listing, then those chunks): a store declaring millions of shards it does not
    hold costs one request, not millions."""
    store = node.store
    if not isinstance(store, guard.GuardedStore) or not store.listable:
        return np.asarray(node[:], dtype=bool)
    try:
        fmt = array_format(node.metadata.to_dict())
    except ValueError as exc:
        raise CacheError(f"{store.name}: array {node.path!r}: {exc}") from None
    present = np.flatnonzero(guard.present_chunks(store, node.path, fmt))
    done = np.zeros(fmt.shape[0], dtype=bool)
    if len(present):
        done[present] = np.asarray(node.get_coordinate_selection(present), dtype=bool)
    return done


def stale_consolidated(group: zarr.Group) -> list[str]:
    """Nodes whose consolidated metadata differs from their own ``zarr.json`` (the store was
    edited after it was finalized). Readers trust the consolidated copy, so this is an error;
    ``softcache finalize URL`` rewrites it. Stores that cannot be listed (HTTP) are not checked."""
    recorded_root = group.metadata.consolidated_metadata
    if recorded_root is None or not getattr(group.store, "listable", True):
        return []
    recorded = recorded_root.flattened_metadata
    problems = []
    try:
        for path, node in guard.unconsolidated(group).members(max_depth=None):
            if path not in recorded:
                problems.append(f"{path!r} is missing from the consolidated metadata")
            elif isinstance(node, zarr.Array) and node.metadata.to_dict() != recorded[path].to_dict():
                problems.append(f"the consolidated metadata of {path!r} differs from its zarr.json")
    except CacheError as exc:
        problems.append(str(exc))
    except Exception as exc:
        problems.append(_unreadable(exc))
    return problems


# -- validate ----------------------------------------------------------------------


def _check_contents(check: CacheCheck, manifest: Manifest, prefix: str, errors: list[str], deep: bool) -> None:
    """Read every checked array of one split (``prefix`` "" or "eval/") and check its values."""
    arrays = {path.removeprefix(prefix): node for path, (node, _) in check.arrays.items()
              if split_prefix(path) == prefix and path.removeprefix(prefix) != SHARD_DONE}
    if not arrays:
        return
    name = "eval" if prefix else "train"
    step = int(next(iter(arrays.values())).chunks[0])
    rows = int(next(iter(arrays.values())).shape[0])
    failed: set[str] = set()
    nonfinite: list[int] = []
    nonfinite_count = disagree = 0
    labels_outside = unwritten = False
    for start in range(0, rows, step):
        block: dict[str, np.ndarray] = {}
        for key, node in arrays.items():
            if key in failed:
                continue
            try:
                block[key] = np.asarray(node[start : start + step])
            except (CacheError, ValueError) as exc:  # one line per array: the first bad chunk
                errors.append(f"{name}: array {key!r}: {exc}")
                failed.add(key)
        soft = block.get(SOFT)
        if soft is not None and len(soft):
            bad = np.flatnonzero(~np.isfinite(soft.reshape(len(soft), -1)).all(axis=1))
            nonfinite_count += len(bad)
            nonfinite.extend((start + bad[: 10 - len(nonfinite)]).tolist())
            prediction = block.get(PREDICTION)
            if deep and prediction is not None and manifest.storage.mode == "full":
                disagree += int((soft.argmax(-1) != prediction).sum())
        labels = block.get(LABELS)
        if labels is not None and len(labels):
            labels_outside |= bool(labels.min() < -1 or labels.max() >= manifest.classes.count)
        index = block.get(INDEX)
        if deep and index is not None and len(index):
            unwritten |= bool(index.min() < 0)
    if nonfinite_count:
        errors.append(f"{name}: soft_labels hold NaN/Inf in {nonfinite_count} row(s), first {nonfinite}")
    if disagree:
        errors.append(f"{name}: stats/prediction disagrees with soft_labels in {disagree} (row, view) pair(s)")
    if labels_outside:
        errors.append(f"{name}: labels outside [-1, {manifest.classes.count})")
    if unwritten:
        errors.append(f"{name}: sample_index has negative entries (rows never written)")


def _check_digest(group: Any, manifest: Manifest, check: CacheCheck, errors: list[str],
                  warnings: list[str]) -> None:
    """Recompute the content digest that ``finalize`` recorded: any changed byte shows, even one
    whose chunk checksum was recomputed to match."""
    if manifest.integrity is None:
        warnings.append("the manifest records no content digest (a cache written by softcache 0.1?): "
                        "--deep cannot detect changed bytes in it")
        return
    if errors:  # some array is already unreadable or wrong: the digest cannot match and says no more
        return
    try:
        digest, chunks = content_digest(group, check)
    except CacheError as exc:
        errors.append(f"content digest not computed: {exc}")
        return
    recorded = manifest.integrity
    if (digest, chunks) != (recorded.content_digest, recorded.chunks):
        errors.append(f"content digest mismatch: the stored chunks differ from the finalized cache (recorded "
                      f"{recorded.content_digest[:16]} over {recorded.chunks} chunks, found {digest[:16]} over {chunks})")


def validate(url: str | Location, *, deep: bool = False) -> dict[str, Any]:
    """Return ``{"url", "valid", "errors", "warnings", "deep"}``; never raises for a bad cache.

    The root group is opened once; the checks read each array's own metadata (not the
    consolidated copy) unless the store cannot be listed."""
    where = Location.of(url)
    errors: list[str] = []
    warnings: list[str] = []
    result: dict[str, Any] = {"url": str(url), "valid": False, "errors": errors, "warnings": warnings, "deep": deep}
    try:
        group = guard.open_group(where, "r")
        manifest = guard.read_manifest(group, where)
    except CacheError as exc:
        errors.append(str(exc))
        return result
    result["cache_key"] = manifest.cache_key
    errors.extend(recorded_spec_problems(manifest))  # the code it names, checked as text: nothing is imported
    try:
        errors.extend(f"{p}: run `softcache finalize {url}` to rewrite it" for p in stale_consolidated(group))
        own = guard.unconsolidated(group) if where.listable else group
        if manifest.status.state != "complete":
            errors.append(f"build status is {manifest.status.state!r}, not 'complete'")
        check = check_cache(own, manifest, listing=True, flags=True)
        errors.extend(check.errors)
        if check.unverified:
            warnings.append(unverified_message(url, check.unverified))
        for prefix in ("", f"{EVAL}/"):
            _check_contents(check, manifest, prefix, errors, deep)
        if deep:
            if manifest.key() != manifest.cache_key:
                errors.append("cache_key does not match the manifest contents (edited after the build?)")
            _check_digest(own, manifest, check, errors, warnings)
    except CacheError as exc:  # the store refused something the checks did not foresee: still a report
        errors.append(str(exc))
    result["valid"] = not errors
    return result
