"""``softcache bench``: the performance claims, measured side by side in one process.

Every figure is a ratio of two runs made in the same process, alternated (A B, then B A, ...) so
that a machine busy with other work slows both alike; each ratio is the median of the per-round
ratios. Absolute times are reported too, but only the ratios are comparable across machines.

What runs: the embedded digits images tiled with a little noise to ``rows`` samples; the demo's
students (the 64-32-10 MLP, the tiny CNN); a teacher of the demo's architecture at width 96
(randomly initialised: timings do not depend on the weights), wide enough to cost over 10x a
student step; a cache built by :func:`softcache.teacher.build.build` with the default settings except
``chunk_rows``. Beside these, :mod:`softcache._bench.wide` measures the size users run (1,000
classes, a 256-256-1000 student) through the public ``train()``/``build()`` calls against a
hand-written PyTorch loop (JSON key ``wide``), and :mod:`softcache._bench.lm` language-model caches
(an 8,192-token vocabulary, top-k storage, a GPT teacher and student; JSON key ``lm``, whose
``lm_*`` ratios have targets here). Timing thresholds live here, never in unit tests.

``softcache bench --storage-modes`` runs :mod:`softcache._bench.storage` instead (not part of this
run): what each soft-label storage mode costs and loses on the demos' teachers and students.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from softcache._bench.measure import measure_epochs, measure_group, measure_loaders, measure_online, measure_stage1, \
    measure_threads
from softcache._bench.lm import measure_lm
from softcache._bench.memory import measure_memory
from softcache._bench.timing import alternate, ratio
from softcache._bench.wide import measure_wide
from softcache._bench.workload import MLP, TEACHER_WIDTH, TINY, BenchSettings, Workload, make_workload

__all__ = ["TARGETS", "BenchSettings", "alternate", "ratio", "run_bench"]

TARGETS: dict[str, tuple[str, float]] = {
    "store_vs_memory_epoch": ("<=", 1.05),
    "streaming_vs_memory_epoch": ("<=", 1.10),
    "group_vs_separate_speedup": (">=", 4.0),
    "write_overhead": ("<=", 1.03),
    "lm_write_overhead": ("<=", 1.05),
    "lm_kd_vs_ce_step": ("<=", 1.15),
}


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
                              "settings": {k: v for k, v in settings.__dict__.items() if k not in ("wide", "lm")}
                              | {"teacher": f"teacher_cnn(width={TEACHER_WIDTH})", "student": MLP}}
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
        if settings.wide is not None:
            say(f"{settings.wide.classes} classes: train() and build() vs hand-written PyTorch")
            began = time.perf_counter()
            result["wide"] = measure_wide(settings.wide, root)
            sections["wide"] = round(time.perf_counter() - began, 1)
        if settings.lm is not None:
            say(f"language model (vocabulary {settings.lm.vocab}, topk:{settings.lm.k}): build() vs teacher, "
                "distilling vs cross-entropy step, streaming bound")
            began = time.perf_counter()
            result["lm"] = measure_lm(settings.lm, root)
            sections["lm"] = round(time.perf_counter() - began, 1)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    figures = {**result.get("lm", {}), **result}  # a section's targets are named in it (lm_*)
    result["targets"] = {key: {"value": figures[key], "target": f"{op} {limit:g}",
                               "met": bool(figures[key] <= limit if op == "<=" else figures[key] >= limit)}
                         for key, (op, limit) in TARGETS.items() if key in figures}
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
