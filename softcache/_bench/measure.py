"""The throughput measurements: stage 1 (writing vs teacher inference) and stage 2 (epochs
from the store, online vs cached distillation, grouped students, loaders, threads).

Each returns its figures as a dict; :func:`softcache._bench.run_bench` gathers them."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from softcache._bench.timing import Timed, alternate, balanced_rounds, median, ratio, timer
from softcache._bench.workload import MLP, Workload, fresh_runs, memory_loader, sample_loader, students
from softcache.cache import store
from softcache.cache.store import Cache, open_cache
from softcache.config import StudentConfig
from softcache.data import LabelledTensors
from softcache.progress import Progress
from softcache.student.loaders import MemoryLoader, open_loader
from softcache.student.run import cached_soft, fit, online_soft
from softcache.student.stream import StreamLoader
from softcache.teacher.build import build, dataset_blocks, split_writer, write_split
from softcache.teacher.cores import TeacherCore
from softcache.teacher.label import label_block


def measure_epochs(w: Workload) -> dict[str, Any]:
    """One student, ``epochs`` epochs: soft labels already in a tensor vs from the store."""
    s, cfg = w.settings, students(1)[0]

    def in_tensor() -> float:
        run, loader = fresh_runs(w, [cfg]), memory_loader(w)
        elapsed = timer()
        fit(run, loader, s.epochs, cached_soft, w.cache.temperature)
        return elapsed()

    def from_store(mode: str) -> Timed:
        def go() -> float:
            run = fresh_runs(w, [cfg])
            elapsed = timer()  # opening the cache and loading it count
            cache = open_cache(w.cache.url)
            loader = open_loader(cache, inputs=w.inputs, batch_size=s.batch_size, mode=mode)  # type: ignore[arg-type]
            try:
                fit(run, loader, s.epochs, cached_soft, cache.temperature)
            finally:
                if isinstance(loader, StreamLoader):
                    loader.close()
            return elapsed()
        return go

    # balanced rounds (A B C C B A): these runs last seconds, and the machine's speed drifts over a round
    times = alternate({"tensor": in_tensor, "memory": from_store("memory"), "stream": from_store("stream")},
                      balanced_rounds(s.repeats), balanced=True)
    per_epoch = {k: median(v) / s.epochs for k, v in times.items()}
    crc = checksum_seconds(w.cache, s.repeats)
    return {
        "store_vs_memory_epoch": ratio(times, "memory", "tensor"),
        "streaming_vs_memory_epoch": ratio(times, "stream", "tensor"),
        "epoch_seconds": per_epoch,
        "checksum_seconds_per_read": crc,
        "checksum_share_of_stream_epoch": crc / per_epoch["stream"],
    }


def checksum_seconds(cache: Cache, repeats: int) -> float:
    """What verifying the soft labels' crc32c costs per full read of them (both timings above
    include it): the guard and zarr's codec each check every chunk, so twice over the bytes."""
    import google_crc32c

    blob = np.zeros(cache.train.array(store.SOFT).nbytes, dtype=np.uint8)  # the cost does not depend on the values
    samples = []
    for _ in range(repeats):
        elapsed = timer()
        google_crc32c.value(blob)
        google_crc32c.value(blob)
        samples.append(elapsed())
    return median(samples)


def measure_online(w: Workload) -> dict[str, Any]:
    """Online KD (live teacher every batch) vs cached KD, and the ideal (teacher + student) / student."""
    cfg = students(1)[0]
    loader = sample_loader(w)
    source = online_soft(w.teacher, w.cache.temperature)

    def train_with(soft_source: Callable[..., Any]) -> Timed:
        def go() -> float:
            run = fresh_runs(w, [cfg])
            elapsed = timer()
            fit(run, loader, 1, soft_source, w.cache.temperature)
            return elapsed()
        return go

    def teacher_only() -> float:
        elapsed = timer()
        for batch in loader.epoch(0):
            source(batch)
        return elapsed()

    times = alternate({"cached": train_with(cached_soft), "online": train_with(source), "teacher": teacher_only},
                      w.settings.repeats)
    ideal = statistics.median((c + t) / c for c, t in zip(times["cached"], times["teacher"]))
    return {
        "online_vs_cached_epoch": ratio(times, "online", "cached"),
        "online_vs_cached_ideal": ideal,
        "teacher_vs_student_cost": ratio(times, "teacher", "cached"),
    }


