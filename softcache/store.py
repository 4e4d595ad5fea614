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
more than the bytes saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

from .errors import CacheError, UsageError
from .manifest import MANIFEST_ATTR, Manifest

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


def _fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_readonly(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def open_group(url: str, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
    """Open the root group; a missing path or a non-Zarr directory is a clear CacheError.

    Only ``zarr.json`` is read (no probing for Zarr v2 files), and whether the path exists is
    asked only after a failure, so opening a remote cache is one or two requests. The arrays'
    metadata comes from the consolidated copy when there is one, unless ``consolidated=False``
    (checkers read each array's own ``zarr.json``).
    """
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=consolidated)  # type: ignore[arg-type]
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if not is_readonly(url):
            fs, path = _fs_path(url)
            if not fs.exists(path):
                raise CacheError(f"{url}: no such cache (path does not exist)") from None
        raise CacheError(f"{url}: not a Zarr v3 group (no zarr.json): not a softcache cache") from None
    except (ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise CacheError(f"{url}: not a readable Zarr v3 group ({exc})") from None


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
    fs.rm(path, recursive=True)


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
            parent.create_array(leaf, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, compressors=None,
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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(url, zarr_format=3)  # type: ignore[arg-type]


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
    for path, node in open_group(url, "r", consolidated=False).members(max_depth=None):
        if path not in recorded:
            problems.append(f"{path!r} is missing from the consolidated metadata")
        elif isinstance(node, zarr.Array) and node.metadata.to_dict() != recorded[path].to_dict():
            problems.append(f"the consolidated metadata of {path!r} differs from its zarr.json")
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
            array = group[name]
            if handles is not None:
                handles[name] = array  # type: ignore[assignment]
        array[start : start + len(values)] = values


def mark_shard_done(group: zarr.Group, shard: int) -> None:
    group[SHARD_DONE][shard] = 1


def shards_done(group: zarr.Group) -> np.ndarray:
    return np.asarray(group[SHARD_DONE][:], dtype=bool)


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

    def soft_labels(self, rows: slice | None = None, view: int | None = 0) -> np.ndarray:
        """Stored values as float32 ``(n, C)`` for one view, or ``(n, V, C)`` with ``view=None``."""
        # contiguous rows only: random rows would decode most chunks
        values = np.asarray(self.array(SOFT)[rows or slice(None)], dtype=np.float32)
        return values if view is None else values[:, view]

    def labels(self) -> np.ndarray:
        return np.asarray(self.array(LABELS)[:]) if self.has_labels else np.full(self.rows, -1, dtype=np.int64)

    def sample_index(self) -> np.ndarray:
        return np.asarray(self.array(INDEX)[:])

    def predictions(self, view: int = 0) -> np.ndarray:
        return np.asarray(self.array("stats/prediction")[:, view])

    def inputs(self, rows: slice | None = None) -> np.ndarray:
        if not self.has_inputs:
            raise CacheError(f"cache split {self.name!r} has no stored inputs; pass --data")
        return np.asarray(self.array(INPUTS)[rows or slice(None)])

    def stats(self) -> Any:
        """Per-sample teacher statistics as a polars DataFrame, one row per (row, view)."""
        import polars as pl

        views = int(self.array(SOFT).shape[1])
        cols: dict[str, Any] = {
            "row": np.repeat(np.arange(self.rows, dtype=np.int64), views),
            "view": np.tile(np.arange(views, dtype=np.int32), self.rows),
            "sample": np.repeat(self.sample_index(), views),
            "label": np.repeat(self.labels(), views),
        }
        for name in STATS:
            cols[name.split("/")[1]] = np.asarray(self.array(name)[:]).reshape(-1)
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
    if SOFT not in group:
        raise CacheError(f"{url}: manifest present but array '{SOFT}' is missing")
    return Cache(url, group, manifest)
