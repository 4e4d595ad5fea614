"""Where a cache is written and read: the Zarr v3 store of a :class:`~softcache.cache.location.Location`.

What arrays a cache has is ``layout``; how every read is guarded, and how the root group is
opened, is ``guard``; what makes a store fit to read is ``check``. This module prepares a
target, creates the root group and its arrays, writes rows and shard flags, consolidates the
metadata, and opens a cache for reading (:func:`open_cache`, :class:`Cache`, :class:`Split`).

Every function takes a :class:`Location` or a URL (made into one on entry, once): the location
decides whether the store is remote or read-only, and a function given a group uses it rather
than opening the root again. A complete cache has its metadata consolidated into the root
``zarr.json``, so opening it is one read whatever the number of arrays, which matters on object
stores and HTTP. Shard flags are set only after their rows are stored (see ``shards``).
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from softcache.cache import lock as buildlock
from softcache.cache.check import (
    UnverifiedCacheWarning,
    check_cache,
    read_flags,
    unverified_message,
)
from softcache.cache.guard import GuardedStore, guarded_store, open_group, read_manifest
from softcache.cache.layout import (
    EVAL,
    INDEX,
    INPUTS,
    LABELS,
    LOSS_MASK,
    PREDICTION,
    SHARD_DONE,
    SOFT,
    STATS,
    TOKENS,
    ArraySpec,
    is_flag,
    split_prefix,
)
from softcache.cache.location import Location
from softcache.cache.manifest import MANIFEST_ATTR, Manifest
from softcache.errors import CacheError, UsageError


def write_manifest(group: zarr.Group, manifest: Manifest) -> None:
    group.attrs[MANIFEST_ATTR] = manifest.to_json()


# -- the target of a build -----------------------------------------------------------------------


def prepare_target(url: str | Location, *, overwrite: bool) -> None:
    """Refuse to write over anything unless asked; with ``overwrite`` remove the old cache.

    Only a softcache cache (a Zarr group whose ``zarr.json`` carries the manifest) is ever
    removed: a non-empty directory that is anything else is refused even with ``overwrite``."""
    where = Location.of(url)
    where.require_writable("write a cache")
    fs, path = where.fs, where.path
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise UsageError(f"{where}: exists and is a file, not a cache directory")
    if not fs.ls(path):
        return
    if not holds_manifest(where):  # --overwrite replaces a cache, never deletes an arbitrary directory
        raise UsageError(f"{where}: a non-empty directory that is not a cache already exists there; "
                         "write the cache elsewhere or remove it yourself")
    if not overwrite:
        raise UsageError(f"{where}: a cache already exists there; pass --overwrite to replace it")
    # never delete a cache another process is building; registered first, so none starts meanwhile
    buildlock.register(where, role="overwrite", exclusive=True, finished_since=lambda since: finished_since(where, since))
    fs.rm(path, recursive=True)


def finished_since(url: str | Location, since: str) -> bool:
    """True when the cache at ``url`` was completed at or after ``since`` (ISO time): the build
    registered then is over. An older complete cache (about to be replaced) does not count."""
    found = peek_manifest(url)
    return found is not None and found.status.state == "complete" and (found.status.finished_at or "") >= since


def holds_manifest(url: str | Location) -> bool:
    """True when ``url`` is a Zarr group whose root attributes hold a softcache manifest (read as
    plain JSON: nothing of the store is opened as Zarr)."""
    where = Location.of(url)
    meta = f"{where.path.rstrip('/')}/zarr.json"
    if not where.fs.exists(meta):
        return False
    try:
        return MANIFEST_ATTR in (json.loads(where.fs.cat_file(meta)).get("attributes") or {})
    except (ValueError, AttributeError):
        return False


def create_root(url: str | Location, manifest: Manifest) -> zarr.Group:
    """Create the root group with the manifest in one write, never over an existing one
    (``zarr.errors.ContainsGroupError`` when another worker made it first)."""
    return zarr.create_group(guarded_store(Location.of(url), "r+"), attributes={MANIFEST_ATTR: manifest.to_json()},
                             zarr_format=3, overwrite=False)


def peek(url: str | Location, mode: str = "r") -> tuple[zarr.Group, Manifest] | None:
    """The root group (opened once, in ``mode``) and manifest of the cache at ``url``; None when
    there is nothing there (or an empty directory)."""
    where = Location.of(url)
    if not where.fs.exists(f"{where.path.rstrip('/')}/zarr.json"):
        return None
    group = open_group(where, mode)
    return group, read_manifest(group, where)


def peek_manifest(url: str | Location) -> Manifest | None:
    """The manifest of the cache at ``url``; None when there is nothing (or an empty directory)."""
    found = peek(url)
    return found[1] if found is not None else None


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``require_group`` that tolerates a concurrent creator: workers starting together may
    both see the group missing, and the slower one's create then fails although all is well."""
    try:
        return parent.require_group(name)
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        node = parent[name]
        if not isinstance(node, zarr.Group):
            raise CacheError(f"{name!r} in the store is an array, expected a group") from None
        return node