def measure_group(w: Workload, spec: str = MLP, rows: int | None = None) -> dict[str, Any]:
    """K students in one grouped pass vs K separate runs, one epoch each; every run opens the
    cache and loads it, as a separate ``softcache train`` would."""
    s = w.settings
    configs = students(s.students, spec)
    n = rows or len(w.inputs)

    def one_run(cfgs: Sequence[StudentConfig], group: bool) -> float:
        runs = fresh_runs(w, cfgs)
        elapsed = timer()
        cache = open_cache(w.cache.url)
        loader = open_loader(cache, inputs=w.inputs, batch_size=s.batch_size, mode="memory")
        if n < len(w.inputs):
            loader = MemoryLoader(loader.inputs[:n], loader.soft[:n], loader.labels[:n],  # type: ignore[index]
                                  batch_size=s.batch_size, shuffle_seed=0)
        fit(runs, loader, 1, cached_soft, cache.temperature, group=group)
        return elapsed()

    times = alternate({
        "grouped": lambda: one_run(configs, True),
        "one_pass": lambda: one_run(configs, False),
        "separate": lambda: sum(one_run([c], False) for c in configs),
    }, s.repeats)
    return {
        "speedup": ratio(times, "separate", "grouped"),
        "one_pass_speedup": ratio(times, "separate", "one_pass"),
        "grouped_seconds": median(times["grouped"]),
        "separate_seconds": median(times["separate"]),
    }


def measure_stage1(w: Workload) -> dict[str, Any]:
    """Stage 1 as the build runs it, shard after shard through one background writer, vs teacher
    inference alone on the same batches, vs the same labelling with nothing stored, and the
    whole ``build()`` call (store creation and finalisation included)."""
    s = w.settings
    n = min(s.rows, 2 * s.chunk_rows)  # two shards: the first one's writes overlap the teacher, the last is waited for
    dataset = LabelledTensors(w.inputs[:n], w.labels[:n], w.dataset.classes, {"rows": n})
    group = store.open_group(w.cache.url, "r+")
    manifest = w.cache.manifest
    shards = [range(a, min(a + s.chunk_rows, n)) for a in range(0, n, s.chunk_rows)]

    def with_writing() -> float:
        with Progress(total=n, desc="bench", enabled=False) as bar, TeacherCore("auto", w.device) as core:
            elapsed = timer()
            writer = split_writer(lambda: group, manifest, core)  # placed as run_build places it
            for i, rows in enumerate(shards):
                write_split(group, w.teacher, dataset_blocks(dataset, rows, s.build_batch_size), rows, manifest,
                            w.device, bar, writer=writer, on_done=functools.partial(store.mark_shard_done, group, i))
            writer.close()
            return elapsed()

    def labelling_only() -> float:
        elapsed = timer()
        for block in dataset_blocks(dataset, range(n), s.build_batch_size):
            label_block(w.teacher, block, 0, manifest.temperature, manifest.storage.dtype, w.device)
        return elapsed()

    @torch.no_grad()
    def teacher_only() -> float:
        elapsed = timer()
        for block in dataset_blocks(dataset, range(n), s.build_batch_size):
            w.teacher(block.inputs)
        return elapsed()

    def whole_build() -> float:
        elapsed = timer()
        build(w.teacher, dataset, str(w.workdir / "stage1.zarr"), chunk_rows=s.chunk_rows,
              batch_size=s.build_batch_size, device="cpu", overwrite=True, progress=False)
        return elapsed()

    times = alternate({"write": with_writing, "label": labelling_only, "teacher": teacher_only}, s.repeats)
    whole = alternate({"build": whole_build, "teacher": teacher_only}, 2, warmup=0)
    return {
        "write_overhead": ratio(times, "write", "teacher"),
        "storage_overhead": ratio(times, "write", "label"),
        "build_vs_teacher": ratio(whole, "build", "teacher"),
        "stage1_rows": n,
    }


