"""Reading a store that someone else wrote: bounded, verified, never silently filled.

A cache is an artifact other teams send each other, so every byte read from it is untrusted.
All of softcache's reads go through :class:`GuardedStore`, a Zarr store wrapper that
:func:`open_group` (the one way a cache's root group is opened) puts around the real store. It
holds these rules in one place:

- **Only the format's encoding is decoded.** Every array's metadata is checked when it is read
  (``layout.array_format``): a plain numeric dtype, a regular chunk grid, the default chunk keys,
  and the codecs softcache writes (``bytes``, little endian, then optionally ``crc32c``). A
  compressor, a filter or a string dtype is refused before any chunk is fetched, so a
  decompression bomb is never decoded and nothing decodes to more than the declared size.
- **Reads are bounded.** A chunk is fetched with a byte range of its declared encoded size plus
  one byte; anything longer or shorter is refused. ``zarr.json`` documents are limited to
  :data:`ROOT_METADATA_LIMIT` (the root, which holds the consolidated metadata of every array)
  and :data:`METADATA_LIMIT` (every other node). An array may declare at most
  ``layout.MAX_CHUNKS`` chunks of at most ``layout.MAX_CHUNK_BYTES`` each.
- **Local stores stay inside their directory.** A key that is (or passes through) a symbolic
  link resolving outside the store's root, or that is not a regular file (a device, a FIFO), is
  refused.
- **Every checksum is verified.** A chunk of an array whose codecs end in ``crc32c`` is checked
  here (so the error names the chunk) and again by zarr's codec.
- **Missing chunks are errors** on a store opened for reading: zarr would read them as the fill
  value, which trains silently on zeros. The exceptions are chosen by the opener
  (``missing_ok``): shard flags, whose absence means "not done", and rows of a build still
  running that are known not to be written.

Writers (mode ``r+``) keep zarr's semantics for absent chunks (a partial chunk write reads the
old chunk first), with the same bounds on what is present. They note the sha256 of every chunk
they store, so the build that wrote a chunk never reads it back for the content digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from softcache.cache.layout import CHECKSUM_BYTES, ArrayFormat, array_format, is_flag
from softcache.cache.location import Location, redact_text
from softcache.cache.manifest import MANIFEST_ATTR, Manifest
from softcache.errors import CacheError

T = TypeVar("T")

ROOT_METADATA_LIMIT = 16 << 20
"""Bytes the root ``zarr.json`` may hold: it carries the consolidated metadata of every node."""
METADATA_LIMIT = 1 << 20
"""Bytes any other ``zarr.json`` may hold (an array's is under 1 KiB)."""
HASH_IN_THREAD_BYTES = 1 << 20
"""Chunks this large are hashed in a worker thread while the store writes them (smaller ones
cost less to hash than to hand over)."""
_COORD = re.compile(r"\d+")


MissingOk = Callable[[str, int], bool]
"""``(array path, first row of the chunk) -> True`` when that chunk may be absent."""


@dataclass
class _Known:
    """What the store learned from the metadata it served, shared by its read-only/writable copies."""

    arrays: dict[str, ArrayFormat | str] = field(default_factory=dict)  # format, or why it is refused
    written: dict[str, bytes] = field(default_factory=dict)  # chunk key -> sha256 of the bytes stored there


class GuardedStore(WrapperStore[Store]):
    """The store wrapper of the module doc. ``name`` (the redacted URL) prefixes its error
    messages; ``local_root`` is the store's directory when it is on the local file system;
    ``listable`` is False where keys cannot be listed (HTTP), so only named keys are read."""

    def __init__(self, store: Store, *, name: str = "", local_root: str | None = None, strict: bool = True,
                 missing_ok: MissingOk | None = None, known: _Known | None = None, listable: bool = True):
        super().__init__(store)
        self.name = name
        self.local_root = os.path.realpath(local_root) if local_root is not None else None
        self.strict = strict
        self.missing_ok = missing_ok
        self.listable = listable
        self._known = known if known is not None else _Known()

    def _with_store(self, store: Store) -> GuardedStore:
        return GuardedStore(store, name=self.name, local_root=self.local_root, strict=self.strict,
                            missing_ok=self.missing_ok, known=self._known, listable=self.listable)

    def __repr__(self) -> str:
        return f"GuardedStore({self._store!r})"

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None:  # only sharding reads parts of a value, and the format has none
            raise CacheError(f"{self.name}: partial read of {key!r}: not something the format needs")
        if key == "zarr.json" or key.endswith("/zarr.json"):
            return await self._metadata(key, prototype)
        path, coords = self._chunk_of(key)
        fmt = await self.format_of(path)
        if len(coords) != len(fmt.grid) or any(c >= g for c, g in zip(coords, fmt.grid)):
            raise CacheError(f"{self.name}: {key!r} is not a chunk of array {path!r} (grid {list(fmt.grid)})")
        size = fmt.chunk_bytes
        value = await self._bounded(key, prototype, size)
        if value is None:
            if not self.strict or (self.missing_ok is not None and self.missing_ok(path, coords[0] * fmt.chunks[0])):
                return None
            raise CacheError(f"{self.name}: chunk {key!r} is missing: the cache is incomplete or damaged "
                             "(a missing chunk is never read as fill values)")
        if len(value) != size:
            how = "is larger than" if len(value) > size else f"holds {len(value)} bytes, not"
            raise CacheError(f"{self.name}: chunk {key!r} {how} the {size} bytes its array declares "
                             "(truncated or replaced); refused")
        if fmt.checksummed:
            data = value.as_numpy_array()
            if np.uint32(google_crc32c.value(data[:-CHECKSUM_BYTES])).tobytes() != bytes(data[-CHECKSUM_BYTES:]):
                raise CacheError(f"{self.name}: chunk {key!r} fails its crc32c checksum: the stored bytes were "
                                 "changed or damaged")
        return value

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key: str, value: Buffer) -> None:
        if key == "zarr.json" or key.endswith("/zarr.json"):  # an array (re)created here: know its format
            await self._store.set(key, value)
            self._learn(_node_path(key), json.loads(value.to_bytes()))
            return
        # a chunk: its digest now, beside the producer, instead of reading it back to finalize; a
        # large one is hashed in another thread while it is written (hashlib releases the GIL)
        data = value.as_numpy_array()
        if len(data) < HASH_IN_THREAD_BYTES:
            await self._store.set(key, value)
            digest = hashlib.sha256(data).digest()
        else:
            digest, _ = await asyncio.gather(asyncio.to_thread(lambda: hashlib.sha256(data).digest()),
                                             self._store.set(key, value))
        self._known.written[key] = digest

    async def delete(self, key: str) -> None:
        self._known.written.pop(key, None)
        await self._store.delete(key)

    def written_digests(self) -> dict[str, str]:
        """sha256 of every chunk written through this store (or a copy of it), by key: what
        :func:`content_digest` would compute for those chunks, known without reading them."""
        return {key: digest.hex() for key, digest in self._known.written.items()}

    async def format_of(self, path: str) -> ArrayFormat:
        """The checked format of the array at ``path``: from the metadata this store served
        (what zarr decodes with), else read now; a refused one raises its reason."""
        if path not in self._known.arrays:
            await self.get(f"{path}/zarr.json", default_buffer_prototype())
        known = self._known.arrays.get(path)
        if known is None:
            raise CacheError(f"{self.name}: array {path!r} has no metadata (zarr.json)")
        if isinstance(known, str):
            raise CacheError(f"{self.name}: array {path!r}: {known}; refused before reading it")
        return known

    async def _metadata(self, key: str, prototype: BufferPrototype) -> Buffer | None:
        limit = ROOT_METADATA_LIMIT if key == "zarr.json" else METADATA_LIMIT
        value = await self._bounded(key, prototype, limit)
        if value is None:
            return None
        if len(value) > limit:
            raise CacheError(f"{self.name}: {key} is larger than {limit >> 20} MiB, the limit for Zarr metadata; refused")
        try:
            doc = json.loads(value.to_bytes())
        except (ValueError, RecursionError):
            raise CacheError(f"{self.name}: {key} is not valid JSON") from None
        self._learn(_node_path(key), doc)
        return value

    def _learn(self, path: str, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        if doc.get("node_type") == "array":
            self._known.arrays[path] = _format_or_reason(doc)
        consolidated = doc.get("consolidated_metadata")
        if doc.get("node_type") == "group" and isinstance(consolidated, dict):
            for child, meta in (consolidated.get("metadata") or {}).items():
                if isinstance(meta, dict) and meta.get("node_type") == "array":
                    self._known.arrays["/".join(p for p in (path, child) if p)] = _format_or_reason(meta)

    def _chunk_of(self, key: str) -> tuple[str, tuple[int, ...]]:
        path, sep, tail = key.rpartition("/c/")
        coords = tail.split("/")
        if not sep or not all(_COORD.fullmatch(c) for c in coords):
            raise CacheError(f"{self.name}: {key!r} is neither metadata nor a chunk key of the format; refused")
        return path, tuple(int(c) for c in coords)

    async def _bounded(self, key: str, prototype: BufferPrototype, limit: int) -> Buffer | None:
        """At most ``limit + 1`` bytes of ``key`` (one more than allowed shows it is too long)."""
        self._check_local(key)
        return await self._store.get(key, prototype, RangeByteRequest(0, limit + 1))

    def _check_local(self, key: str) -> None:
        if self.local_root is None:
            return
        path = os.path.join(self.local_root, key)
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return  # absent: the store says so
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.local_root]) != self.local_root:
            raise CacheError(f"{self.name}: {key!r} is a link to {real}, outside the store; refused")
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise CacheError(f"{self.name}: {key!r} is not a regular file; refused")


