"""What a build writes, fixed before the teacher's first call: the manifest (teacher, data,
temperature, storage, layout, cache key) and which inputs the cache keeps (:class:`BuildPlan`).
``build``, token-row builds and ``synthesize`` each make a plan; ``build.run_build`` writes it."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from softcache._version import __version__
from softcache.cache import layout
from softcache.cache import shards as distributed
from softcache.cache.location import Location, record_location, record_value
from softcache.cache.manifest import (
    LOGPROB_STEP,
    BuildStatus,
    ClassInfo,
    DatasetSource,
    EvalSplit,
    Layout,
    Manifest,
    SequenceInfo,
    Spec,
    StorageInfo,
    SynthesisSource,
    TeacherInfo,
    ViewInfo,
    compute_cache_key,
    format_version,
    now_iso,
)
from softcache.errors import UsageError
from softcache.weights import LaterDigest, num_parameters, weights_digest


def storage_info(storage: str, dtype: str, classes: int | None = None) -> StorageInfo:
    """A ``storage`` option (its form checked by ``BuildOptions``) as the manifest records it,
    for a teacher of ``classes`` classes (a compact mode must keep fewer than all of them).

    A compact mode that stores no fewer bytes per soft label than full float16 storage (few
    classes: ``sample:12`` over 10 classes keeps 10 slots of 3 bytes against 20 bytes) builds, with
    a warning: it loses what full storage keeps exactly and saves nothing."""
    info = _storage_info(storage, dtype, classes)
    if classes is not None and info.mode != "full":
        compact, full = layout.label_bytes(info, classes), layout.label_bytes(StorageInfo(dtype="float16"), classes)
        if compact >= full:
            warnings.warn(f"storage {storage} keeps {compact} bytes per soft label, no fewer than full float16 storage's "
                          f"{full} for {classes} classes, which is exact and trains at any temperature: "
                          "--storage full is the smaller choice here", UserWarning, stacklevel=3)
    return info


def _storage_info(storage: str, dtype: str, classes: int | None) -> StorageInfo:
    mode, _, k = storage.partition(":")
    if dtype == "uint8" and mode != "topk":
        raise UsageError(f"--dtype uint8 quantises top-k log-probabilities; {mode} storage keeps "
                         + ("float logits (float16 or float32)" if mode == "full" else "uint8 counts already"))
    if mode == "full":
        return StorageInfo(dtype=dtype)  # type: ignore[arg-type]
    if mode == "sample":  # the counts are uint8 whatever the float dtype
        draws, _, seed = k.partition(":")
        return StorageInfo(mode="sample", k=int(draws), dtype="uint8", id_dtype=layout.id_dtype(classes or 1 << 31),  # type: ignore[arg-type]
                           values="counts", seed=int(seed or 0), sampler="systematic")
    kept = int(k)
    if classes is not None and kept >= classes:
        raise UsageError(f"storage {storage}: K={kept} keeps all {classes} of the teacher's classes (its vocabulary, for token rows); "
                         f"use --storage full, or K < {classes}")
    return StorageInfo(mode=mode, k=kept, dtype=dtype, id_dtype=layout.id_dtype(classes or 1 << 31),  # type: ignore[arg-type]
                       values="logprobs", scale=LOGPROB_STEP if dtype == "uint8" else None)


PENDING_DIGEST = ""
"""The weights digest of a plan whose digest is computed later (:attr:`BuildPlan.digest`)."""


def teacher_info(teacher: nn.Module, spec: Spec | None, hashed: bool = True) -> TeacherInfo:
    """What the manifest records of the teacher; ``hashed=False`` leaves the weights digest
    :data:`PENDING_DIGEST` for :meth:`BuildPlan.sealed` to fill in."""
    return TeacherInfo(spec=spec, num_parameters=num_parameters(teacher),
                       weights_digest=weights_digest(teacher) if hashed else PENDING_DIGEST)


def teacher_digest(teacher: nn.Module, spec: Spec | None, device: torch.device) -> tuple[TeacherInfo, LaterDigest | None]:
    """The manifest's teacher section and, for a CPU teacher, the weights digest to compute beside
    its first calls (:attr:`BuildPlan.digest`). A teacher on a GPU is hashed now, as before:
    copying its weights to the host from another thread while it runs would be an unsafe call
    during a CUDA graph capture of the teacher's own."""
    later = device.type == "cpu"
    return teacher_info(teacher, spec, hashed=not later), (LaterDigest(teacher) if later else None)


