"""``softcache bench``: the performance claims, measured side by side in one process.

Every figure is a ratio of two runs made in the same process, alternated (A B, then B A, ...) so
that a machine busy with other work slows both alike; each ratio is the median of the per-round
ratios. Absolute times are reported too, but only the ratios are comparable across machines.

What runs: the embedded digits images tiled with a little noise to ``rows`` samples; the demo's
students (the 64-32-10 MLP, the tiny CNN); a teacher of the demo's architecture at width 64
(randomly initialised: timings do not depend on the weights), wide enough to cost over 10x a
student step; a cache built by :func:`softcache.teacher.build.build` with the default settings except
``chunk_rows``. Timing thresholds live here, never in unit tests.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softcache.cache import store
from softcache.teacher.build import build, dataset_blocks, label_block, split_writer, write_split
from softcache.config import StudentConfig
from softcache.data import materialize
from softcache.digits import LabelledTensors, load
from softcache.student.loaders import MemoryLoader
from softcache.models import teacher_cnn
from softcache.progress import Progress
from softcache.cache.store import Cache, open_cache
from softcache.student.stream import StreamLoader, open_loader
from softcache.student.train import StudentRun, cached_soft, fit, make_run, online_soft

MLP = "softcache.models:mlp,hidden=32"
TINY = "softcache.models:tiny_cnn"
TEACHER_WIDTH = 96

TARGETS: dict[str, tuple[str, float]] = {
    "store_vs_memory_epoch": ("<=", 1.05),
    "streaming_vs_memory_epoch": ("<=", 1.10),
    "group_vs_separate_speedup": (">=", 4.0),
    "write_overhead": ("<=", 1.03),
}


@dataclass(frozen=True)
class BenchSettings:
    rows: int  # rows of the benchmark cache
    chunk_rows: int
    batch_size: int
    epochs: int  # epochs per run in the store-vs-tensor comparison (the one-time load is amortised over them)
    repeats: int  # alternated rounds per comparison
    students: int  # K of the grouped-vs-separate comparison
    sample_rows: int  # rows used where a ratio does not depend on the size (online KD, tiny CNN group)
    wide_rows: int  # rows of the 1000-class cache of the peak-memory comparison
    build_batch_size: int = 256
    isolate_memory: bool = True  # measure peak memory in fresh processes (False: in this one, for tests)

    @staticmethod
    def preset(quick: bool) -> BenchSettings:
        if quick:
            return BenchSettings(rows=8192, chunk_rows=2048, batch_size=64, epochs=5, repeats=5, students=8,
                                 sample_rows=2048, wide_rows=16384)
        return BenchSettings(rows=32768, chunk_rows=4096, batch_size=64, epochs=5, repeats=7, students=8,
                             sample_rows=8192, wide_rows=65536)


# -- timing ----------------------------------------------------------------------------------

Timed = Callable[[], float]
"""Runs once and returns the seconds of the part being measured (set-up excluded)."""


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def alternate(runs: dict[str, Timed], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, interleaved, the order reversed every other round."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(runs[name]())
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- the workload ----------------------------------------------------------------------------


@dataclass
class Workload:
    settings: BenchSettings
    inputs: torch.Tensor
    labels: torch.Tensor
    dataset: LabelledTensors
    teacher: nn.Module
    cache: Cache
    soft: torch.Tensor  # (N, V, C) float32, what memory mode holds
    workdir: Path
    device: torch.device


def tiled_digits(rows: int, seed: int = 0) -> LabelledTensors:
    """The digits training images repeated to ``rows`` samples, each copy with fresh noise."""
    x, y = materialize(load("train"))
    reps = -(-rows // len(x))
    gen = torch.Generator().manual_seed(seed)
    xs = (x.repeat(reps, 1, 1, 1)[:rows] + 0.05 * torch.randn((rows, *x.shape[1:]), generator=gen)).clamp(0, 1)
    ys = y.repeat(reps)[:rows]
    info = {"name": "digits tiled for softcache bench", "rows": rows, "seed": seed}
    return LabelledTensors(xs.contiguous(), ys.contiguous(), [str(i) for i in range(10)], info)


def make_workload(settings: BenchSettings, workdir: Path) -> Workload:
    torch.manual_seed(0)
    teacher = teacher_cnn(width=TEACHER_WIDTH).eval()
    dataset = tiled_digits(settings.rows)
    url = str(workdir / "bench.zarr")
    cache = build(teacher, dataset, url, chunk_rows=settings.chunk_rows, batch_size=settings.build_batch_size,
                  device="cpu", overwrite=True, progress=False)
    soft = torch.from_numpy(cache.train.soft_labels(view=None))
    return Workload(settings, dataset.inputs, dataset.labels, dataset, teacher, cache, soft, workdir, torch.device("cpu"))


def students(k: int, spec: str = MLP) -> list[StudentConfig]:
    """A sweep of ``k`` students of one architecture with different T, alpha, lr and seed."""
    temps, alphas, lrs = [2.0, 4.0, 8.0], [0.5, 0.9, 0.0, 1.0], [0.01, 0.003]
    return [StudentConfig(spec=spec, temperature=temps[i % 3], alpha=alphas[i % 4], lr=lrs[i % 2], seed=i)
            for i in range(k)]


def fresh_runs(w: Workload, configs: Sequence[StudentConfig]) -> list[StudentRun]:
    return [make_run(c, w.cache.num_classes, w.inputs[:2], w.device) for c in configs]


def memory_loader(w: Workload, rows: int | None = None) -> MemoryLoader:
    n = rows or len(w.inputs)
    return MemoryLoader(w.inputs[:n], w.soft[:n], w.labels[:n], batch_size=w.settings.batch_size, shuffle_seed=0)


# -- measurements ----------------------------------------------------------------------------


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

    times = alternate({"tensor": in_tensor, "memory": from_store("memory"), "stream": from_store("stream")}, s.repeats)
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


def sample_loader(w: Workload) -> MemoryLoader:
    return memory_loader(w, min(len(w.inputs), w.settings.sample_rows))


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
        with Progress(total=n, desc="bench", enabled=False) as bar:
            elapsed = timer()
            writer = split_writer(group, manifest)
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


WIDE_CLASSES = 1000
PEAK_CHILD = """
import json, torch
torch.set_num_threads({threads})
from softcache._bench import peak_child
print(json.dumps(peak_child({url!r}, {mode!r}, {batch_size})))
"""


def current_rss_mb() -> float:
    """Resident memory now (Linux ``/proc``; elsewhere the peak so far, the best available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_child(url: str, mode: str, batch_size: int) -> dict[str, float | None]:
    """Run in a fresh process: load and train one student for one epoch while a thread samples
    the resident memory every 2 ms; report the highest sample above the level before loading, and
    the peak of live array bytes."""
    import threading
    import tracemalloc

    cache = open_cache(url)
    inputs = tiled_digits(cache.train.rows).inputs
    run = make_run(StudentConfig(spec=f"{MLP},num_classes={cache.num_classes}"), cache.num_classes, inputs[:2],
                   torch.device("cpu"))
    warm = torch.optim.Adam(run.model.parameters())  # let torch's allocator and kernels settle first
    for _ in range(3):
        warm.zero_grad()
        run.model(inputs[:batch_size]).logsumexp(-1).mean().backward()
    warm.zero_grad()
    before = current_rss_mb()
    peak, done = [before], threading.Event()
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc: the live bytes, not what malloc keeps

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], current_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    loader = open_loader(cache, inputs=inputs, batch_size=batch_size, mode=mode)  # type: ignore[arg-type]
    fit([run], loader, 1, cached_soft, cache.temperature)
    bound = loader.memory_bound() if isinstance(loader, StreamLoader) else None
    if isinstance(loader, StreamLoader):
        loader.close()
    arrays_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], current_rss_mb())
    return {"before_mb": before, "peak_mb": peak[0], "arrays_peak_mb": arrays_peak,
            "stream_bound_mb": bound / 2**20 if bound else None}


