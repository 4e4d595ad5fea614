"""The cache manifest: the single source of truth for what a cache holds.

The manifest lives in the root group attribute ``softcache`` of the Zarr v3 store. It is plain
JSON so another team can read it with only ``zarr`` and a JSON Schema validator (the schema in
``schemas/manifest.schema.json`` is generated from these models). Nothing here imports torch or
zarr: this is the bottom layer every other module builds on.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from softcache.errors import CacheError, UsageError, first_validation_error

SCHEMA_VERSION = 2
"""Bumped on any change an older reader could misread. Readers refuse newer versions.

Version 2 added token-sequence rows and compact (top-k, sampled) soft labels. A cache of classified
samples with full storage is still written as version 1, which 0.1 readers open unchanged; only
caches an older reader would misread carry version 2 (see :func:`format_version`)."""

MANIFEST_ATTR = "softcache"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Spec(_Model):
    """How to re-create a model or dataset: an importable callable plus keyword arguments,
    or a file path (safetensors weights that name their architecture)."""

    target: str = Field(description="'package.module:callable' or a path/URL to a weights file")
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | Spec) -> Spec:
        """Parse the CLI form ``pkg.mod:fn,key=value,key=value``.

        Values are read as JSON when they parse (numbers, booleans, null, quoted strings,
        lists) and as plain strings otherwise, so ``split=train`` and ``hidden=32`` both work.
        """
        if isinstance(text, Spec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"empty spec: {text!r}")
        head, *pairs = [p.strip() for p in text.split(",")]
        kwargs: dict[str, JsonValue] = {}
        for pair in pairs:
            if "=" not in pair:
                raise UsageError(f"spec {text!r}: expected key=value after the target, got {pair!r}")
            key, value = pair.split("=", 1)
            key = key.strip()
            if not key:
                raise UsageError(f"spec {text!r}: keyword {pair!r} has no name (write key=value)")
            if not value.strip():  # would reach the callable as "" and fail deep inside it
                raise UsageError(f"spec {text!r}: keyword {key!r} has no value (write {key}=VALUE, or leave it out)")
            try:
                kwargs[key] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key] = value
        return cls(target=head, kwargs=kwargs)

    def __str__(self) -> str:
        parts = [self.target] + [f"{k}={_fmt(v)}" for k, v in sorted(self.kwargs.items())]
        return ",".join(parts)

    def is_file(self) -> bool:
        return ":" not in self.target.split("/")[-1] or self.target.endswith(".safetensors")


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class TeacherInfo(_Model):
    spec: Spec | None = Field(description="how to rebuild the teacher; null when given as an object")
    num_parameters: int
    weights_digest: str = Field(description="sha256 over the state dict, keys sorted")


class DatasetSource(_Model):
    kind: Literal["dataset"] = "dataset"
    spec: Spec | None
    num_samples: int
    fingerprint: str = Field(description="sha256 over length, labels and a fixed sample of inputs")
    info: dict[str, JsonValue] = Field(
        default_factory=dict, description="what the dataset says about itself (split, seed, ...)"
    )


class SynthesisSource(_Model):
    kind: Literal["synthesis"] = "synthesis"
    method: str
    params: dict[str, JsonValue] = Field(default_factory=dict)
    seed: int
    num_samples: int


Source = Annotated[Union[DatasetSource, SynthesisSource], Field(discriminator="kind")]


class ClassInfo(_Model):
    count: int = Field(ge=1)
    names: list[str] | None = None


SAMPLE_MAX_DRAWS = 255
"""Draws a ``sample`` cache may take per row/position: its counts are stored as uint8."""

LOGPROB_STEP = 1 / 16
"""Nats per step of top-k log-probabilities stored as uint8 (``storage.scale``): value ``v``
means ``log p = -v * scale``, so 255 steps reach ``p = e^-15.9``, about 1.2e-7, and a kept
probability is off by at most 3.2% of itself. One scale for every cache of this version: a
reader widens a batch without the manifest at hand, and a cache recording another is refused."""

OPTIONAL_STORAGE_FIELDS = ("seed", "sampler", "scale")
"""Storage fields only some modes have (sampled storage, uint8 top-k values): left out of the
manifest and the cache key where absent, so caches written before they existed keep both."""


class StorageInfo(_Model):
    """How soft labels are stored.

    ``full``: every class's logit / T (``soft_labels``), so any temperature is exact.
    ``topk``: the ``k`` most probable classes at the cache temperature: their ids
    (``soft_ids``, ``id_dtype``), their log-probabilities at T (``soft_labels``) and the
    probability mass left over (``soft_rest``, float32, computed from the full distribution).
    ``sample``: ``k`` draws with replacement from the teacher's distribution at T, seeded by
    ``seed`` and the row, position and draw (``teacher.label.sample_counts`` states the rule): the
    distinct ids drawn (``soft_ids``) and how often each was drawn (``soft_labels``, uint8 counts
    summing to ``k``), most drawn first, in ``min(k, classes)`` slots, unused slots id 0 count 0.
    The target ``counts / k`` is an unbiased estimate of the teacher's distribution; no leftover.
    ``sampler`` says how the ``k`` uniforms of a row or position are drawn: ``systematic`` (one
    uniform ``u``, then ``(u + d) / k``: every class of probability ``p`` is drawn ``floor(k p)``
    or ``ceil(k p)`` times, far less noise for the same bytes), or independently (absent)."""

    mode: Literal["full", "topk", "sample"] = "full"
    k: int | None = Field(default=None, ge=1, description="entries kept per row/position (topk), draws per "
                          "row/position (sample)")
    dtype: Literal["float16", "float32", "uint8"] = Field(
        default="float16", description="dtype of the stored values (soft_labels): float for full and topk, uint8 "
                                       "counts for sample")
    id_dtype: Literal["uint16", "int32"] | None = Field(
        default=None, description="dtype of soft_ids: the smallest that holds every class id (compact modes)")
    values: Literal["logits", "logprobs", "counts"] = Field(
        default="logits", description="logits: z / T (full); logprobs: log softmax(z / T) of the kept ids (topk); "
                                      "counts: how often each stored id was drawn (sample)")
    scale: float | None = Field(
        default=None, description=f"topk with uint8 values: nats per step, log p = -value * scale ({LOGPROB_STEP}); "
                                  "absent otherwise")
    seed: int | None = Field(
        default=None, ge=0, description="sample: seeds the draws (row r's draws are a function of seed, r, position "
                                        "and draw only, so shards and resumed builds draw alike); absent otherwise")
    sampler: Literal["systematic"] | None = Field(
        default=None, description="sample: 'systematic' draws (one uniform u per row/position, draw d at (u + d) / k; "
                                  "unbiased, each class drawn floor or ceil of k p times); absent: independent draws")

    def problem(self, classes: int) -> str | None:
        """What is inconsistent in this storage for a cache of ``classes`` classes, or None."""
        floats = self.dtype in ("float16", "float32")
        if self.mode == "full" and (self.k is not None or self.values != "logits" or not floats):
            return "full storage keeps no k and stores float logits"
        if self.mode == "topk" and (self.k is None or self.id_dtype is None or self.values != "logprobs"
                                    or self.k >= classes or not (floats or self.dtype == "uint8")):
            return "topk storage needs k < classes, an id_dtype and float or uint8 values 'logprobs'"
        if self.scale != (LOGPROB_STEP if self.mode == "topk" and self.dtype == "uint8" else None):
            return f"uint8 top-k values need scale {LOGPROB_STEP} (nats per step), and only they have a scale"
        if self.mode == "sample" and (self.k is None or self.k > SAMPLE_MAX_DRAWS or self.id_dtype is None
                                      or self.values != "counts" or self.dtype != "uint8" or self.seed is None):
            return (f"sample storage needs 1 <= k <= {SAMPLE_MAX_DRAWS} draws, an id_dtype, a seed and uint8 "
                    "values 'counts'")
        if self.mode != "sample" and self.sampler is not None:
            return "only sample storage has a sampler"
        if self.mode != "sample" and self.seed is not None:
            return f"{self.mode} storage draws nothing and keeps no seed"
        return None


class TokenizerInfo(_Model):
    """The tokenizer the token ids come from, so a receiver can decode and check them."""

    name: str
    digest: str | None = Field(default=None, description="sha256 of the tokenizer file")
    vocab_size: int = Field(ge=1)
    special_ids: dict[str, int] = Field(default_factory=dict)


class SequenceInfo(_Model):
    """Rows of a ``sequence`` cache: ``length`` token positions each, one soft label per position.

    ``tokens`` hold the ids the teacher read; ``loss_mask[t]`` says whether the prediction made
    at position t (of token t + 1) counts; the next-token targets are derived from the two."""

    length: int = Field(ge=2, description="positions per row")
    vocab_size: int = Field(ge=2, description="teacher vocabulary (the classes)")
    tokenizer: TokenizerInfo | None = None
    packing: dict[str, JsonValue] = Field(default_factory=dict,
                                          description="how documents became rows (method, separator, ...)")


class ViewInfo(_Model):
    """Each sample may be labelled through several augmented views. A view is reproducible
    when its parameters are stored (``params``), when the inputs are stored (``stored``) or
    when it is the untouched input (``identity``)."""

    count: int = Field(default=1, ge=1)
    replay: Literal["identity", "params", "stored"] = "identity"
    augment: Spec | None = None
    param_names: list[str] = Field(default_factory=list)
    seed: int | None = Field(
        default=None, description="seed the view parameters were drawn from (they are stored; this keys the cache)"
    )


class Layout(_Model):
    rows: int = Field(ge=0, description="number of cached samples")
    chunk_rows: int = Field(ge=1, description="rows per Zarr chunk; every write covers whole chunks")
    shard_rows: int = Field(ge=1, description="rows per build shard; a multiple of chunk_rows")
    num_shards: int = Field(ge=0)
    input_shape: list[int] = Field(default_factory=list, description="shape of one input sample")


class EvalSplit(_Model):
    """Teacher outputs on a held-out set, kept in subgroup ``eval`` so students can report
    teacher agreement without ever loading the teacher."""

    source: DatasetSource
    rows: int


class BuildStatus(_Model):
    state: Literal["building", "complete"] = "building"
    started_at: str
    finished_at: str | None = None
    softcache_version: str


class Integrity(_Model):
    """What a reader checks the stored bytes against, recorded when the cache is finalized.

    Every chunk carries its own crc32c (verified on every read); the content digest covers every
    chunk's stored bytes, so ``softcache validate --deep`` detects any changed, added or removed
    byte. Caches written before this section existed have none and cannot be verified."""

    chunk_checksum: Literal["crc32c"] | None = Field(
        default="crc32c", description="checksum codec every array's chunks end with; null when some lack one")
    digest_method: Literal["sha256-chunk-list"] = Field(
        default="sha256-chunk-list",
        description="sha256 over the lines '<chunk key> <sha256 of the chunk's stored bytes>\\n', arrays sorted by "
                    "path, chunks in row-major order of their coordinates")
    content_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex digest, see digest_method")
    chunks: int = Field(ge=0, description="number of chunks the digest covers")


class Manifest(_Model):
    schema_version: int = Field(default=SCHEMA_VERSION)
    format: Literal["softcache"] = "softcache"
    kind: Literal["sample", "sequence"] = Field(
        default="sample", description="sample: one classified input per row; sequence: token rows, a soft label "
                                      "per position")
    sequence: SequenceInfo | None = Field(default=None, description="set for sequence caches")
    teacher: TeacherInfo
    source: Source
    classes: ClassInfo
    temperature: float = Field(gt=0, allow_inf_nan=False, description="stored values are teacher logits divided by this")
    storage: StorageInfo = Field(default_factory=StorageInfo)
    views: ViewInfo = Field(default_factory=ViewInfo)
    layout: Layout
    eval: EvalSplit | None = None
    status: BuildStatus
    cache_key: str = Field(description="sha256 of everything that determines the cache contents")
    integrity: Integrity | None = Field(
        default=None, description="chunk checksums and content digest, set by finalize; absent in caches written by softcache 0.1")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if (self.kind == "sequence") != (self.sequence is not None):
            raise ValueError("a sequence cache, and only one, has a 'sequence' section")
        if self.sequence is not None and self.sequence.vocab_size != self.classes.count:
            raise ValueError(f"sequence vocab_size {self.sequence.vocab_size} differs from classes.count "
                             f"{self.classes.count}")
        if self.schema_version < format_version(self.kind, self.storage):
            raise ValueError(f"schema_version {self.schema_version} cannot describe a {self.kind} cache with "
                             f"{self.storage.mode} storage")
        problem = self.storage.problem(self.classes.count)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is newer than this softcache understands ({SCHEMA_VERSION}); upgrade softcache"
            )
        return v

    def key(self) -> str:
        """The cache key this manifest's contents determine (see :func:`compute_cache_key`)."""
        return compute_cache_key(self.teacher, self.source, self.classes, self.temperature, self.storage, self.views,
                                 self.eval.source if self.eval is not None else None, self.sequence)

    @property
    def positions(self) -> int:
        """Soft labels per row: the views of a sample, or the positions of a sequence."""
        return self.sequence.length if self.sequence is not None else self.views.count

    def to_json(self) -> dict[str, Any]:
        # fields at their defaults that a version-1 reader does not know are left out, so a
        # version-1 cache stays byte-for-byte what 0.1 wrote and reads
        data = self.model_dump(mode="json")
        for key in OPTIONAL_STORAGE_FIELDS:
            if getattr(self.storage, key) is None:
                data["storage"].pop(key, None)
        if self.schema_version < 2:
            for key in ("kind", "sequence"):
                data.pop(key, None)
            for key in ("id_dtype", "values"):
                data["storage"].pop(key, None)
        return data

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Validate an attribute read from a store; any problem is a CacheError, one line."""
        if not isinstance(data, dict):
            raise CacheError("manifest attribute 'softcache' is not a JSON object")
        version = data.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise CacheError(
                f"cache schema_version {version} is newer than this softcache supports ({SCHEMA_VERSION}); upgrade softcache"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise CacheError(f"invalid manifest: {first_validation_error(exc, 'manifest')}") from None


def format_version(kind: str, storage: StorageInfo) -> int:
    """The schema version a cache needs: 1 for what 0.1 readers read correctly, else 2."""
    return 1 if kind == "sample" and storage.mode == "full" else SCHEMA_VERSION


def compute_cache_key(
    teacher: TeacherInfo,
    source: DatasetSource | SynthesisSource,
    classes: ClassInfo,
    temperature: float,
    storage: StorageInfo,
    views: ViewInfo,
    eval_source: DatasetSource | None = None,
    sequence: SequenceInfo | None = None,
) -> str:
    """Digest of everything that determines the stored values (not the chunking, not the time).

    Two builds with the same key produce the same arrays, so shards of one build can join a
    shared store and pipelines can skip a stage whose output already has this key. A version-1
    cache's key is computed as 0.1 computed it.
    """
    version = format_version("sequence" if sequence is not None else "sample", storage)
    determining: dict[str, Any] = {
        "schema_version": version,
        "teacher": teacher.weights_digest,
        "source": source.model_dump(mode="json", exclude={"spec", "info"}),
        "classes": classes.count,
        "temperature": temperature,
        "storage": storage.model_dump(mode="json", exclude=_unkeyed(storage, version)),
        "views": views.model_dump(mode="json"),
        "eval": eval_source.fingerprint if eval_source else None,
    }
    if sequence is not None:
        determining["sequence"] = sequence.model_dump(mode="json")
    blob = json.dumps(determining, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _unkeyed(storage: StorageInfo, version: int) -> set[str] | None:
    """Storage fields left out of the key: those a cache of ``version`` does not record (so keys
    computed before a field existed stay as they were)."""
    left = ({"id_dtype", "values"} if version < 2 else set()) | \
        {key for key in OPTIONAL_STORAGE_FIELDS if getattr(storage, key) is None}
    return left or None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