def ensure_arrays(group: zarr.Group, specs: dict[str, ArraySpec]) -> None:
    """Create the arrays that are missing and check the ones present, never overwriting.

    Workers sharing a store all call this: an array another worker created (and may be
    writing) is left alone, and one with another shape, dtype or chunking is an error. The
    arrays are created concurrently, in one call into zarr's event loop: creating each is a
    metadata write (a request on an object store), and one after the other they were a third of
    a build's fixed cost.
    """
    parents: dict[str, zarr.Group] = {"": group}
    targets = []
    for name, spec in specs.items():
        folder, _, leaf = name.rpartition("/")
        if folder not in parents:
            parent = group
            for d in folder.split("/"):
                parent = require_group(parent, d)
            parents[folder] = parent
        targets.append((name, parents[folder], leaf, spec))

    async def create_all() -> list[BaseException | Any]:
        return await asyncio.gather(*(parent._async_group.create_array(
            leaf, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
            serializer=zarr.codecs.BytesCodec(endian="little"),
            compressors=[zarr.codecs.Crc32cCodec()],  # a checksum, no compression
            fill_value=-1 if spec.dtype.startswith("int") else 0, overwrite=False)
            for _, parent, leaf, spec in targets), return_exceptions=True)

    outcomes = sync(create_all())
    for (name, parent, leaf, spec), outcome in zip(targets, outcomes):
        if not isinstance(outcome, BaseException):
            continue
        if not isinstance(outcome, (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError)):
            raise outcome
        node = parent[leaf]  # another worker made it
        found = ArraySpec(tuple(node.shape), str(node.dtype), tuple(node.chunks)) if isinstance(node, zarr.Array) else None
        if found != spec:
            raise CacheError(f"array {name!r} in the store is {found}, this build needs {spec}")


def consolidate(url: str | Location) -> zarr.Group:
    """Put every array's metadata into the root ``zarr.json``: opening then costs one read.
    Returns the root group, writable and carrying the consolidated metadata (a manifest written
    through it keeps that metadata).

    zarr-python writes consolidated metadata as an extension to Zarr v3 that other readers
    ignore (they read each array's own ``zarr.json``), so it warns; the warning is expected here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        return zarr.consolidate_metadata(guarded_store(Location.of(url), "r+"), zarr_format=3)


def remove_partial_files(url: str | Location) -> int:
    """Delete ``*.partial`` files that zarr's local store leaves when killed mid-write (the
    temporary file it renames into place). Only called once every shard is done, when no
    worker writes chunks any more. Object stores have no such files."""
    where = Location.of(url)
    root = where.local_path
    if root is None:
        return 0
    leftovers = [os.path.join(folder, name) for folder, _, files in os.walk(root, followlinks=False)
                 for name in files if name.endswith(".partial")]  # os.walk: a fifth of fsspec's glob
    for leftover in leftovers:
        os.remove(leftover)
    return len(leftovers)


# -- writes ----------------------------------------------------------------------------------------


def write_rows(group: zarr.Group, start: int, block: dict[str, np.ndarray],
               handles: dict[str, zarr.Array] | None = None) -> None:
    """Write rows ``start:start+n`` of every named array; callers pass whole chunks.

    ``handles`` keeps the opened arrays between calls: looking an array up reads its metadata,
    which on an object store is two requests per array per chunk without it. The arrays' chunks
    are stored concurrently, in one call into zarr's event loop: one round trip to a remote store
    for all of them rather than one per array.
    """
    targets = []
    for name, values in block.items():
        array = handles.get(name) if handles is not None else None
        if array is None:
            # every chunk is stored even when it equals the fill value (all labels unknown, say):
            # readers treat an absent chunk as an error, never as fill values
            array = group[name].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
            if handles is not None:
                handles[name] = array  # type: ignore[assignment]
        targets.append((array, values))

    async def write_all() -> None:
        await asyncio.gather(*(a.async_array.setitem(slice(start, start + len(v)), v) for a, v in targets))

    sync(write_all())


def mark_shard_done(group: zarr.Group, shard: int) -> None:
    group[SHARD_DONE][shard] = 1


def shards_done(group: zarr.Group) -> np.ndarray:
    """A split's flags; a flag never written (its chunk absent) reads as not done."""
    return read_flags(group[SHARD_DONE])  # type: ignore[arg-type]