def measure_memory(w: Workload) -> dict[str, Any]:
    """Stage 2 peak memory per loader mode, on a 1000-class cache where soft labels dominate;
    each mode in a fresh process, since peak RSS is per process."""
    s = w.settings
    url = str(w.workdir / "wide.zarr")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, WIDE_CLASSES))
    cache = build(teacher, tiled_digits(s.wide_rows), url, chunk_rows=s.chunk_rows, batch_size=1024, device="cpu",
                  overwrite=True, progress=False)
    soft = cache.train.array(store.SOFT)
    out: dict[str, Any] = {"rows": s.wide_rows, "classes": WIDE_CLASSES,
                           "stored_mb": int(np.prod(soft.shape)) * soft.dtype.itemsize / 2**20,
                           "float32_in_ram_mb": int(np.prod(soft.shape)) * 4 / 2**20}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    for mode in ("memory", "stream"):
        if s.isolate_memory:
            code = PEAK_CHILD.format(threads=torch.get_num_threads(), url=url, mode=mode, batch_size=256)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"peak-memory child failed: {proc.stderr.strip().splitlines()[-1:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            child = peak_child(url, mode, 256)
        out[mode] = {"peak_mb": child["peak_mb"], "added_mb": child["peak_mb"] - child["before_mb"],
                     "arrays_peak_mb": child["arrays_peak_mb"]}
        if child["stream_bound_mb"] is not None:
            out["stream_bound_mb"] = child["stream_bound_mb"]
    return out


