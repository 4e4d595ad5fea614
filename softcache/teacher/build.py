"""Stage 1: run the teacher once and write its temperature-scaled logits to a cache.

The teacher runs batch after batch while a background writer stores whole chunks. Rows are
grouped into shards (whole chunks each) with a done-flag per shard, so a build split over
machines, or killed and resumed, never redoes or half-writes a chunk. The cache is marked
complete only after every shard is done and the arrays check out.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softcache._version import __version__

from softcache.cache import shards as distributed

from softcache.cache import store
from softcache.augment import resolve_views, view_blocks
from softcache.data import batches, describe, load_dataset
from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import (
    BuildStatus,
    ClassInfo,
    DatasetSource,
    Layout,
    Manifest,
    Spec,
    StorageInfo,
    SynthesisSource,
    TeacherInfo,
    ViewInfo,
    compute_cache_key,
    now_iso,
)
from softcache.cache.location import Location, record_location, record_value
from softcache.progress import Progress
from softcache.spec import Trust, load_model, num_parameters, probe_model, resolve_device, weights_digest
from softcache.cache.writer import ChunkWriter

DEFAULT_CHUNK_ROWS = 4096


def parse_storage(text: str, dtype: str = "float16") -> StorageInfo:
    """``full`` | ``topk:K`` | ``sample:K`` from the CLI."""
    mode, _, k = text.partition(":")
    if mode == "full" and not k:
        return StorageInfo(mode="full", dtype=dtype)  # type: ignore[arg-type]
    if mode in ("topk", "sample"):
        raise UsageError(f"storage mode {mode!r} is reserved in the format but not supported by this build; use 'full'")
    raise UsageError(f"storage must be 'full', 'topk:K' or 'sample:K', not {text!r}")


def teacher_info(teacher: nn.Module, spec: Spec | None) -> TeacherInfo:
    return TeacherInfo(spec=spec, num_parameters=num_parameters(teacher), weights_digest=weights_digest(teacher))


def teacher_stats(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Confidence statistics at T=1 (the teacher's own calibration), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top2[..., 0] - top2[..., 1] if top2.shape[-1] > 1 else top2[..., 0]
    return {
        "stats/max_prob": top2[..., 0].numpy(),
        "stats/entropy": (-(p * logp).nan_to_num().sum(-1)).numpy(),
        "stats/margin": margin.numpy(),
        "stats/prediction": p.argmax(-1).to(torch.int32).numpy(),
    }


def check_finite(logits: torch.Tensor, first_row: int) -> None:
    bad = (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad):
        rows = [first_row + int(i) for i in bad[:10]]
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CacheError(f"teacher produced NaN/Inf logits for rows {rows}{more}; nothing was marked complete")


@dataclass
class RowBlock:
    """What a producer hands the build for consecutive rows: inputs, labels, sample ids,
    and optional view parameters ``(n, V, P)`` and views already applied ``(n, V, ...)``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    sample_index: np.ndarray
    views: torch.Tensor | None = None
    view_params: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def label_block(teacher: nn.Module, block: RowBlock, first_row: int, temperature: float, dtype: str, device: torch.device) -> dict[str, np.ndarray]:
    """Run the teacher on every view of a block and return the arrays to store for it."""
    views = block.views if block.views is not None else block.inputs.unsqueeze(1)
    n, v = views.shape[:2]
    logits = teacher(views.reshape(n * v, *views.shape[2:]).to(device)).float().cpu()
    check_finite(logits.reshape(n, -1), first_row)
    logits = logits.reshape(n, v, -1)
    out = {
        store.SOFT: (logits / temperature).numpy().astype(dtype),
        store.INDEX: block.sample_index.astype(np.int64),
        store.LABELS: block.labels.to(torch.int64).numpy(),
    }
    out.update({k: a.reshape(n, v) for k, a in teacher_stats(logits.reshape(n * v, -1)).items()})
    if block.view_params is not None:
        out[store.VIEW_PARAMS] = block.view_params.astype(np.float32)
    out.update(block.extra)
    return out


shard_ranges = distributed.shard_ranges


def dataset_blocks(dataset: Dataset, rows: range, batch_size: int) -> Iterator[RowBlock]:
    offset = rows.start
    for x, y in batches(dataset, rows, batch_size):
        yield RowBlock(inputs=x, labels=y, sample_index=np.arange(offset, offset + len(x)))
        offset += len(x)


def block_source(dataset: Dataset, batch_size: int, aug: Any | None = None,
                 views: ViewInfo | None = None) -> Callable[[range], Iterator[RowBlock]]:
    """``rows -> RowBlocks`` of ``dataset``; with a replayable augmentation every block also
    carries its ``views.count`` views and their stored parameters (see ``augment.view_blocks``)."""
    if aug is None or views is None:
        return lambda rows: dataset_blocks(dataset, rows, batch_size)
    shape = tuple(next(batches(dataset, range(1), 1))[0].shape[1:])
    partners = (lambda idx: next(batches(dataset, idx.tolist(), len(idx)))[0].to(torch.float32)) if aug.mixes else None
    return lambda rows: view_blocks(dataset_blocks(dataset, rows, batch_size), aug, str(views.augment), rows,
                                    views.count, int(views.seed or 0), len(dataset), shape, partners)  # type: ignore[arg-type]


