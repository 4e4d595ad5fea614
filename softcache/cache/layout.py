"""What arrays a cache has: their names, dtypes, shapes and chunking, derived from the manifest.

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

A ``sequence`` cache (format version 2) has token rows instead: its second axis is the row's
``L`` positions where a sample cache has its ``V`` views::

      tokens        (N, L)    int32   the token ids the teacher read
      loss_mask     (N, L)    uint8   1 where the prediction at position t (of token t+1) counts
      soft_labels   (N, L, C) ...     one soft label per position; stats/* (N, L)
      sample_index  (N,)      int64   row -> item of the source dataset (no labels array: the
                                      next-token targets follow from tokens and loss_mask)

Compact storage (``topk:K``, either kind) replaces the C values per view/position by K::

      soft_labels   (N, P, K) f16/32  log-probabilities at T of the K most probable classes
      soft_ids      (N, P, K) uint16 or int32 (the smallest holding every class id)
      soft_rest     (N, P)    float32 probability mass of the classes not kept

Sampled storage (``sample:N``, either kind) stores N draws from the teacher's distribution at T
as the distinct ids drawn and their counts, in ``S = min(N, C)`` fixed slots, most drawn first,
unused slots id 0 count 0 (no leftover: the counts sum to N; the target is counts / N)::

      soft_labels   (N, P, S) uint8   how often each id was drawn
      soft_ids      (N, P, S) uint16 or int32

Every array shares the row chunking R (``layout.chunk_rows``), and a build writes whole chunks
only (zarr rewrites a chunk on a partial write). Shards (``layout.shard_rows`` rows, whole
chunks) are the units of a build; a shard's flag is set only after all its chunks are stored
(see ``shards``). No compression: float logits barely compress and decoding costs more than the
bytes saved. Every chunk ends with a crc32c checksum (Zarr v3's ``crc32c`` codec).

This module names, sizes and encodes the arrays: the writer (``store``) creates exactly these,
the checker (``check``) compares a store with exactly these, and the reader (``guard``) decodes
only what :func:`array_format` accepts, so the three can never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from softcache.cache.manifest import Manifest, StorageInfo

SOFT = "soft_labels"
INDEX = "sample_index"
LABELS = "labels"
INPUTS = "inputs"
TOKENS = "tokens"
LOSS_MASK = "loss_mask"
SOFT_IDS = "soft_ids"
SOFT_REST = "soft_rest"
VIEW_PARAMS = "view_params"
PREDICTION = "stats/prediction"
STATS = ("stats/max_prob", "stats/entropy", "stats/margin", PREDICTION)
SHARD_DONE = "shard_done"
EVAL = "eval"
"""The subgroup of the held-out split."""


@dataclass(frozen=True)
class ArraySpec:
    """One array as the manifest implies it."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]


def split_arrays(manifest: Manifest, rows: int, *, store_inputs: bool, with_labels: bool = True,
                 eval_split: bool = False) -> dict[str, ArraySpec]:
    """The arrays of one split (root or eval), all chunked by ``layout.chunk_rows`` rows.

    The eval split always holds one view, the clean input: it measures agreement on held-out
    data as the student will see it, whatever views the training rows were labelled through."""
    lay, sequence = manifest.layout, manifest.sequence is not None
    views = manifest.positions if sequence or not eval_split else 1
    r = max(1, min(lay.chunk_rows, rows)) if rows else lay.chunk_rows
    st = manifest.storage
    width = soft_width(manifest)
    specs = {
        SOFT: ArraySpec((rows, views, width), st.dtype, (r, views, width)),
        INDEX: ArraySpec((rows,), "int64", (r,)),
    }
    if SOFT_IDS in soft_arrays(manifest):
        specs[SOFT_IDS] = ArraySpec((rows, views, width), str(st.id_dtype), (r, views, width))
    if SOFT_REST in soft_arrays(manifest):
        specs[SOFT_REST] = ArraySpec((rows, views), "float32", (r, views))
    if with_labels and not sequence:
        specs[LABELS] = ArraySpec((rows,), "int64", (r,))
    for name in STATS:
        specs[name] = ArraySpec((rows, views), "int32" if name.endswith("prediction") else "float32", (r, views))
    if sequence:
        specs[TOKENS] = ArraySpec((rows, views), "int32", (r, views))
        specs[LOSS_MASK] = ArraySpec((rows, views), "uint8", (r, views))
    elif store_inputs:
        shape = tuple(lay.input_shape)
        specs[INPUTS] = ArraySpec((rows, *shape), "float32", (r, *shape))
    if manifest.views.param_names and not eval_split:
        p = len(manifest.views.param_names)
        specs[VIEW_PARAMS] = ArraySpec((rows, views, p), "float32", (r, views, p))
    return specs


