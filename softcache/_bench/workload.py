"""What every measurement runs on: the settings, the tiled digits data, a teacher of the
demo's architecture and the cache it labels, and the students of a sweep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softcache.cache.store import Cache
from softcache.config import StudentConfig
from softcache.data import LabelledTensors, materialize
from softcache.digits import load
from softcache.models import teacher_cnn
from softcache.student.loaders import MemoryLoader
from softcache.student.run import StudentRun, make_run
from softcache.teacher.build import build

MLP = "softcache.models:mlp,hidden=32"
TINY = "softcache.models:tiny_cnn"
TEACHER_WIDTH = 96


@dataclass(frozen=True)
class WideSettings:
    rows: int  # rows of the cache the train() comparisons read
    build_rows: int  # rows labelled in the build() vs teacher comparison
    repeats: int = 3
    # the build() comparison's: its target (1.03) is a few percent, and two balanced rounds' ratios
    # differed by up to 0.1 on the 2-core machine the figures were measured on
    build_repeats: int = 7
    students: int = 8
    epochs: int = 2  # of the one-student train() comparisons
    group_epochs: int = 1
    batch_size: int = 256
    features: int = 256
    classes: int = 1000
    teacher_hidden: int = 2048
    student_hidden: int = 256

    @staticmethod
    def preset(quick: bool) -> WideSettings:
        # the full run labels as many rows as it trains on (the size the targets are stated at); the
        # quick one 1/16 as many, where the build's fixed part weighs more (reported beside it)
        # quick: one balanced round (A B B A) per comparison, so that ``--quick`` stays near two minutes
        return WideSettings(rows=4096, build_rows=4096, repeats=2, build_repeats=2) if quick else \
            WideSettings(rows=65536, build_rows=65536)

    def student_spec(self) -> str:
        return f"softcache.models:mlp,hidden={self.student_hidden},in_features={self.features},num_classes={self.classes}"

    def describe(self) -> dict[str, Any]:
        return self.__dict__ | {"teacher": f"MLP {self.features}-{self.teacher_hidden}-{self.teacher_hidden}-"
                                           f"{self.classes}", "student": self.student_spec(), "threads": 1}


@dataclass(frozen=True)
class LMSettings:
    rows: int  # token rows labelled in the build() vs teacher comparison (the steps then train on them)
    steps: int  # student steps per timed run
    stream_rows: tuple[int, int]  # rows of the two caches whose streaming memory bounds are compared
    repeats: int = 3
    vocab: int = 8192
    length: int = 64
    teacher_layers: int = 4
    teacher_width: int = 256
    student_layers: int = 2
    student_width: int = 128
    k: int = 64  # storage topk:k
    batch_size: int = 32  # rows per teacher call and per student step
    stream_chunk_rows: int = 8  # chunking of the two streamed caches, so that both span several chunks

    @staticmethod
    def preset(quick: bool) -> LMSettings:
        return LMSettings(rows=128, steps=2, stream_rows=(16, 48), repeats=2) if quick else \
            LMSettings(rows=2048, steps=8, stream_rows=(64, 512), repeats=5)

    def model_spec(self, layers: int, width: int) -> str:
        return f"softcache.models:gpt,vocab_size={self.vocab},length={self.length},layers={layers},width={width}"

    def describe(self) -> dict[str, Any]:
        return self.__dict__ | {"teacher": self.model_spec(self.teacher_layers, self.teacher_width),
                                "student": self.model_spec(self.student_layers, self.student_width),
                                "storage": f"topk:{self.k}", "threads": 1}


@dataclass(frozen=True)
class StorageSettings:
    """Sizes of the storage-mode comparison (``softcache bench --storage-modes``,
    :mod:`softcache._bench.storage`); the teachers, students, batch sizes, learning rates, alphas
    and temperatures are the demos' own. ``None`` keeps a demo's own size."""

    lm_modes: tuple[str, ...] = ("full", "topk:16", "topk:64", "sample:50", "sample:12")
    digits_modes: tuple[str, ...] = ("full", "topk:3", "topk:5", "sample:12", "sample:50")
    seeds: tuple[int, ...] = (0, 1, 2)
    workloads: tuple[str, ...] = ("digits", "lm")  # which of the two comparisons run
    lm_rows: int | None = None  # token rows the language-model students train on (the demo's budget)
    lm_eval_rows: int | None = None  # held-out rows the students and the teacher are scored on (all)
    digits_epochs: int | None = None  # of the digits students (the demo's)
    digits_teacher_epochs: int | None = None  # of the digits teacher (the demo's)
    angle_batches: int = 8  # held-out batches the gradient angles are averaged over
    steps: int = 8  # student steps per timed run
    repeats: int = 5  # alternated rounds of the step timing

    @staticmethod
    def tiny() -> StorageSettings:
        """Every figure at toy sizes: seconds, for tests and ``--quick``."""
        return StorageSettings(seeds=(0, 1), lm_rows=32, lm_eval_rows=32, digits_epochs=2, digits_teacher_epochs=2,
                               angle_batches=2, steps=2, repeats=1)

    @staticmethod
    def preset(quick: bool) -> StorageSettings:
        return StorageSettings.tiny() if quick else StorageSettings()


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
    wide: WideSettings | None = None  # the 1,000-class section (softcache._bench.wide); None skips it
    lm: LMSettings | None = None  # the language-model section (softcache._bench.lm); None skips it

    @staticmethod
    def preset(quick: bool) -> BenchSettings:
        if quick:
            return BenchSettings(rows=8192, chunk_rows=2048, batch_size=64, epochs=5, repeats=3, students=8,
                                 sample_rows=2048, wide_rows=16384, wide=WideSettings.preset(True),
                                 lm=LMSettings.preset(True))
        return BenchSettings(rows=32768, chunk_rows=4096, batch_size=64, epochs=5, repeats=7, students=8,
                             sample_rows=8192, wide_rows=65536, wide=WideSettings.preset(False),
                             lm=LMSettings.preset(False))


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


def sample_loader(w: Workload) -> MemoryLoader:
    return memory_loader(w, min(len(w.inputs), w.settings.sample_rows))