def _node_path(metadata_key: str) -> str:
    """``stats/max_prob/zarr.json`` -> ``stats/max_prob``; the root's ``zarr.json`` -> ``""``."""
    return metadata_key.removesuffix("zarr.json").rstrip("/")


def _format_or_reason(meta: Mapping[str, Any]) -> ArrayFormat | str:
    try:
        return array_format(meta)
    except ValueError as exc:
        return str(exc)


# -- whole-store operations (validate, finalize) ------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on zarr's I/O loop (remote file systems are bound to it)."""
    return sync(coro)


def present_chunks(store: GuardedStore, path: str, fmt: ArrayFormat,
                   strays: list[str] | None = None) -> np.ndarray:
    """Which chunks of the grid are stored, from one listing (bool array of the grid's shape);
    keys under the array's chunk prefix that are not chunks of its grid go to ``strays``.

    Listing costs one request per thousand keys on an object store, so this is how ``validate``
    finds missing chunks, or a shape no store could hold, without reading or walking the grid."""
    found = np.zeros(fmt.grid, dtype=bool)
    prefix = f"{path}/c/"

    def mark(key: str) -> None:
        coords = key[len(prefix):].split("/") if key.startswith(prefix) else []
        if len(coords) == len(fmt.grid) and all(_COORD.fullmatch(c) for c in coords):
            index = tuple(int(c) for c in coords)
            if all(i < g for i, g in zip(index, fmt.grid)):
                found[index] = True
                return
        if strays is not None and not key.endswith(".partial"):  # a killed local write's leftover
            strays.append(key)

    async def scan() -> None:
        async for key in store.list_prefix(prefix):
            mark(key)

    if store.local_root is not None:  # every entry but directories, links included (reading refuses them)
        top = os.path.join(store.local_root, prefix)
        for folder, _, files in os.walk(top, followlinks=False):
            rel = os.path.relpath(folder, store.local_root).replace(os.sep, "/")
            for name in files:
                mark(f"{rel}/{name}")
    else:
        run(scan())
    return found