def soft_arrays(manifest: Manifest) -> tuple[str, ...]:
    """The arrays one soft label is stored in: the values, plus the ids of a compact mode, plus
    top-k's leftover mass (sampled counts sum to the draws: nothing is left over)."""
    return {"full": (SOFT,), "topk": (SOFT, SOFT_IDS, SOFT_REST), "sample": (SOFT, SOFT_IDS)}[manifest.storage.mode]


def soft_width(manifest: Manifest) -> int:
    """Entries per soft label of a cache (:func:`label_width`)."""
    return label_width(manifest.storage, manifest.classes.count)


def label_width(storage: StorageInfo, classes: int) -> int:
    """Entries per soft label: every class (full), the k kept (topk), or one slot per distinct id
    the draws can hold (sample: at most ``min(k, classes)``)."""
    k = int(storage.k or 0)
    return {"full": classes, "topk": k, "sample": min(k, classes)}[storage.mode]


def label_bytes(storage: StorageInfo, classes: int) -> int:
    """Bytes of one soft label at one position (values, ids, top-k's float32 leftover), before
    chunk padding and checksums: what a storage mode costs, comparable across modes."""
    ids = 0 if storage.mode == "full" else FORMAT_DTYPES[str(storage.id_dtype)]
    rest = FORMAT_DTYPES["float32"] if storage.mode == "topk" else 0
    return label_width(storage, classes) * (FORMAT_DTYPES[storage.dtype] + ids) + rest


def id_dtype(classes: int) -> str:
    """The smallest id dtype holding every class id."""
    return "uint16" if classes <= 1 << 16 else "int32"


def row_bytes(manifest: Manifest) -> int:
    """Stored bytes of one row's soft labels (values, ids, leftover) and statistics: what
    ``inspect`` reports per sample or per token, and what sizes a sequence cache's chunks."""
    specs = split_arrays(manifest, 1, store_inputs=False)
    return sum(math.prod(s.shape[1:]) * FORMAT_DTYPES[s.dtype] for name, s in specs.items() if name != INDEX)


def flag_spec(manifest: Manifest, rows: int) -> ArraySpec:
    """A split's ``shard_done``: one uint8 per shard of ``layout.shard_rows`` rows, each its own
    chunk, so workers never write the same chunk."""
    return ArraySpec((-(-rows // manifest.layout.shard_rows),), "uint8", (1,))


def split_prefix(path: str) -> str:
    """``"eval/"`` for an array of the eval split, ``""`` for one of the training rows."""
    return f"{EVAL}/" if path.startswith(f"{EVAL}/") else ""


def is_flag(path: str) -> bool:
    """True for a split's ``shard_done`` array: the one array whose chunks may be absent (a flag
    never written means "not done")."""
    return path.rsplit("/", 1)[-1] == SHARD_DONE


# -- the encoding an array of the format may declare -------------------------------------------


MAX_CHUNKS = 1 << 24
"""Chunks one array may declare: 16.7M chunks of the default 4096 rows is 68 billion rows."""
MAX_CHUNK_BYTES = 1 << 31
"""Encoded bytes one chunk may declare (2 GiB)."""
FORMAT_DTYPES = {"float16": 2, "float32": 4, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2}
"""The dtypes softcache writes, with their item sizes."""
CHECKSUM_BYTES = 4  # bytes the crc32c codec appends to a chunk


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
        return math.prod(self.chunks) * FORMAT_DTYPES[self.dtype] + (CHECKSUM_BYTES if self.checksummed else 0)

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