# -- reading a cache -------------------------------------------------------------------------------


class Split:
    """One set of cached rows: the root (training) rows or the ``eval`` subgroup."""

    def __init__(self, group: zarr.Group, manifest: Manifest, name: str):
        self.group, self.manifest, self.name = group, manifest, name
        self.rows = int(group[SOFT].shape[0])

    def __len__(self) -> int:
        return self.rows

    @property
    def has_inputs(self) -> bool:
        return INPUTS in self.group

    @property
    def has_labels(self) -> bool:
        return LABELS in self.group

    def array(self, name: str) -> zarr.Array:
        return self.group[name]  # type: ignore[return-value]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Rows of one array (contiguous: random rows would decode most chunks).

        The result is allocated at the declared size and filled chunk by chunk, so only the bytes
        that are really stored are ever touched: a missing chunk stops the read with an error, and
        a size this machine cannot even reserve is refused with one line instead of a traceback."""
        array = self.array(name)
        try:
            return np.asarray(array[rows or slice(None)])
        except MemoryError:
            raise CacheError(f"{self.name}: array {name!r} of shape {tuple(array.shape)} does not fit in memory") from None

    def soft_labels(self, rows: slice | None = None, view: int | None = 0) -> np.ndarray:
        """Stored values as float32 ``(n, C)`` for one view, or ``(n, V, C)`` with ``view=None``."""
        values = self.read(SOFT, rows).astype(np.float32, copy=False)
        return values if view is None else values[:, view]

    def labels(self) -> np.ndarray:
        return self.read(LABELS) if self.has_labels else np.full(self.rows, -1, dtype=np.int64)

    def sample_index(self) -> np.ndarray:
        return self.read(INDEX)

    def predictions(self, view: int | None = 0) -> np.ndarray:
        """The teacher's top class for one view, or ``(n, V)`` (every view or position) with ``view=None``."""
        stored = self.read(PREDICTION)
        return stored if view is None else stored[:, view]

    def inputs(self, rows: slice | None = None) -> np.ndarray:
        if not self.has_inputs:
            raise CacheError(f"cache split {self.name!r} has no stored inputs; pass --data")
        return self.read(INPUTS, rows)

    def stats(self) -> Any:
        """Per-sample teacher statistics as a polars DataFrame, one row per (row, view); for token
        rows one per (row, position), with the token there and the next-token ``target``."""
        import polars as pl

        views = int(self.array(SOFT).shape[1])
        stored = {name: self.read(name) for name in (INDEX, *STATS)}  # read first: derived columns follow the data
        sequence = self.manifest.kind == "sequence"
        cols: dict[str, Any] = {
            "row": np.repeat(np.arange(self.rows, dtype=np.int64), views),
            "position" if sequence else "view": np.tile(np.arange(views, dtype=np.int32), self.rows),
            "sample": np.repeat(stored[INDEX], views),
        }
        if sequence:
            tokens, mask = self.read(TOKENS).astype(np.int64), self.read(LOSS_MASK)
            cols["token"] = tokens.reshape(-1)
            cols["target"] = next_targets(tokens, mask).reshape(-1)
        else:
            cols["label"] = np.repeat(self.labels(), views)
        for name in STATS:
            cols[name.split("/")[1]] = stored[name].reshape(-1)
        frame = pl.DataFrame(cols)
        truth = "target" if sequence else "label"
        return frame.with_columns(correct=pl.when(pl.col(truth) >= 0).then(pl.col("prediction") == pl.col(truth)))