def content_digest(store: GuardedStore, arrays: Mapping[str, ArrayFormat], concurrency: int = 16,
                   written: Mapping[str, str] | None = None) -> tuple[str, int]:
    """``(sha256 hex, chunks)`` over every chunk of ``arrays`` as stored (checksums included).

    The digest is sha256 over the text lines ``"<chunk key> <sha256 of its bytes>\\n"``, arrays
    by path and chunks in row-major order of their coordinates, so anyone can recompute it from
    a listing and ``sha256sum``. Every chunk is read through the guarded store (bounded, crc
    checked, a missing one is an error), ``concurrency`` at a time, except those in ``written``:
    the digests of chunks this process stored itself (:meth:`GuardedStore.written_digests`)."""
    keys = [key for path in sorted(arrays) for key in arrays[path].keys(path)]
    known = written or {}
    hashes: list[str] = [known.get(key, "") for key in keys]
    todo = [i for i, h in enumerate(hashes) if not h]
    prototype = default_buffer_prototype()
    strict = replace_strict(store)

    async def one(i: int) -> None:
        value = await strict.get(keys[i], prototype)
        assert value is not None  # a strict store raises for a missing chunk
        hashes[i] = hashlib.sha256(value.as_numpy_array()).hexdigest()

    async def batch(first: int) -> None:
        await asyncio.gather(*(one(i) for i in todo[first : first + concurrency]))

    for first in range(0, len(todo), concurrency):
        run(batch(first))
    lines = "".join(f"{key} {digest}\n" for key, digest in zip(keys, hashes))
    return hashlib.sha256(lines.encode()).hexdigest(), len(keys)