# -- the whole benchmark ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import zarr

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "zarr": zarr.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_bench(quick: bool = False, workdir: str | Path | None = None, log: Callable[[str], None] | None = None,
              command: str | None = None, settings: BenchSettings | None = None) -> dict[str, Any]:
    """Measure everything and return one JSON-ready object (see the module docstring)."""
    settings = settings or BenchSettings.preset(quick)
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="softcache-bench-")) if owned else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": command, "quick": quick, "machine": machine(),
                              "settings": settings.__dict__ | {"teacher": f"teacher_cnn(width={TEACHER_WIDTH})",
                                                               "student": MLP}}
    try:
        say(f"building a {settings.rows}-row cache")
        w = make_workload(settings, root)
        steps: list[tuple[str, Callable[[Workload], dict[str, Any]]]] = [
            ("stage 1: writing vs teacher alone", measure_stage1),
            ("stage 2: epochs from the store vs from a tensor", measure_epochs),
            ("online vs cached distillation", measure_online),
            (f"{settings.students} students grouped vs separate", measure_group),
            ("loader throughput", measure_loaders),
            ("threads", measure_threads),
            ("stage 2 peak memory", measure_memory),
        ]
        sections: dict[str, float] = {}
        result["section_seconds"] = sections
        for title, fn in steps:
            say(title)
            began = time.perf_counter()
            part = fn(w)
            sections[fn.__name__.removeprefix("measure_")] = round(time.perf_counter() - began, 1)
            if fn is measure_group:
                result["group_vs_separate_speedup"] = part.pop("speedup")
                result["group"] = part
                say(f"{settings.students} tiny CNN students grouped vs separate")
                cnn = measure_group(w, TINY, rows=min(len(w.inputs), settings.sample_rows))
                result["group_vs_separate_speedup_tiny_cnn"] = cnn.pop("speedup")
                result["group_tiny_cnn"] = cnn
            elif fn is measure_loaders:
                result["loader_samples_per_s"] = part
            elif fn is measure_threads:
                result["threads"] = part
            elif fn is measure_memory:
                result["stage2_peak_memory"] = part
            else:
                result.update(part)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    result["targets"] = {key: {"value": result[key], "target": f"{op} {limit:g}",
                               "met": bool(result[key] <= limit if op == "<=" else result[key] >= limit)}
                         for key, (op, limit) in TARGETS.items()}
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def format_report(r: dict[str, Any]) -> str:
    """The figures as the README table prints them."""
    def target(key: str) -> str:
        t = r["targets"].get(key)
        return f"{t['target']} ({'met' if t['met'] else 'NOT met'})" if t else ""

    k = r["settings"]["students"]
    rows = [
        ("epoch from store (in-RAM mode) / epoch from tensor", f"{r['store_vs_memory_epoch']:.3f}",
         target("store_vs_memory_epoch")),
        ("epoch from store (streaming) / epoch from tensor", f"{r['streaming_vs_memory_epoch']:.3f}",
         target("streaming_vs_memory_epoch")),
        ("crc32c checks per full read of the soft labels", f"{1000 * r['checksum_seconds_per_read']:.2f} ms",
         f"{100 * r['checksum_share_of_stream_epoch']:.2f}% of a streaming epoch (both ratios above include it)"),
        ("online KD epoch / cached KD epoch", f"{r['online_vs_cached_epoch']:.2f}",
         f"ideal (teacher+student)/student {r['online_vs_cached_ideal']:.2f}; "
         f"teacher = {r['teacher_vs_student_cost']:.1f}x student"),
        (f"{k} MLP students: separate runs / one grouped pass", f"{r['group_vs_separate_speedup']:.2f}x",
         target("group_vs_separate_speedup") + f"; one pass ungrouped {r['group']['one_pass_speedup']:.2f}x"),
        (f"{k} tiny CNN students: separate runs / one grouped pass", f"{r['group_vs_separate_speedup_tiny_cnn']:.2f}x",
         f"one pass ungrouped {r['group_tiny_cnn']['one_pass_speedup']:.2f}x"),
        ("stage 1 with writing / teacher inference alone", f"{r['write_overhead']:.3f}",
         target("write_overhead") + f"; vs labelling without storage {r['storage_overhead']:.3f}"),
        ("whole build() / teacher inference alone", f"{r['build_vs_teacher']:.3f}",
         f"store creation and finalisation included, {r['stage1_rows']} rows"),
    ]
    for name, value in r["loader_samples_per_s"].items():
        rows.append((f"loader samples/s: {name.replace('_', ' ')}", f"{value:,.0f}", ""))
    mem = r["stage2_peak_memory"]
    for mode in ("memory", "stream"):
        rows.append((f"stage 2 peak memory, {mode} mode ({mem['classes']} classes x {mem['rows']} rows)",
                     f"{mem[mode]['arrays_peak_mb']:.0f} MB",
                     f"live arrays; RSS +{mem[mode]['added_mb']:.0f} MB (peak {mem[mode]['peak_mb']:.0f} MB)"))
    rows.append(("  soft labels: stored / float32 in RAM / stream bound",
                 f"{mem['stored_mb']:.0f} / {mem['float32_in_ram_mb']:.0f} / {mem['stream_bound_mb']:.0f} MB", ""))
    th = r["threads"]
    rows.append(("student step, 2 threads / 1 thread", f"{th['student_step_2_vs_1']:.2f}",
                 f"{th['student_step_ms_1_thread']:.3f} ms at 1 thread"))
    rows.append(("teacher batch, 2 threads / 1 thread", f"{th['teacher_batch_2_vs_1']:.2f}",
                 f"{th['teacher_batch_ms_1_thread']:.2f} ms at 1 thread"))
    width = max(len(a) for a, _, _ in rows)
    vwidth = max(len(b) for _, b, _ in rows)
    m, s = r["machine"], r["settings"]
    lines = [f"softcache bench{' --quick' if r['quick'] else ''}: {s['rows']} rows, chunk {s['chunk_rows']}, "
             f"batch {s['batch_size']}, {s['epochs']} epoch(s) x {s['repeats']} alternated rounds",
             f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), "
             f"zarr {m['zarr']}, load {m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}"
             if m.get("load_average_start") else f"machine: {m['cpu']}, {m['cores']} cores", ""]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c}".rstrip() for a, b, c in rows]
    lines.append(f"\n({r['seconds']:.0f} s)")
    return "\n".join(lines)