def next_targets(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``sequences.next_token_targets`` for numpy rows, kept here so that reading a cache needs no torch."""
    targets = np.full(tokens.shape, -1, dtype=np.int64)
    keep = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    targets[:, :-1] = np.where(keep, tokens[:, 1:], -1)
    return targets


class Cache:
    """A cache opened for reading. Opening reads JSON metadata only; nothing is executed."""

    def __init__(self, url: str | Location, group: zarr.Group, manifest: Manifest):
        self.location = Location.of(url)
        self.url = self.location.url
        """The URL as given (may hold credentials: print :attr:`location` instead)."""
        self.group, self.manifest = group, manifest
        self.train = Split(group, manifest, "train")
        self.eval = Split(group[EVAL], manifest, EVAL) if EVAL in group else None  # type: ignore[arg-type]
        self.build_report: dict[str, Any] | None = None
        """What the build that returned this handle did (``shards.build_report``); None when
        the cache was opened for reading."""

    @property
    def temperature(self) -> float:
        return self.manifest.temperature

    @property
    def num_classes(self) -> int:
        return self.manifest.classes.count

    @property
    def complete(self) -> bool:
        return self.manifest.status.state == "complete"


def open_cache(url: str | Location, *, allow_incomplete: bool = False) -> Cache:
    """Open a cache for reading, refusing one still being built unless ``allow_incomplete``.

    The root group is opened once (one read of ``zarr.json`` on a finalized cache) and every
    array is checked against the manifest (``check.check_cache``) before anything is read."""
    where = Location.of(url)
    group = open_group(where, "r")
    manifest = read_manifest(group, where)
    if manifest.status.state != "complete" and not allow_incomplete:
        splits = [g for g in (group, group.get(EVAL)) if isinstance(g, zarr.Group) and SHARD_DONE in g]
        flags = np.concatenate([shards_done(g) for g in splits]) if splits else np.zeros(0, dtype=bool)
        raise CacheError(
            f"{where}: cache is still being built or was interrupted ({int(flags.sum())}/{len(flags)} shards done); "
            "finish it (softcache build --resume, or softcache finalize once every shard is done), "
            "or pass --allow-incomplete (allow_incomplete=True) to read it anyway"
        )
    check = check_cache(group, manifest)
    if check.errors:
        more = f" (and {len(check.errors) - 1} more problem(s): softcache validate lists them)" if len(check.errors) > 1 else ""
        raise CacheError(f"{where}: {check.errors[0]}{more}")
    if check.unverified:
        warnings.warn(unverified_message(where, check.unverified), UnverifiedCacheWarning, stacklevel=2)
    if manifest.status.state != "complete":
        _allow_unwritten(group, manifest)
    return Cache(where, group, manifest)


def _allow_unwritten(group: zarr.Group, manifest: Manifest) -> None:
    """Let a cache that is still being built (read with ``allow_incomplete``) read the chunks of
    shards not done yet as fill values: ``sample_index`` -1 marks those rows, which inspect skips
    and train refuses. A missing chunk of a shard flagged done stays an error."""
    undone: dict[str, np.ndarray] = {}
    for prefix in ("", f"{EVAL}/"):
        node = group.get(prefix + SHARD_DONE)
        if isinstance(node, zarr.Array):
            undone[prefix] = ~read_flags(node)
    shard_rows = manifest.layout.shard_rows

    def missing_ok(path: str, first_row: int) -> bool:
        flags = undone.get(split_prefix(path))
        shard = first_row // shard_rows
        return is_flag(path) or (flags is not None and shard < len(flags) and bool(flags[shard]))

    store = group.store
    if isinstance(store, GuardedStore):
        store.missing_ok = missing_ok
