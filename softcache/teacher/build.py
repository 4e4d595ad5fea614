"""Stage 1: run the teacher once and write its temperature-scaled logits to a cache.

The teacher runs batch after batch while a background writer stores whole chunks. Rows are
grouped into shards (whole chunks each) with a done-flag per shard, so a build split over
machines, or killed and resumed, never redoes or half-writes a chunk. The cache is marked
complete only after every shard is done and the arrays check out.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softcache.cache import layout, store
from softcache.cache import shards as distributed
from softcache.teacher.cores import TeacherCore
from softcache.teacher.opening import StoreOpening
from softcache.teacher.plan import BuildPlan, make_manifest, recorded_manifest, storage_info, teacher_digest
from softcache.teacher.workers import WorkerGroup
from softcache.views import resolve_views, view_blocks
from softcache.data import batches, describe, load_dataset
from softcache.config import BuildConfig, with_options
from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import Manifest, Spec, ViewInfo
from softcache.cache.location import Location
from softcache.progress import Progress
from softcache.cache.trust import Trust
from softcache.weights import load_model, probe_model, resolve_device
from softcache.cache.writer import ChunkWriter, Deferred
from softcache.teacher.label import RowBlock, stored_arrays, teacher_logits
from softcache.teacher import sequence as seq
from softcache.sequences import is_sequence_dataset

def dataset_blocks(dataset: Dataset, rows: range, batch_size: int) -> Iterator[RowBlock]:
    index, offset = np.arange(rows.start, rows.stop), 0  # each block's sample ids: a view, not an array a block
    for x, y in batches(dataset, rows, batch_size):
        yield RowBlock(inputs=x, labels=y, sample_index=index[offset : offset + len(x)])
        offset += len(x)


def block_source(dataset: Dataset, batch_size: int, aug: Any | None = None,
                 views: ViewInfo | None = None) -> Callable[[range], Iterator[RowBlock]]:
    """``rows -> RowBlocks`` of ``dataset``; with a replayable augmentation every block also
    carries its ``views.count`` views and their stored parameters (see ``views.view_blocks``)."""
    if aug is None or views is None:
        return lambda rows: dataset_blocks(dataset, rows, batch_size)
    shape = tuple(next(batches(dataset, range(1), 1))[0].shape[1:])
    partners = (lambda idx: next(batches(dataset, idx.tolist(), len(idx)))[0].to(torch.float32)) if aug.mixes else None
    return lambda rows: view_blocks(dataset_blocks(dataset, rows, batch_size), aug, str(views.augment), rows,
                                    views.count, int(views.seed or 0), len(dataset), shape, partners)  # type: ignore[arg-type]


@dataclass
class TeacherClock:
    """Seconds a build spent inside the teacher's calls. Everything else a build costs is its own
    (store, writer hand-offs, the last chunk's write, finalize), so ``seconds / teacher`` measured
    in one run says what the build adds to its teacher, free of the machine's drift between a
    build and a separate teacher loop. Each call's wall and CPU seconds also go to ``core``'s
    watch (``teacher.cores``)."""

    seconds: float = 0.0
    core: TeacherCore | None = None

    def call(self, block: RowBlock, teacher: nn.Module, device: torch.device) -> torch.Tensor:
        """``teacher_logits`` of ``block``, timed."""
        began, cpu = time.perf_counter(), time.thread_time()
        logits = teacher_logits(teacher, block, device)
        wall = time.perf_counter() - began
        self.seconds += wall
        if self.core is not None:
            self.core.watch(wall, time.thread_time() - cpu)
        return logits


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
    clock: TeacherClock | None = None,
    store_inputs: bool | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Label ``rows`` block by block and write them through the background writer.

    With a shared ``writer`` (see :func:`split_writer`) the call returns as soon as the last block
    is queued, and ``on_done`` runs in the writer thread once the rows are stored: the next shard's
    teacher work overlaps this shard's last write. Without one, a writer is made and closed here.
    ``clock`` adds up the time of the teacher's calls. ``store_inputs``: whether ``group`` holds an
    inputs array, if the caller knows (else looked up: a metadata read that, between two shards,
    waits behind the previous shard's chunk writes in zarr's event loop). ``check`` runs after
    every teacher call and raises to stop the split (the store could not be opened, say).
    """
    clock = clock or TeacherClock()
    own = writer is None
    if writer is None:
        writer = split_writer(lambda: group, manifest)
    writer.begin(rows, on_done)
    store_inputs = layout.INPUTS in group if store_inputs is None else store_inputs
    row = rows.start
    try:
        for block in blocks:
            logits = clock.call(block, teacher, device)
            if check is not None:
                check()
            # everything after the teacher runs in the writer thread, beside the next teacher call
            rows_in = len(block.inputs)
            writer.append(Deferred(rows_in, functools.partial(stored_arrays, logits, block, row, manifest, store_inputs)))
            # the writer holds the last reference: it frees the logits (a munmap of tens of MB for
            # token rows) beside the teacher's next call instead of this loop between two calls
            del logits, block
            row += rows_in
            progress.update(rows_in)
    except BaseException:
        writer.abort()
        raise
    if own:
        writer.close()


def split_writer(group: Callable[[], Any], manifest: Manifest, core: TeacherCore | None = None) -> ChunkWriter:
    """One background writer for all the shards of a split that a build writes, kept off the
    teacher's ``core`` (its thread starts on it). ``group()`` gives the split's group when the
    writer first needs it: a store still being opened (``teacher.opening``) is waited for in
    the writer thread, not by the teacher."""
    handles: dict[str, Any] = {}  # arrays opened once, not per chunk (metadata reads are requests remotely)
    writer = ChunkWriter(lambda start, blk: store.write_rows(group(), start, blk, handles), None, None,
                         manifest.layout.chunk_rows)
    if core is not None:
        core.keep_off(writer.native_id)
    return writer


def _mark_done(split: Callable[[], Any], shard: int) -> None:
    store.mark_shard_done(split(), shard)


def build(
    teacher: str | Spec | nn.Module,
    data: str | Spec | Dataset,
    out: str,
    config: BuildConfig | None = None,
    *,
    eval_data: str | Spec | Dataset | None = None,
    teacher_arch: str | Spec | None = None,
    trust: Trust | None = None,
    progress: bool = True,
    **options: Any,
) -> store.Cache:
    """Label ``data`` (and ``eval_data``) with the teacher and write a complete cache at ``out``.

    How the cache is written is a :class:`~softcache.config.BuildConfig` (temperature, dtype,
    chunk rows, views, shard, resume, ...): pass one as ``config``, or its fields as keyword
    ``options`` (laid over ``config``); an unknown or invalid option is a one-line UsageError.

    With ``augment`` (a replayable augmentation SPEC) the teacher labels ``views`` views of every
    sample, drawn with ``view_seed``, and the cache stores each view's parameters so stage 2
    re-creates exactly the input the teacher saw. The eval split keeps the clean inputs.

    A ``.safetensors`` teacher is rebuilt from the architecture its metadata records only when
    that is on softcache's allowlist or in a module the user trusts (``trust``, default
    ``Trust.from_user()``); ``teacher_arch`` names the architecture instead."""
    cfg = with_options(BuildConfig, config, options, "build")
    dev = resolve_device(cfg.device)
    teacher_spec = None if isinstance(teacher, nn.Module) else Spec.parse(teacher)
    model = teacher if isinstance(teacher, nn.Module) else \
        load_model(teacher_spec, trust=trust, arch=teacher_arch)  # type: ignore[arg-type]
    model = model.to(dev).eval()
    dataset, data_spec = load_dataset(data)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise CacheError("dataset is empty: nothing to cache")
    eval_set, eval_spec = load_dataset(eval_data) if eval_data is not None else (None, None)
    if is_sequence_dataset(dataset):
        return _build_sequences(model, dataset, data_spec, eval_set, eval_spec, teacher_spec, out, cfg, dev, progress)
    probe_x, _ = next(batches(dataset, range(min(2, len(dataset))), 2))  # type: ignore[arg-type]
    probe = probe_model(model, probe_x, dev)
    if probe.ndim != 2:
        raise UsageError(f"teacher output has shape {tuple(probe.shape)}; expected (batch, classes)")
    aug, view_info = resolve_views(cfg.augment, cfg.views, cfg.view_seed or 0, len(dataset),  # type: ignore[arg-type]
                                   shape=tuple(probe_x.shape[1:]))
    recorded, digest = teacher_digest(model, teacher_spec, dev)
    manifest = make_manifest(
        recorded,
        describe(dataset, data_spec),
        int(probe.shape[1]),
        getattr(dataset, "classes", None),
        list(probe_x.shape[1:]),
        temperature=cfg.temperature,
        storage=storage_info(cfg.storage, cfg.dtype, int(probe.shape[1])),
        views=view_info,
        chunk_rows=cfg.chunk_rows,
        shard_chunks=cfg.shard_chunks,
        eval_source=describe(eval_set, eval_spec) if eval_set is not None else None,
    )
    plan = BuildPlan(manifest=manifest, store_inputs=cfg.store_inputs, digest=digest)
    batch_size = cfg.batch_size
    return run_build(out, model, plan, block_source(dataset, batch_size, aug, view_info),
                     (lambda rows: dataset_blocks(eval_set, rows, batch_size)) if eval_set is not None else None,
                     device=dev, overwrite=cfg.overwrite, progress=progress, shard=cfg.shard, resume=cfg.resume,
                     pin_threads=cfg.pin_threads)


def _build_sequences(model: nn.Module, dataset: Dataset, data_spec: Spec | None, eval_set: Dataset | None,
                     eval_spec: Spec | None, teacher_spec: Spec | None, out: str, cfg: BuildConfig,
                     dev: torch.device, progress: bool) -> store.Cache:
    """:func:`build` for token rows: one soft label per position, no views (``teacher.sequence``)."""
    seq.check_plain(cfg.views, cfg.augment)
    rows, held_out = seq.token_rows(dataset, eval_set)
    vocab = seq.probe_vocab(model, rows, dev)
    info = seq.sequence_info(rows, vocab, held_out)
    recorded, digest = teacher_digest(model, teacher_spec, dev)

    def manifest_with(chunk_rows: int) -> Manifest:
        return make_manifest(
            recorded, describe(rows, data_spec), vocab, None, [rows.length],
            temperature=cfg.temperature, storage=storage_info(cfg.storage, cfg.dtype, vocab), views=ViewInfo(),
            chunk_rows=chunk_rows, shard_chunks=cfg.shard_chunks,
            eval_source=describe(held_out, eval_spec) if held_out is not None else None, sequence=info)

    manifest = manifest_with(seq.chunk_rows(cfg.chunk_rows, layout.row_bytes(manifest_with(cfg.chunk_rows))))
    batch = seq.teacher_batch(cfg.batch_size, rows.length, vocab)
    return run_build(out, model, BuildPlan(manifest=manifest, digest=digest), seq.sequence_blocks(rows, batch),
                     seq.sequence_blocks(held_out, batch) if held_out is not None else None,
                     device=dev, overwrite=cfg.overwrite, progress=progress, shard=cfg.shard, resume=cfg.resume,
                     pin_threads=cfg.pin_threads)


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
    pin_threads: str = "auto",
) -> store.Cache:
    """Create (or join) the store, label this worker's unfinished shards, finalize when all are done.

    ``*_blocks(rows)`` yield RowBlocks. One process does every shard unless ``shard`` (``"I/N"``)
    or torchrun's ``RANK``/``WORLD_SIZE`` give it a share; ``resume`` lets a plain build continue a
    partial cache of the same build. The returned cache is complete unless other workers still
    have shards to do; ``cache.build_report`` says what this worker did. ``pin_threads``: "auto"
    keeps a one-core CPU teacher on its core and the writers off it (``teacher.cores``), "off" not.
    """
    start = time.perf_counter()
    target = Location.of(out).native()  # file:// URLs are written as the local paths they name
    manifest = plan.manifest = recorded_manifest(plan.manifest, target)
    me = distributed.resolve_shard(shard)
    with_eval = eval_blocks is not None and manifest.eval is not None
    arrays = {"train": layout.split_arrays(manifest, manifest.layout.rows, store_inputs=plan.store_inputs)}
    if with_eval and manifest.eval is not None:
        eval_inputs = plan.store_inputs if plan.eval_inputs is None else plan.eval_inputs
        arrays["eval"] = layout.split_arrays(manifest, manifest.eval.rows, store_inputs=eval_inputs, eval_split=True)
    units = distributed.work_units(manifest, with_eval)
    mine = distributed.assigned(units, me)
    core = TeacherCore(pin_threads, device)
    if me.count == 1 and me.source != "shard" and not resume:
        # a new store whatever is there (replaced, or refused): every unit is labelled, and the
        # teacher's weights are hashed and the store created beside the teacher's first calls
        opening = StoreOpening(lambda: distributed.open_target(target, plan.sealed(), arrays, overwrite=overwrite,
                                                               resume=False, joining=False), then=core.sweep)
        todo = mine
    else:
        sealed = plan.sealed()  # the cache key decides whether this worker joins what is there
        with WorkerGroup(me) as workers:
            opening = StoreOpening.opened(*workers.first(
                lambda: distributed.open_target(target, sealed, arrays, overwrite=overwrite, resume=resume,
                                                joining=me.source == "shard"),
                then=lambda: distributed.open_target(target, sealed, arrays, overwrite=False, resume=resume,
                                                     joining=True),
            ))
        state, group = opening.result()
        todo = [] if state == "complete" else distributed.pending(group, mine)
    desc = "build" if me.count == 1 else f"build {me}"
    writers: dict[str, ChunkWriter] = {}  # one per split, across shards; flags set after the data
    inputs: dict[str, bool] = {}  # whether a split stores inputs, decided once
    clock = TeacherClock(core=core)

    def after_call() -> None:
        """Runs after every teacher call, before its block is queued: the opening's error first
        (a refused target), then whether the teacher wrote its weights, so that no shard holding
        a block from weights other than those hashed is ever flagged done."""
        opening.check()
        if plan.digest is not None:
            plan.digest.check()

    try:
        with Progress(total=sum(len(u.rows) for u in todo), desc=desc, enabled=progress, unit="rows") as bar, core:
            for unit in todo:
                split = functools.partial(opening.split, unit.split)
                if unit.split not in writers:
                    writers[unit.split] = split_writer(split, manifest, core)
                    # a store created by this build holds the planned arrays; one joined or resumed is asked
                    inputs[unit.split] = layout.INPUTS in (arrays[unit.split] if opening.planned else split())
                blocks = train_blocks if unit.split == "train" else eval_blocks
                write_split(None, teacher, blocks(unit.rows), unit.rows, manifest, device, bar,  # type: ignore[misc]
                            writer=writers[unit.split], on_done=functools.partial(_mark_done, split, unit.shard),
                            clock=clock, store_inputs=inputs[unit.split], check=after_call)
            for writer in writers.values():
                writer.close()
        state, group = opening.result()
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()
        opening.wait()  # nothing of a failed build is still creating its store
        if isinstance(exc, Exception):
            opening.result()  # a refused target is the first thing wrong, whatever the teacher did meanwhile
        raise
    complete = distributed.finalize_if_done(target, group, all_mine=opening.planned)
    cache = store.open_cache(target, allow_incomplete=True)
    cache.build_report = distributed.build_report(target, me, state, mine, todo, complete, time.perf_counter() - start,
                                                  len(units), clock.seconds, core.cpu, core.released)
    return cache
