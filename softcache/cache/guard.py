"""Reading a store that someone else wrote: bounded, verified, never silently filled.

A cache is an artifact other teams send each other, so every byte read from it is untrusted.
All of softcache's reads go through :class:`GuardedStore`, a Zarr store wrapper that
``store.open_group`` puts around the real store. It holds these rules in one place:

- **Only the format's encoding is decoded.** Every array's metadata is checked when it is read
  (:func:`array_format`): a plain numeric dtype, a regular chunk grid, the default chunk keys,
  and the codecs softcache writes (``bytes``, little endian, then optionally ``crc32c``). A
  compressor, a filter or a string dtype is refused before any chunk is fetched, so a
  decompression bomb is never decoded and nothing decodes to more than the declared size.
- **Reads are bounded.** A chunk is fetched with a byte range of its declared encoded size plus
  one byte; anything longer or shorter is refused. ``zarr.json`` documents are limited to
  :data:`ROOT_METADATA_LIMIT` (the root, which holds the consolidated metadata of every array)
  and :data:`METADATA_LIMIT` (every other node). An array may declare at most
  :data:`MAX_CHUNKS` chunks of at most :data:`MAX_CHUNK_BYTES` each.
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
old chunk first), with the same bounds on what is present.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import google_crc32c
import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from softcache.errors import CacheError

T = TypeVar("T")

ROOT_METADATA_LIMIT = 16 << 20
"""Bytes the root ``zarr.json`` may hold: it carries the consolidated metadata of every node."""
METADATA_LIMIT = 1 << 20
"""Bytes any other ``zarr.json`` may hold (an array's is under 1 KiB)."""
MAX_CHUNKS = 1 << 24
"""Chunks one array may declare: 16.7M chunks of the default 4096 rows is 68 billion rows."""
MAX_CHUNK_BYTES = 1 << 31
"""Encoded bytes one chunk may declare (2 GiB)."""
FORMAT_DTYPES = {"float16": 2, "float32": 4, "int32": 4, "int64": 8, "uint8": 1}
"""The dtypes softcache writes, with their item sizes."""
_CHECKSUM = 4  # bytes the crc32c codec appends to a chunk
_COORD = re.compile(r"\d+")


@dataclass(frozen=True)
class ArrayFormat:
    """What an array's metadata declares, once it passed :func:`array_format`."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    checksummed: bool

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    @property
    def nchunks(self) -> int:
        return math.prod(self.grid)

    @property
    def chunk_bytes(self) -> int:
        """Exact size of one stored chunk: zarr stores edge chunks at the full chunk shape."""
        return math.prod(self.chunks) * FORMAT_DTYPES[self.dtype] + (_CHECKSUM if self.checksummed else 0)

    def keys(self, path: str) -> Iterable[str]:
        """Every chunk key of the grid, in row-major order of the chunk coordinates."""
        for coords in np.ndindex(*self.grid):
            yield chunk_key(path, coords)


def chunk_key(path: str, coords: Iterable[int]) -> str:
    """zarr's default chunk key: ``soft_labels/c/3/0/0``."""
    return "/".join([path, "c", *(str(int(c)) for c in coords)])


def array_format(meta: Mapping[str, Any]) -> ArrayFormat:
    """Check one array's ``zarr.json`` (a dict) against what the format writes; ValueError says why not.

    This is the only place that decides which encodings softcache reads: everything else
    (compression, filters, sharding, other chunk keys, strings or objects) is refused because a
    reader that decodes it can be made to allocate without bound or to misread the bytes."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise ValueError("not a Zarr v3 array")
    dtype = meta.get("data_type")
    if not isinstance(dtype, str) or dtype not in FORMAT_DTYPES:
        raise ValueError(f"dtype {json.dumps(dtype)[:60]} is not one the format uses ({', '.join(FORMAT_DTYPES)})")
    shape = _ints(meta.get("shape"), "shape", minimum=0)
    grid = meta.get("chunk_grid")
    if not isinstance(grid, Mapping) or grid.get("name") != "regular":
        raise ValueError("chunk grid is not 'regular'")
    chunks = _ints((grid.get("configuration") or {}).get("chunk_shape"), "chunk shape", minimum=1)
    if len(chunks) != len(shape):
        raise ValueError(f"chunk shape {list(chunks)} does not match shape {list(shape)}")
    encoding = meta.get("chunk_key_encoding")
    separator = (encoding.get("configuration") or {}).get("separator", "/") if isinstance(encoding, Mapping) else None
    if not isinstance(encoding, Mapping) or encoding.get("name") != "default" or separator != "/":
        raise ValueError("chunk keys are not zarr's default '/'-separated keys")
    if meta.get("storage_transformers"):
        raise ValueError("storage transformers are not part of the format")
    checksummed = _codecs(meta.get("codecs"), FORMAT_DTYPES[dtype])
    fmt = ArrayFormat(shape, dtype, chunks, checksummed)
    if fmt.nchunks > MAX_CHUNKS:
        raise ValueError(f"declares {fmt.nchunks} chunks, more than the {MAX_CHUNKS} an array of the format may hold")
    if fmt.chunk_bytes > MAX_CHUNK_BYTES:
        raise ValueError(f"declares chunks of {fmt.chunk_bytes} bytes, more than the {MAX_CHUNK_BYTES} the format allows")
    return fmt


def _ints(value: Any, what: str, *, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and v >= minimum for v in value):
        raise ValueError(f"{what} is not a list of integers >= {minimum}")
    return tuple(value)


def _codecs(codecs: Any, itemsize: int) -> bool:
    """``[bytes(little endian)]`` or ``[bytes(little endian), crc32c]``; True with the checksum."""
    if not isinstance(codecs, (list, tuple)):
        raise ValueError(f"codecs {repr(codecs)[:60]} are not a list")
    names = [c.get("name") if isinstance(c, Mapping) else c for c in codecs]
    if names not in (["bytes"], ["bytes", "crc32c"]):
        shown = ", ".join(str(n)[:40] for n in names[:8])
        raise ValueError(f"codecs [{shown}] are not the format's (bytes, optionally followed by crc32c)")
    config = (codecs[0].get("configuration") or {}) if isinstance(codecs[0], Mapping) else {}
    endian = config.get("endian")
    if set(config) - {"endian"} or (endian != "little" and not (itemsize == 1 and endian is None)):
        raise ValueError(f"bytes codec configuration {json.dumps(config)[:60]} is not little endian")
    if len(codecs) == 2 and isinstance(codecs[1], Mapping) and codecs[1].get("configuration"):
        raise ValueError("the crc32c codec takes no configuration")
    return len(codecs) == 2


MissingOk = Callable[[str, int], bool]
"""``(array path, first row of the chunk) -> True`` when that chunk may be absent."""


@dataclass
class _Known:
    """What the store learned from the metadata it served, shared by its read-only/writable copies."""

    arrays: dict[str, ArrayFormat | str] = field(default_factory=dict)  # format, or why it is refused


class GuardedStore(WrapperStore[Store]):
    """The store wrapper of the module doc. ``name`` (the URL) prefixes its error messages;
    ``local_root`` is the store's directory when it is on the local file system."""

    def __init__(self, store: Store, *, name: str = "", local_root: str | None = None, strict: bool = True,
                 missing_ok: MissingOk | None = None, known: _Known | None = None):
        super().__init__(store)
        self.name = name
        self.local_root = os.path.realpath(local_root) if local_root is not None else None
        self.strict = strict
        self.missing_ok = missing_ok
        self._known = known if known is not None else _Known()

    def _with_store(self, store: Store) -> GuardedStore:
        return GuardedStore(store, name=self.name, local_root=self.local_root, strict=self.strict,
                            missing_ok=self.missing_ok, known=self._known)

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
            if np.uint32(google_crc32c.value(data[:-_CHECKSUM])).tobytes() != bytes(data[-_CHECKSUM:]):
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
        await self._store.set(key, value)
        if key == "zarr.json" or key.endswith("/zarr.json"):  # an array (re)created here: know its format
            self._learn(_node_path(key), json.loads(value.to_bytes()))

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


def content_digest(store: GuardedStore, arrays: Mapping[str, ArrayFormat], concurrency: int = 16) -> tuple[str, int]:
    """``(sha256 hex, chunks)`` over every chunk of ``arrays`` as stored (checksums included).

    The digest is sha256 over the text lines ``"<chunk key> <sha256 of its bytes>\\n"``, arrays
    by path and chunks in row-major order of their coordinates, so anyone can recompute it from
    a listing and ``sha256sum``. Every chunk is read through the guarded store (bounded, crc
    checked, a missing one is an error), ``concurrency`` at a time."""
    keys = [key for path in sorted(arrays) for key in arrays[path].keys(path)]
    hashes: list[str] = [""] * len(keys)
    prototype = default_buffer_prototype()
    strict = GuardedStore(store._store, name=store.name, local_root=store.local_root, strict=True, known=store._known)

    async def one(i: int) -> None:
        value = await strict.get(keys[i], prototype)
        assert value is not None  # a strict store raises for a missing chunk
        hashes[i] = hashlib.sha256(value.as_numpy_array()).hexdigest()

    async def batch(first: int) -> None:
        await asyncio.gather(*(one(i) for i in range(first, min(first + concurrency, len(keys)))))

    for first in range(0, len(keys), concurrency):
        run(batch(first))
    lines = "".join(f"{key} {digest}\n" for key, digest in zip(keys, hashes))
    return hashlib.sha256(lines.encode()).hexdigest(), len(keys)