def replace_strict(store: GuardedStore) -> GuardedStore:
    """The same store refusing every missing chunk (what a digest or a check must read)."""
    return GuardedStore(store._store, name=store.name, local_root=store.local_root, strict=True, known=store._known,
                        listable=store.listable)


# -- opening a cache: the guarded root group of a Location ---------------------------------------


def guarded_store(where: Location, mode: str = "r") -> GuardedStore:
    """The store at ``where`` (a local directory, or fsspec with the location's timeout) inside
    the guard. Opened for reading (``mode="r"``) it refuses missing chunks, except shard flags."""
    read_only = mode == "r"
    inner: Store
    if where.remote:
        inner = zarr.storage.FsspecStore.from_url(where.url, storage_options=where.storage_options, read_only=read_only)
    else:
        inner = zarr.storage.LocalStore(where.zarr_url, read_only=read_only)
    return GuardedStore(inner, name=str(where), local_root=None if where.remote else where.path, strict=read_only,
                        missing_ok=lambda path, first_row: is_flag(path), listable=where.listable)


def open_group(where: str | Location, mode: str = "r", *, consolidated: bool | None = None) -> zarr.Group:
    """Open the root group; a missing path or a non-Zarr directory is a clear CacheError.

    Only ``zarr.json`` is read (no probing for Zarr v2 files), and whether the path exists is
    asked only after a failure, so opening a remote cache is one or two requests. The arrays'
    metadata comes from the consolidated copy when there is one, unless ``consolidated=False``
    (checkers read each array's own ``zarr.json``). Every read goes through :func:`guarded_store`.
    An operation opens the group once and passes it on."""
    where = Location.of(where)
    try:
        with where.errors():
            return zarr.open_group(guarded_store(where, mode), mode=mode, zarr_format=3,  # type: ignore[arg-type]
                                   use_consolidated=consolidated)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if where.listable:
            with where.errors():
                if not where.fs.exists(where.path):
                    raise CacheError(f"{where}: no such cache (path does not exist)") from None
        raise CacheError(f"{where}: not a Zarr v3 group (no zarr.json): not a softcache cache") from None
    except (ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise CacheError(f"{where}: not a readable Zarr v3 group ({redact_text(str(exc))})") from None


def unconsolidated(group: zarr.Group) -> zarr.Group:
    """The same root group reading every node's own ``zarr.json`` instead of the consolidated
    copy, without reading the root again (what checkers compare the copy with)."""
    inner = group._async_group
    return zarr.Group(replace(inner, metadata=replace(inner.metadata, consolidated_metadata=None)))


def read_manifest(group: zarr.Group, where: str | Location) -> Manifest:
    """The manifest in the root group's attributes (a group without one is not a cache)."""
    if MANIFEST_ATTR not in group.attrs:
        raise CacheError(f"{Location.of(where)}: Zarr group has no '{MANIFEST_ATTR}' attribute: not a softcache cache")
    return Manifest.from_json(group.attrs[MANIFEST_ATTR])