@dataclass
class BuildPlan:
    """Everything fixed before the first teacher call: the manifest and the row layout."""

    manifest: Manifest
    store_inputs: bool = False
    eval_inputs: bool | None = None
    """Store the eval split's inputs too (default: as ``store_inputs``). Synthesized caches keep
    the real held-out inputs out, so the cache can be shared where the data cannot."""


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
) -> Manifest:
    if temperature <= 0 or not math.isfinite(temperature):
        raise UsageError(f"temperature must be a positive number, not {temperature}")
    if chunk_rows < 1 or shard_chunks < 1:
        raise UsageError("chunk rows and chunks per shard must be at least 1")
    classes = ClassInfo(count=num_classes, names=class_names if class_names and len(class_names) == num_classes else None)
    rows = source.num_samples
    chunk_rows = min(chunk_rows, max(rows, 1))
    shard_rows = chunk_rows * shard_chunks
    from softcache.cache.manifest import EvalSplit

    return Manifest(
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
            num_shards=len(shard_ranges(rows, shard_rows)),
            input_shape=input_shape,
        ),
        eval=EvalSplit(source=eval_source, rows=eval_source.num_samples) if eval_source else None,
        status=BuildStatus(started_at=now_iso(), softcache_version=__version__),
        cache_key=compute_cache_key(teacher, source, classes, temperature, storage, views, eval_source),
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
    m.cache_key = compute_cache_key(m.teacher, m.source, m.classes, m.temperature, m.storage, m.views,
                                    m.eval.source if m.eval is not None else None)
    return m