@dataclass
class BuildPlan:
    """Everything fixed before the first teacher call: the manifest and the row layout."""

    manifest: Manifest
    store_inputs: bool = False
    eval_inputs: bool | None = None
    """Store the eval split's inputs too (default: as ``store_inputs``). Synthesized caches keep
    the real held-out inputs out, so the cache can be shared where the data cannot."""
    digest: LaterDigest | None = None
    """The teacher's weights digest when the manifest does not hold it yet: the build computes it
    beside the teacher's first calls (everything the manifest says about labelling is fixed
    without it), and checks once the teacher is done that its weights did not change."""

    def sealed(self) -> Manifest:
        """The manifest to write: with the weights digest and the cache key it determines,
        computed here (in the calling thread) when :attr:`digest` deferred them."""
        if self.digest is None:
            return self.manifest
        manifest = self.manifest.model_copy(deep=True)
        manifest.teacher.weights_digest = self.digest()
        manifest.cache_key = manifest.key()
        return manifest


def make_manifest(
    teacher: TeacherInfo,
    source: DatasetSource | SynthesisSource,
    num_classes: int,
    class_names: list[str] | None,
    input_shape: list[int],
    *,
    temperature: float,
    storage: StorageInfo,
    views: ViewInfo,
    chunk_rows: int,
    shard_chunks: int,
    eval_source: DatasetSource | None = None,
    sequence: SequenceInfo | None = None,
) -> Manifest:
    if temperature <= 0 or not math.isfinite(temperature):
        raise UsageError(f"temperature must be a positive number, not {temperature}")
    if chunk_rows < 1 or shard_chunks < 1:
        raise UsageError("chunk rows and chunks per shard must be at least 1")
    classes = ClassInfo(count=num_classes, names=class_names if class_names and len(class_names) == num_classes else None)
    rows = source.num_samples
    chunk_rows = min(chunk_rows, max(rows, 1))
    shard_rows = chunk_rows * shard_chunks
    kind = "sequence" if sequence is not None else "sample"
    return Manifest(
        schema_version=format_version(kind, storage),
        kind=kind,
        sequence=sequence,
        teacher=teacher,
        source=source,
        classes=classes,
        temperature=temperature,
        storage=storage,
        views=views,
        layout=Layout(
            rows=rows,
            chunk_rows=chunk_rows,
            shard_rows=shard_rows,
            num_shards=len(distributed.shard_ranges(rows, shard_rows)),
            input_shape=input_shape,
        ),
        eval=EvalSplit(source=eval_source, rows=eval_source.num_samples) if eval_source else None,
        status=BuildStatus(started_at=now_iso(), softcache_version=__version__),
        cache_key=compute_cache_key(teacher, source, classes, temperature, storage, views, eval_source, sequence),
    )


def _recorded_spec(spec: Spec | None, cache: Location) -> Spec | None:
    if spec is None:
        return None
    target = record_location(spec.target, cache) if spec.is_file() else spec.target
    return Spec(target=target, kwargs=record_value(spec.kwargs, cache))


def recorded_manifest(manifest: Manifest, cache: Location) -> Manifest:
    """The manifest as written into the cache at ``cache``: files and URLs its SPECs (and the
    datasets' own descriptions) name are rewritten by ``location.record_location``, so a shared
    cache carries no credentials and no paths of the machine that built it. The cache key is
    recomputed; it changes only if the view augmentation's keywords named a file or URL."""
    m = manifest.model_copy(deep=True)
    m.teacher.spec = _recorded_spec(m.teacher.spec, cache)
    sources = [m.source] + ([m.eval.source] if m.eval is not None else [])
    for source in sources:
        if isinstance(source, DatasetSource):
            source.spec = _recorded_spec(source.spec, cache)
            source.info = record_value(source.info, cache)
    m.views.augment = _recorded_spec(m.views.augment, cache)
    m.cache_key = m.key()
    return m