def measure_loaders(w: Workload) -> dict[str, float]:
    """Samples per second of each way to produce shuffled batches, without training."""
    s = w.settings
    n, bs = len(w.inputs), s.batch_size

    def tensor() -> float:
        elapsed = timer()
        order = torch.randperm(n)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            w.inputs[idx], w.soft[idx, 0], w.labels[idx]
        return elapsed()

    mem = memory_loader(w)

    def memory() -> float:
        elapsed = timer()
        for _ in mem.epoch(0):
            pass
        return elapsed()

    def stream(workers: int) -> Timed:
        loader = StreamLoader(w.cache, inputs=w.inputs, batch_size=bs, workers=workers)
        epoch = iter(range(10**9))

        def go() -> float:
            elapsed = timer()
            for _ in loader.epoch(next(epoch)):
                pass
            return elapsed()
        go.loader = loader  # type: ignore[attr-defined]
        return go

    soft_arr = w.cache.train.array(store.SOFT)
    rng = np.random.default_rng(0)
    fancy_batches = 8

    def fancy() -> float:
        elapsed = timer()
        for _ in range(fancy_batches):
            soft_arr.oindex[np.sort(rng.choice(n, bs, replace=False))]
        return elapsed()

    streams = {"stream": stream(0), "stream_2_workers": stream(2)}
    times = alternate({"tensor_indexing": tensor, "memory": memory, **streams}, s.repeats, warmup=2)
    for go in streams.values():
        go.loader.close()  # type: ignore[attr-defined]
    fancy_times = alternate({"zarr_oindex": fancy}, 3)
    out = {k: n / median(v) for k, v in times.items()}
    out["zarr_oindex_random_rows"] = fancy_batches * bs / median(fancy_times["zarr_oindex"])
    return out


def measure_threads(w: Workload) -> dict[str, float]:
    """A student step and a teacher batch at 1 and at 2 intra-op threads (alternated)."""
    before = torch.get_num_threads()
    loader = memory_loader(w)
    batch = next(iter(loader.epoch(0)))
    run = fresh_runs(w, students(1))[0]

    def at(threads: int, work: Callable[[], Any], count: int, budget_s: float = 1.0) -> Timed:
        """Seconds per call, over ``count`` calls or as many as fit in ``budget_s`` (two threads on
        a busy machine can be hundreds of times slower: the benchmark must still end)."""
        def go() -> float:
            torch.set_num_threads(threads)
            elapsed, done = timer(), 0
            while done < count and (done == 0 or elapsed() < budget_s):
                work()
                done += 1
            return elapsed() / done
        return go

    @torch.no_grad()
    def teacher() -> None:
        w.teacher(batch.inputs)

    def step() -> None:
        run.step(batch, batch.soft, w.cache.temperature)

    try:
        times = alternate({"step_1": at(1, step, 50), "step_2": at(2, step, 50),
                           "teacher_1": at(1, teacher, 5), "teacher_2": at(2, teacher, 5)}, w.settings.repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "student_step_ms_1_thread": 1e3 * median(times["step_1"]),
        "student_step_ms_2_threads": 1e3 * median(times["step_2"]),
        "student_step_2_vs_1": ratio(times, "step_2", "step_1"),
        "teacher_batch_ms_1_thread": 1e3 * median(times["teacher_1"]),
        "teacher_batch_ms_2_threads": 1e3 * median(times["teacher_2"]),
        "teacher_batch_2_vs_1": ratio(times, "teacher_2", "teacher_1"),
    }