def write_split(
    group: Any,
    teacher: nn.Module,
    blocks: Iterator[RowBlock],
    rows: range,
    manifest: Manifest,
    device: torch.device,
    progress: Progress,
    writer: ChunkWriter | None = None,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Label ``rows`` block by block and write them through the background writer.

    With a shared ``writer`` (see :func:`split_writer`) the call returns as soon as the last block
    is queued, and ``on_done`` runs in the writer thread once the rows are stored: the next shard's
    teacher work overlaps this shard's last write. Without one, a writer is made and closed here.
    """
    own = writer is None
    if writer is None:
        writer = split_writer(group, manifest)
    writer.begin(rows, on_done)
    store_inputs = store.INPUTS in group
    row = rows.start
    try:
        for block in blocks:
            arrays = label_block(teacher, block, row, manifest.temperature, manifest.storage.dtype, device)
            if store_inputs:  # the raw inputs; augmented views are re-created from them and view_params
                arrays[store.INPUTS] = block.inputs.to(torch.float32).numpy()
            writer.append(arrays)
            row += len(block.inputs)
            progress.update(len(block.inputs))
    except BaseException:
        writer.abort()
        raise
    if own:
        writer.close()


def split_writer(group: Any, manifest: Manifest) -> ChunkWriter:
    """One background writer for all the shards of a split that a build writes."""
    handles: dict[str, Any] = {}  # arrays opened once, not per chunk (metadata reads are requests remotely)
    return ChunkWriter(lambda start, blk: store.write_rows(group, start, blk, handles), None, None,
                       manifest.layout.chunk_rows)


def finalize(url: str) -> Manifest:
    """Check every shard is done and the arrays are whole, consolidate the metadata and mark the
    cache complete (idempotent; ``softcache finalize URL``). See ``distributed.finalize``."""
    return distributed.finalize(url)


def build(
    teacher: str | Spec | nn.Module,
    data: str | Spec | Dataset,
    out: str,
    *,
    eval_data: str | Spec | Dataset | None = None,
    temperature: float = 4.0,
    storage: str | StorageInfo = "full",
    dtype: str = "float16",
    batch_size: int = 256,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    shard_chunks: int = 1,
    store_inputs: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    views: int = 1,
    augment: str | Spec | None = None,
    view_seed: int = 0,
    shard: str | distributed.ShardSpec | None = None,
    resume: bool = False,
    teacher_arch: str | Spec | None = None,
    trust: Trust | None = None,
) -> store.Cache:
    """Label ``data`` (and ``eval_data``) with the teacher and write a complete cache at ``out``.

    With ``augment`` (a replayable augmentation SPEC) the teacher labels ``views`` views of every
    sample, drawn with ``view_seed``, and the cache stores each view's parameters so stage 2
    re-creates exactly the input the teacher saw. The eval split keeps the clean inputs.

    A ``.safetensors`` teacher is rebuilt from the architecture its metadata records only when
    that is on softcache's allowlist or in a module the user trusts (``trust``, default
    ``Trust.from_user()``); ``teacher_arch`` names the architecture instead."""
    if dtype not in ("float16", "float32"):
        raise UsageError(f"dtype must be float16 or float32, not {dtype!r}")
    if batch_size < 1:
        raise UsageError("batch size must be at least 1")
    dev = resolve_device(device)
    teacher_spec = None if isinstance(teacher, nn.Module) else Spec.parse(teacher)
    model = teacher if isinstance(teacher, nn.Module) else \
        load_model(teacher_spec, trust=trust, arch=teacher_arch)  # type: ignore[arg-type]
    model = model.to(dev).eval()
    dataset, data_spec = load_dataset(data)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise CacheError("dataset is empty: nothing to cache")
    eval_set, eval_spec = load_dataset(eval_data) if eval_data is not None else (None, None)
    probe_x, _ = next(batches(dataset, range(min(2, len(dataset))), 2))  # type: ignore[arg-type]
    probe = probe_model(model, probe_x, dev)
    if probe.ndim != 2:
        raise UsageError(f"teacher output has shape {tuple(probe.shape)}; expected (batch, classes)")
    storage_info = storage if isinstance(storage, StorageInfo) else parse_storage(storage, dtype)
    storage_info.dtype = dtype  # type: ignore[assignment]
    aug, view_info = resolve_views(augment, views, view_seed, len(dataset),  # type: ignore[arg-type]
                                   shape=tuple(probe_x.shape[1:]))
    manifest = make_manifest(
        teacher_info(model, teacher_spec),
        describe(dataset, data_spec),
        int(probe.shape[1]),
        getattr(dataset, "classes", None),
        list(probe_x.shape[1:]),
        temperature=temperature,
        storage=storage_info,
        views=view_info,
        chunk_rows=chunk_rows,
        shard_chunks=shard_chunks,
        eval_source=describe(eval_set, eval_spec) if eval_set is not None else None,
    )
    plan = BuildPlan(manifest=manifest, store_inputs=store_inputs)
    return run_build(out, model, plan, block_source(dataset, batch_size, aug, view_info),
                     (lambda rows: dataset_blocks(eval_set, rows, batch_size)) if eval_set is not None else None,
                     device=dev, overwrite=overwrite, progress=progress, shard=shard, resume=resume)


def run_build(
    out: str,
    teacher: nn.Module,
    plan: BuildPlan,
    train_blocks: Any,
    eval_blocks: Any | None,
    *,
    device: torch.device,
    overwrite: bool,
    progress: bool,
    shard: str | distributed.ShardSpec | None = None,
    resume: bool = False,
) -> store.Cache:
    """Create (or join) the store, label this worker's unfinished shards, finalize when all are done.

    ``*_blocks(rows)`` yield RowBlocks. One process does every shard unless ``shard`` (``"I/N"``)
    or torchrun's ``RANK``/``WORLD_SIZE`` give it a share; ``resume`` lets a plain build continue a
    partial cache of the same build. The returned cache is complete unless other workers still
    have shards to do; ``cache.build_report`` says what this worker did.
    """
    start = time.perf_counter()
    target = Location.of(out)
    out = target.zarr_url  # file:// URLs are written as the local paths they name
    manifest = plan.manifest = recorded_manifest(plan.manifest, target)
    me = distributed.resolve_shard(shard)
    with_eval = eval_blocks is not None and manifest.eval is not None
    arrays = {"train": store.split_arrays(manifest, manifest.layout.rows, store_inputs=plan.store_inputs)}
    if with_eval and manifest.eval is not None:
        eval_inputs = plan.store_inputs if plan.eval_inputs is None else plan.eval_inputs
        arrays["eval"] = store.split_arrays(manifest, manifest.eval.rows, store_inputs=eval_inputs, eval_split=True)
    with distributed.WorkerGroup(me) as workers:
        state = workers.first(
            lambda: distributed.open_target(out, manifest, arrays, overwrite=overwrite, resume=resume,
                                            joining=me.source == "shard"),
            then=lambda: distributed.open_target(out, manifest, arrays, overwrite=False, resume=resume, joining=True),
        )
    group = store.open_group(out, "r+")
    units = distributed.work_units(manifest, with_eval)
    mine = distributed.assigned(units, me)
    todo = [] if state == "complete" else distributed.pending(group, mine)
    desc = "build" if me.count == 1 else f"build {me}"
    writers: dict[str, ChunkWriter] = {}  # one per split, across shards; flags set after the data
    try:
        with Progress(total=sum(len(u.rows) for u in todo), desc=desc, enabled=progress, unit="rows") as bar:
            for unit in todo:
                split = distributed.split_group(group, unit.split)
                blocks = train_blocks if unit.split == "train" else eval_blocks
                if unit.split not in writers:
                    writers[unit.split] = split_writer(split, manifest)
                write_split(split, teacher, blocks(unit.rows), unit.rows, manifest, device, bar,  # type: ignore[misc]
                            writer=writers[unit.split], on_done=functools.partial(store.mark_shard_done, split, unit.shard))
            for writer in writers.values():
                writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    complete = distributed.finalize_if_done(out)
    cache = store.open_cache(out, allow_incomplete=True)
    cache.build_report = distributed.build_report(out, me, state, mine, todo, complete, time.perf_counter() - start,
                                                  len(units))
    return cache
