"""Stage 2 peak memory per loader mode, each mode measured in a fresh process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softcache._bench.workload import MLP, Workload, tiled_digits
from softcache.cache import store
from softcache.cache.store import open_cache
from softcache.config import StudentConfig
from softcache.student.loaders import open_loader
from softcache.student.run import cached_soft, fit, make_run
from softcache.student.stream import StreamLoader
from softcache.teacher.build import build

WIDE_CLASSES = 1000
PEAK_CHILD = """
import json, torch
torch.set_num_threads({threads})
from softcache._bench.memory import peak_child
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


@contextlib.contextmanager
def rss_peak(every: float = 0.002) -> Iterator[list[float]]:
    """Sample the resident memory every ``every`` seconds in a thread while the block runs; yields
    a one-item list that holds the highest sample so far (the level on entry included) and the
    highest of all once the block has ended."""
    peak, done = [current_rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(every):
            peak[0] = max(peak[0], current_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], current_rss_mb())


def peak_child(url: str, mode: str, batch_size: int) -> dict[str, float | None]:
    """Run in a fresh process: load and train one student for one epoch while a thread samples
    the resident memory every 2 ms; report the highest sample above the level before loading, and
    the peak of live array bytes."""
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
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc: the live bytes, not what malloc keeps
    with rss_peak() as peak:
        loader = open_loader(cache, inputs=inputs, batch_size=batch_size, mode=mode)  # type: ignore[arg-type]
        fit([run], loader, 1, cached_soft, cache.temperature)
        bound = loader.memory_bound() if isinstance(loader, StreamLoader) else None
        if isinstance(loader, StreamLoader):
            loader.close()
        arrays_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {"before_mb": before, "peak_mb": peak[0], "arrays_peak_mb": arrays_peak,
            "stream_bound_mb": bound / 2**20 if bound else None}


def child_report(proc: subprocess.Popen[str]) -> dict[str, float | None]:
    """The JSON line a :data:`PEAK_CHILD` process prints last, once it has ended."""
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("peak-memory child ran past 300 s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {stderr.strip().splitlines()[-1:]}")
    return json.loads(stdout.strip().splitlines()[-1])


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    modes = ("memory", "stream")
    if s.isolate_memory:  # both children at once: each measures its own peak, and the section takes half the time
        children = {mode: subprocess.Popen([sys.executable, "-c", PEAK_CHILD.format(
            threads=torch.get_num_threads(), url=url, mode=mode, batch_size=256)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for mode in modes}
        try:
            reports = {mode: child_report(proc) for mode, proc in children.items()}
        finally:  # a child that failed leaves none running
            for proc in children.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    else:
        reports = {mode: peak_child(url, mode, 256) for mode in modes}
    for mode, child in reports.items():
        out[mode] = {"peak_mb": child["peak_mb"], "added_mb": child["peak_mb"] - child["before_mb"],
                     "arrays_peak_mb": child["arrays_peak_mb"]}
        if child["stream_bound_mb"] is not None:
            out["stream_bound_mb"] = child["stream_bound_mb"]
    return out


# -- the whole benchmark ---------------------------------------------------------------------
