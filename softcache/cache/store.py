"""Where the cache is written and read: the Zarr v3 layout, nothing about models.

Layout of a cache (format version 1)::

    cache.zarr/                       root group, attribute "softcache" = manifest
      soft_labels   (N, V, C)         teacher logits / T, float16 or float32, chunks (R, V, C)
      sample_index  (N,)    int64     row -> sample in the source dataset
      labels        (N,)    int64     true label, -1 when unknown
      inputs        (N, *shape) f32   stored inputs (data-free caches, or on request)
      view_params   (N, V, P)   f32   per-view augmentation parameters (replayable views)
      stats/{max_prob,entropy,margin} (N, V) f32, stats/prediction (N, V) int32
      shard_done    (S,)    uint8     one chunk per shard, so shards never share a chunk
      eval/                           optional held-out split: same arrays, one clean view, no
                                      view_params; its own shard_done (E,) for its shards

Shards (``layout.shard_rows`` rows, whole chunks) are the units of a build; a shard's flag is set
only after all its chunks are stored (see ``distributed.py`` for the multi-worker protocol). A
complete cache has its metadata consolidated into the root ``zarr.json``, so opening it is one
read whatever the number of arrays, which matters on object stores and HTTP.

Every array shares the row chunking R, and the build writes whole chunks only (zarr rewrites a
chunk on a partial write). No compression: float logits barely compress and decoding costs
more than the bytes saved. Every chunk ends with a crc32c checksum (Zarr v3's ``crc32c`` codec),
verified on every read, and ``finalize`` records a digest of all chunks in the manifest.

Every read goes through ``guard.GuardedStore`` (see there: bounded reads, the encodings a reader
accepts, missing chunks are errors), and before any array is read :func:`check_cache` compares
each array's metadata with what the manifest implies: the one checker that ``open_cache``,
``validate`` and ``finalize`` share.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr

from softcache.cache import lock as buildlock

from softcache.cache import guard
from softcache.errors import CacheError, UsageError
from softcache.cache.location import Location, redact_text
from softcache.cache.manifest import MANIFEST_ATTR, Manifest

SOFT = "soft_labels"
INDEX = "sample_index"
LABELS = "labels"
INPUTS = "inputs"
VIEW_PARAMS = "view_params"
STATS = ("stats/max_prob", "stats/entropy", "stats/margin", "stats/prediction")
SHARD_DONE = "shard_done"
EVAL = "eval"


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]


def split_arrays(manifest: Manifest, rows: int, *, store_inputs: bool, with_labels: bool = True,
                 eval_split: bool = False) -> dict[str, ArraySpec]:
    """The arrays of one split (root or eval), all chunked by ``layout.chunk_rows`` rows.

    The eval split always holds one view, the clean input: it measures agreement on held-out
    data as the student will see it, whatever views the training rows were labelled through."""
    lay, views = manifest.layout, (1 if eval_split else manifest.views.count)
    r = max(1, min(lay.chunk_rows, rows)) if rows else lay.chunk_rows
    width = manifest.classes.count if manifest.storage.mode == "full" else int(manifest.storage.k or 0)
    specs = {
        SOFT: ArraySpec((rows, views, width), manifest.storage.dtype, (r, views, width)),
        INDEX: ArraySpec((rows,), "int64", (r,)),
    }
    if with_labels:
        specs[LABELS] = ArraySpec((rows,), "int64", (r,))
    for name in STATS:
        specs[name] = ArraySpec((rows, views), "int32" if name.endswith("prediction") else "float32", (r, views))
    if store_inputs:
        shape = tuple(lay.input_shape)
        specs[INPUTS] = ArraySpec((rows, *shape), "float32", (r, *shape))
    if manifest.views.param_names and not eval_split:
        p = len(manifest.views.param_names)
        specs[VIEW_PARAMS] = ArraySpec((rows, views, p), "float32", (r, views, p))
    return specs


def flag_spec(manifest: Manifest, rows: int) -> ArraySpec:
    """A split's ``shard_done``: one uint8 per shard of ``layout.shard_rows`` rows, each its own
    chunk, so workers never write the same chunk."""
    return ArraySpec((-(-rows // manifest.layout.shard_rows),), "uint8", (1,))


def _fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    where = Location.of(url)  # its storage options carry the request timeout
    return where.fs, where.path


def is_readonly(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def guarded_store(url: str, mode: str = "r") -> guard.GuardedStore:
    """The store at ``url`` as zarr would open it (a local directory, or fsspec for URLs), inside
    the guard every read goes through. Read-only stores (``mode="r"``) refuse missing chunks."""
    read_only = mode == "r"
    inner: zarr.abc.store.Store
    where = Location.of(url)  # file:// opens as the directory it names; remote stores get the timeout
    if where.remote:
        inner = zarr.storage.FsspecStore.from_url(where.url, storage_options=where.storage_options, read_only=read_only)
    else:
        inner = zarr.storage.LocalStore(where.zarr_url, read_only=read_only)
    fs, path = _fs_path(url)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return guard.GuardedStore(inner, name=str(where), local_root=path if local else None, strict=read_only,
                              missing_ok=_absent_flag)


def _absent_flag(path: str, first_row: int) -> bool:
    """A shard flag that was never written means "not done": the one chunk that may be absent."""
    return path.rsplit("/", 1)[-1] == SHARD_DONE


def open_group(url: str, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
    """Open the root group; a missing path or a non-Zarr directory is a clear CacheError.

    Only ``zarr.json`` is read (no probing for Zarr v2 files), and whether the path exists is
    asked only after a failure, so opening a remote cache is one or two requests. The arrays'
    metadata comes from the consolidated copy when there is one, unless ``consolidated=False``
    (checkers read each array's own ``zarr.json``). Every read goes through :func:`guarded_store`.
    """
    where = Location.of(url)  # messages name it without credentials; a timeout is one line
    try:
        with where.errors():
            return zarr.open_group(guarded_store(url, mode), mode=mode, zarr_format=3,  # type: ignore[arg-type]
                                   use_consolidated=consolidated)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if not is_readonly(url):
            fs, path = _fs_path(url)
            with where.errors():
                if not fs.exists(path):
                    raise CacheError(f"{where}: no such cache (path does not exist)") from None
        raise CacheError(f"{where}: not a Zarr v3 group (no zarr.json): not a softcache cache") from None
    except (ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise CacheError(f"{where}: not a readable Zarr v3 group ({redact_text(str(exc))})") from None


def read_manifest(group: zarr.Group, url: str) -> Manifest:
    if MANIFEST_ATTR not in group.attrs:
        raise CacheError(f"{url}: Zarr group has no '{MANIFEST_ATTR}' attribute: not a softcache cache")
    return Manifest.from_json(group.attrs[MANIFEST_ATTR])


def write_manifest(group: zarr.Group, manifest: Manifest) -> None:
    group.attrs[MANIFEST_ATTR] = manifest.to_json()


def prepare_target(url: str, *, overwrite: bool) -> None:
    """Refuse to write over anything unless asked; with ``overwrite`` remove the old cache.

    Only a softcache cache (a Zarr group whose ``zarr.json`` carries the manifest) is ever
    removed: a non-empty directory that is anything else is refused even with ``overwrite``."""
    if is_readonly(url):
        raise UsageError(f"{url}: http(s) URLs are read-only; write caches to a path, file:// or s3://")
    fs, path = _fs_path(url)
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise UsageError(f"{url}: exists and is a file, not a cache directory")
    if not fs.ls(path):
        return
    is_cache = _holds_manifest(fs, path)
    if not is_cache:  # --overwrite replaces a cache, never deletes an arbitrary directory
        raise UsageError(f"{url}: a non-empty directory that is not a cache already exists there; "
                         "write the cache elsewhere or remove it yourself")
    if not overwrite:
        raise UsageError(f"{url}: a cache already exists there; pass --overwrite to replace it")
    # never delete a cache another process is building; registered first, so none starts meanwhile
    buildlock.register(url, role="overwrite", exclusive=True, finished_since=lambda since: finished_since(url, since))
    fs.rm(path, recursive=True)


def finished_since(url: str, since: str) -> bool:
    """True when the cache at ``url`` was completed at or after ``since`` (ISO time): the build
    registered then is over. An older complete cache (about to be replaced) does not count."""
    found = peek_manifest(url)
    return found is not None and found.status.state == "complete" and (found.status.finished_at or "") >= since


def _holds_manifest(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True when ``path`` is a Zarr group whose root attributes hold a softcache manifest."""
    import json

    meta = f"{path.rstrip('/')}/zarr.json"
    if not fs.exists(meta):
        return False
    try:
        return MANIFEST_ATTR in (json.loads(fs.cat_file(meta)).get("attributes") or {})
    except (ValueError, AttributeError):
        return False


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
    writing) is left alone, and one with another shape, dtype or chunking is an error.
    """
    for name, spec in specs.items():
        *dirs, leaf = name.split("/")
        parent = group
        for d in dirs:
            parent = require_group(parent, d)
        try:
            parent.create_array(leaf, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                                serializer=zarr.codecs.BytesCodec(endian="little"),
                                compressors=[zarr.codecs.Crc32cCodec()],  # a checksum, no compression
                                fill_value=-1 if spec.dtype.startswith("int") else 0, overwrite=False)
            continue
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):  # another worker made it
            pass
        node = parent[leaf]
        found = ArraySpec(tuple(node.shape), str(node.dtype), tuple(node.chunks)) if isinstance(node, zarr.Array) else None
        if found != spec:
            raise CacheError(f"array {name!r} in the store is {found}, this build needs {spec}")


def peek_manifest(url: str) -> Manifest | None:
    """The manifest of the cache at ``url``; None when there is nothing (or an empty directory)."""
    fs, path = _fs_path(url)
    if not fs.exists(f"{path.rstrip('/')}/zarr.json"):
        return None
    group = open_group(url, "r")
    return read_manifest(group, url)


def consolidate(url: str) -> None:
    """Put every array's metadata into the root ``zarr.json``: opening then costs one read.

    zarr-python writes consolidated metadata as an extension to Zarr v3 that other readers
    ignore (they read each array's own ``zarr.json``), so it warns; the warning is expected here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(guarded_store(url, "r+"), zarr_format=3)


def stale_consolidated(url: str) -> list[str]:
    """Nodes whose consolidated metadata differs from their own ``zarr.json`` (the store was
    edited after it was finalized). Readers trust the consolidated copy, so this is an error;
    ``softcache finalize URL`` rewrites it. HTTP stores cannot be listed and are not checked."""
    if is_readonly(url):
        return []
    recorded_root = open_group(url, "r").metadata.consolidated_metadata
    if recorded_root is None:
        return []
    recorded = recorded_root.flattened_metadata
    problems = []
    try:
        for path, node in open_group(url, "r", consolidated=False).members(max_depth=None):
            if path not in recorded:
                problems.append(f"{path!r} is missing from the consolidated metadata")
            elif isinstance(node, zarr.Array) and node.metadata.to_dict() != recorded[path].to_dict():
                problems.append(f"the consolidated metadata of {path!r} differs from its zarr.json")
    except CacheError as exc:
        problems.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - metadata zarr cannot parse, from a store we do not trust
        problems.append(f"the store holds metadata that cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
    return problems


def remove_partial_files(url: str) -> int:
    """Delete ``*.partial`` files that zarr's local store leaves when killed mid-write (the
    temporary file it renames into place). Only called once every shard is done, when no
    worker writes chunks any more. Object stores have no such files."""
    fs, path = _fs_path(url)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return 0
    leftovers = fs.glob(f"{path.rstrip('/')}/**/*.partial")
    for leftover in leftovers:
        fs.rm_file(leftover)
    return len(leftovers)


def write_rows(group: zarr.Group, start: int, block: dict[str, np.ndarray],
               handles: dict[str, zarr.Array] | None = None) -> None:
    """Write rows ``start:start+n`` of every named array; callers pass whole chunks.

    ``handles`` keeps the opened arrays between calls: looking an array up reads its metadata,
    which on an object store is two requests per array per chunk without it.
    """
    for name, values in block.items():
        array = handles.get(name) if handles is not None else None
        if array is None:
            # every chunk is stored even when it equals the fill value (all labels unknown, say):
            # readers treat an absent chunk as an error, never as fill values
            array = group[name].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
            if handles is not None:
                handles[name] = array  # type: ignore[assignment]
        array[start : start + len(values)] = values


def mark_shard_done(group: zarr.Group, shard: int) -> None:
    group[SHARD_DONE][shard] = 1


def shards_done(group: zarr.Group) -> np.ndarray:
    """A split's flags; a flag never written (its chunk absent) reads as not done."""
    return read_flags(group[SHARD_DONE])  # type: ignore[arg-type]


def read_flags(node: zarr.Array) -> np.ndarray:
    """Shard flags as booleans. Where the store can be listed, only the flags that are stored
    are read (one listing, then those chunks): a store declaring millions of shards it does not
    hold costs one request, not millions."""
    store = node.store
    if not isinstance(store, guard.GuardedStore) or is_readonly(store.name):
        return np.asarray(node[:], dtype=bool)
    try:
        fmt = guard.array_format(node.metadata.to_dict())
    except ValueError as exc:
        raise CacheError(f"{store.name}: array {node.path!r}: {exc}") from None
    present = np.flatnonzero(guard.present_chunks(store, node.path, fmt))
    done = np.zeros(fmt.shape[0], dtype=bool)
    if len(present):
        done[present] = np.asarray(node.get_coordinate_selection(present), dtype=bool)
    return done


# -- the one checker: array metadata against the manifest and the format ---------------------------


class UnverifiedCacheWarning(UserWarning):
    """The cache was written without chunk checksums (softcache 0.1): it opens and trains, but
    changed or damaged bytes cannot be detected."""


def unverified_message(url: str, paths: list[str]) -> str:
    return (f"{url}: {len(paths)} array(s) carry no chunk checksums (written by softcache 0.1?), e.g. {paths[0]!r}: "
            "changed or damaged bytes cannot be detected; rebuild the cache to make it verifiable")


@dataclass
class CacheCheck:
    """What :func:`check_cache` found: one line per problem, the arrays fit to read (path from
    the root -> the array and its checked format) and the paths whose chunks carry no checksum."""

    errors: list[str] = field(default_factory=list)
    arrays: dict[str, tuple[zarr.Array, guard.ArrayFormat]] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)

    def formats(self) -> dict[str, guard.ArrayFormat]:
        return {path: fmt for path, (_, fmt) in self.arrays.items()}


def _member(group: zarr.Group, path: str) -> tuple[Any, str | None]:
    """``(node, None)``, ``(None, None)`` when absent, or ``(None, why)`` when its metadata is refused."""
    try:
        return group[path], None
    except KeyError:
        return None, None
    except CacheError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - metadata zarr cannot parse, from a store we do not trust
        return None, f"unreadable metadata ({type(exc).__name__}: {str(exc)[:200]})"


def _expected(group: zarr.Group, manifest: Manifest, check: CacheCheck) -> tuple[dict[str, ArraySpec], dict[str, str]]:
    """Every array the manifest implies, by path from the root, and each split's flags path by label."""
    expected: dict[str, ArraySpec] = {}
    flags: dict[str, str] = {}
    splits = [("", manifest.layout.rows)] + ([(f"{EVAL}/", manifest.eval.rows)] if manifest.eval is not None else [])
    for prefix, rows in splits:
        if prefix:
            node, problem = _member(group, EVAL)
            if not isinstance(node, zarr.Group):
                check.errors.append(problem or f"the manifest records an eval split but group {EVAL!r} is missing")
                continue

        def has(name: str) -> bool:
            return _member(group, prefix + name) != (None, None)

        specs = split_arrays(manifest, rows, store_inputs=has(INPUTS), with_labels=has(LABELS), eval_split=bool(prefix))
        if not prefix or has(SHARD_DONE):  # caches may or may not carry flags for their eval split
            specs[SHARD_DONE] = flag_spec(manifest, rows)
            flags[prefix or "train "] = prefix + SHARD_DONE
        expected.update({prefix + name: spec for name, spec in specs.items()})
    return expected, flags


def _array_problems(path: str, meta: dict[str, Any], spec: ArraySpec, checksums_recorded: bool
                    ) -> tuple[list[str], guard.ArrayFormat | None]:
    """Why an array cannot be read (its encoding first: that is what protects the reader) and
    how it differs from what the manifest implies; the format when there is nothing to say."""
    problems = []
    try:
        fmt: guard.ArrayFormat | None = guard.array_format(meta)
    except ValueError as exc:
        fmt = None
        problems.append(f"array {path!r}: {exc}")
    shape, dtype = tuple(meta.get("shape") or ()), meta.get("data_type")
    if shape != spec.shape:
        problems.append(f"array {path!r} has shape {shape}, the manifest implies {spec.shape}")
    if dtype != spec.dtype and dtype in guard.FORMAT_DTYPES:  # any other dtype was refused above
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
    format's encoding (``guard.array_format``); no other array may be present. With
    ``listing`` (stores that can be listed), every chunk of the grid must be stored: that finds
    missing chunks, or a declared size no store holds, in one request per thousand chunks.
    Arrays of a split whose shards are not all done are not counted (their rows are unwritten)."""
    check = CacheCheck()
    expected, flag_paths = _expected(group, manifest, check)
    recorded = manifest.integrity is not None and manifest.integrity.chunk_checksum == "crc32c"
    for path, spec in expected.items():
        node, problem = _member(group, path)
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
    listing = listing and isinstance(store, guard.GuardedStore) and not is_readonly(store.name)  # http cannot list
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
                first = [guard.chunk_key(path, coords) for coords in zip(*grid)]
                check.errors.append(f"array {path!r}: {int((~present).sum())} of {fmt.nchunks} chunks are missing "
                                    f"(first: {', '.join(first)})")
                del check.arrays[path]
    return check


def split_prefix(path: str) -> str:
    """``"eval/"`` for an array of the eval split, ``""`` for one of the training rows."""
    return f"{EVAL}/" if path.startswith(f"{EVAL}/") else ""


def content_digest(group: zarr.Group, check: CacheCheck) -> tuple[str, int]:
    """``(sha256 hex, chunks)`` over every chunk of the checked arrays (see ``guard.content_digest``)."""
    store = group.store
    if not isinstance(store, guard.GuardedStore):
        raise TypeError("content_digest needs a group opened with store.open_group")
    return guard.content_digest(store, check.formats())


def _array_paths(group: zarr.Group) -> tuple[list[str], str | None]:
    try:
        return [p for p, node in group.members(max_depth=None) if isinstance(node, zarr.Array)], None
    except CacheError as exc:
        return [], str(exc)
    except Exception as exc:  # noqa: BLE001 - metadata zarr cannot parse, from a store we do not trust
        return [], f"the store holds metadata that cannot be read ({type(exc).__name__}: {str(exc)[:200]})"


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

    def predictions(self, view: int = 0) -> np.ndarray:
        return self.read("stats/prediction")[:, view]

    def inputs(self, rows: slice | None = None) -> np.ndarray:
        if not self.has_inputs:
            raise CacheError(f"cache split {self.name!r} has no stored inputs; pass --data")
        return self.read(INPUTS, rows)

    def stats(self) -> Any:
        """Per-sample teacher statistics as a polars DataFrame, one row per (row, view)."""
        import polars as pl

        views = int(self.array(SOFT).shape[1])
        stored = {name: self.read(name) for name in (INDEX, *STATS)}  # read first: derived columns follow the data
        cols: dict[str, Any] = {
            "row": np.repeat(np.arange(self.rows, dtype=np.int64), views),
            "view": np.tile(np.arange(views, dtype=np.int32), self.rows),
            "sample": np.repeat(stored[INDEX], views),
            "label": np.repeat(self.labels(), views),
        }
        for name in STATS:
            cols[name.split("/")[1]] = stored[name].reshape(-1)
        frame = pl.DataFrame(cols)
        return frame.with_columns(correct=pl.when(pl.col("label") >= 0).then(pl.col("prediction") == pl.col("label")))


class Cache:
    """A cache opened for reading. Opening reads JSON metadata only; nothing is executed."""

    def __init__(self, url: str, group: zarr.Group, manifest: Manifest):
        self.url, self.group, self.manifest = url, group, manifest
        self.train = Split(group, manifest, "train")
        self.eval = Split(group[EVAL], manifest, EVAL) if EVAL in group else None  # type: ignore[arg-type]
        self.build_report: dict[str, Any] | None = None
        """What the build that returned this handle did (``distributed.build_report``); None when
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


def open_cache(url: str, *, allow_incomplete: bool = False) -> Cache:
    """Open a cache for reading, refusing one still being built unless ``allow_incomplete``."""
    url = str(url)
    group = open_group(url, "r")
    manifest = read_manifest(group, url)
    if manifest.status.state != "complete" and not allow_incomplete:
        splits = [g for g in (group, group.get(EVAL)) if isinstance(g, zarr.Group) and SHARD_DONE in g]
        flags = np.concatenate([shards_done(g) for g in splits]) if splits else np.zeros(0, dtype=bool)
        raise CacheError(
            f"{url}: cache is still being built or was interrupted ({int(flags.sum())}/{len(flags)} shards done); "
            "finish it (softcache build --resume, or softcache finalize once every shard is done), "
            "or pass --allow-incomplete (allow_incomplete=True) to read it anyway"
        )
    check = check_cache(group, manifest)
    if check.errors:
        more = f" (and {len(check.errors) - 1} more problem(s): softcache validate lists them)" if len(check.errors) > 1 else ""
        raise CacheError(f"{url}: {check.errors[0]}{more}")
    if check.unverified:
        warnings.warn(unverified_message(url, check.unverified), UnverifiedCacheWarning, stacklevel=2)
    if manifest.status.state != "complete":
        _allow_unwritten(group, manifest)
    return Cache(url, group, manifest)


def _allow_unwritten(group: zarr.Group, manifest: Manifest) -> None:
    """Let a cache that is still being built (read with ``allow_incomplete``) read the chunks of
    shards not done yet as fill values: ``sample_index`` -1 marks those rows, which inspect skips
    and train refuses. A missing chunk of a shard flagged done stays an error."""
    undone: dict[str, np.ndarray] = {}
    for prefix in ("", f"{EVAL}/"):
        node, _ = _member(group, prefix + SHARD_DONE)
        if isinstance(node, zarr.Array):
            undone[prefix] = ~read_flags(node)
    shard_rows = manifest.layout.shard_rows

    def missing_ok(path: str, first_row: int) -> bool:
        flags = undone.get(split_prefix(path))
        shard = first_row // shard_rows
        return _absent_flag(path, first_row) or (flags is not None and shard < len(flags) and bool(flags[shard]))

    store = group.store
    if isinstance(store, guard.GuardedStore):
        store.missing_ok = missing_ok
