"""The benchmark at the size users run: 1,000 classes, a real student, the whole public call.

The digits figures measure softcache's machinery where it is cheapest to see (10 classes, ~2k
parameter students); this section measures what a user pays through ``softcache.train()`` and
``softcache.build()`` against the plain PyTorch a user would otherwise write, included here
(:func:`hand_written`): an in-RAM fp16 tensor of the same cached logits, the same loss, Adam,
batch 256. Setup: random inputs of 256 features; a teacher MLP 256-2048-2048-1000 (random
weights: timings do not depend on them); student MLP 256-256-1000; one torch thread. Every
ratio is the median of per-round ratios of balanced rounds (A B B A: the mean of each run's two times,
so a drift of the machine's speed within a round cancels; :mod:`softcache._bench.timing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softcache._bench.timing import alternate, balanced_rounds, median, ratio, timer
from softcache._bench.workload import WideSettings, students
from softcache.cache.store import Cache
from softcache.config import StudentConfig, TrainConfig
from softcache.data import LabelledTensors
from softcache.models import mlp
from softcache.student.train import train
from softcache.teacher.build import build


@dataclass
class WideWorkload:
    settings: WideSettings
    dataset: LabelledTensors
    teacher: nn.Module
    cache: Cache
    soft16: torch.Tensor  # (N, C) the cached z / T_cache as an fp16 tensor: what a hand-written loop holds
    workdir: Path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_wide(s: WideSettings, workdir: Path) -> WideWorkload:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s.rows, s.features, generator=gen)
    y = torch.randint(0, s.classes, (s.rows,), generator=gen)
    dataset = LabelledTensors(x, y, None, {"name": "random features for softcache bench", "rows": s.rows})
    torch.manual_seed(0)
    teacher = mlp(hidden=s.teacher_hidden, num_classes=s.classes, in_features=s.features, depth=2).eval()
    cache = build(teacher, dataset, str(workdir / "wide.zarr"), chunk_rows=4096, batch_size=s.batch_size,
                  device="cpu", overwrite=True, progress=False)
    soft16 = torch.from_numpy(cache.train.soft_labels()).half()
    return WideWorkload(s, dataset, teacher, cache, soft16, workdir)


def hand_written(w: WideWorkload, cfg: StudentConfig, epochs: int, teacher: nn.Module | None = None,
                 fused: bool = False) -> float:
    """The loop a user writes without softcache; returns its seconds (building the model
    excluded, as in ``train()``'s own ``train`` figure it is not). ``fused``: the same loop with
    torch's fused Adam kernel, the optimizer ``train()`` steps its students with, so the two
    references separate what the kernel gives from what the rest of ``train()`` costs."""
    s, x, y = w.settings, w.dataset.inputs, w.dataset.labels
    torch.manual_seed(cfg.seed)
    model = mlp(hidden=s.student_hidden, num_classes=s.classes, in_features=s.features)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    t, a, scale = cfg.temperature, cfg.alpha, w.cache.temperature / cfg.temperature
    elapsed = timer()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), s.batch_size):
            idx = order[i : i + s.batch_size]
            xb, yb = x[idx], y[idx]
            if teacher is None:
                target = w.soft16[idx].float() * scale
            else:
                with torch.no_grad():
                    target = teacher(xb) / cfg.temperature
            loss = kd_loss(model(xb), target, yb, t, a)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return elapsed()


def kd_loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, t: float, a: float) -> torch.Tensor:
    """Knowledge distillation as a user writes it (``target`` is the teacher's logits / T)."""
    loss = logits.new_zeros(())
    if a > 0:
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target, -1), reduction="batchmean", log_target=True)
        loss = loss + a * t * t * kl
    if a < 1:
        loss = loss + (1 - a) * F.cross_entropy(logits, labels)
    return loss


def softcache_train(w: WideWorkload, configs: Sequence[StudentConfig], epochs: int, loader: str,
                    seconds: list[dict[str, float]] | None = None) -> float:
    """The whole public call, as a user makes it (the data given, so it is fingerprinted)."""
    elapsed = timer()
    result = train(w.cache, list(configs), data=w.dataset, progress=False,
                   config=TrainConfig(epochs=epochs, batch_size=w.settings.batch_size, loader=loader))
    total = elapsed()
    if seconds is not None:
        seconds.append(result.seconds)
    return total


def measure_wide(s: WideSettings, workdir: Path) -> dict[str, Any]:
    """Every 1,000-class figure; see the module docstring."""
    with one_thread():
        w = make_wide(s, workdir)
        cfg = StudentConfig(spec=s.student_spec())
        rounds = balanced_rounds(s.repeats)
        parts: list[dict[str, float]] = []
        single = alternate({
            "memory": lambda: softcache_train(w, [cfg], s.epochs, "memory", parts),
            "stream": lambda: softcache_train(w, [cfg], s.epochs, "stream"),
            "hand": lambda: hand_written(w, cfg, s.epochs),
            "hand_fused": lambda: hand_written(w, cfg, s.epochs, fused=True),
        }, rounds, balanced=True)
        first, parts = parts[0], parts[-2 * rounds :]  # the warm-up call (the process's first), the timed ones
        sweep = students(s.students, s.student_spec())
        group = alternate({
            "grouped": lambda: softcache_train(w, sweep, s.group_epochs, "memory"),
            "separate": lambda: sum(hand_written(w, c, s.group_epochs) for c in sweep),
        }, rounds, balanced=True)
        online = alternate({
            "cached": lambda: softcache_train(w, [cfg], 1, "memory"),
            # with the optimizer train() uses, so that the two differ by the teacher alone
            "online": lambda: hand_written(w, cfg, 1, teacher=w.teacher, fused=True),
            "teacher": lambda: teacher_alone(w, len(w.dataset.inputs)),
        }, rounds, balanced=True)
        inside: list[tuple[float, float]] = []  # each full-size build, and its teacher's calls
        stage1 = alternate({
            "build": lambda: whole_build(w, s.build_rows, inside), "teacher": lambda: teacher_alone(w, s.build_rows),
            "build_one_batch": lambda: whole_build(w, s.batch_size),
            "teacher_one_batch": lambda: teacher_alone(w, s.batch_size),
        }, balanced_rounds(s.build_repeats), balanced=True)
    ideal = median([(c + t) / c for c, t in zip(online["cached"], online["teacher"])])
    online_ratio = ratio(online, "online", "cached")
    # what a build costs beyond its teacher whatever its size (store, digests, finalize), from a
    # build of one batch, measured in each round beside the full-size one
    fixed = [b - t for b, t in zip(stage1["build_one_batch"], stage1["teacher_one_batch"])]
    # the timed builds, two a balanced round (alternate() warms up first); a round's teacher calls
    # are the mean of its two builds', as its build time is
    timed = inside[len(inside) - 2 * len(stage1["build"]):]
    calls = [(timed[2 * i][1] + timed[2 * i + 1][1]) / 2 for i in range(len(stage1["build"]))]
    return {
        "settings": s.describe(),
        "train_memory_vs_hand_written": ratio(single, "memory", "hand"),
        "train_stream_vs_hand_written": ratio(single, "stream", "hand"),
        # the same two against a hand-written loop that also uses the fused Adam kernel
        "train_memory_vs_hand_written_fused": ratio(single, "memory", "hand_fused"),
        "train_stream_vs_hand_written_fused": ratio(single, "stream", "hand_fused"),
        "train_seconds_by_part": {k: median([p[k] for p in parts]) for k in parts[0]} if parts else {},
        # the epochs alone (train()'s own ``train`` seconds) against the hand-written loop: per-step overhead
        "train_loop_vs_hand_written": median([(p["train"] + q["train"]) / 2 / h for p, q, h in
                                              zip(parts[::2], parts[1::2], single["hand"])]) if parts else 0.0,
        # what the process's first train() of this student paid on top (choosing stacked or one by one,
        # softcache.student._choice; later calls reuse the choice)
        "train_first_call_extra_seconds": first["train"] - median([p["train"] for p in parts]) if parts else 0.0,
        "group_vs_separate_speedup": ratio(group, "separate", "grouped"),
        "build_vs_teacher": ratio(stage1, "build", "teacher"),
        "build_fixed_seconds": median(fixed),
        "build_vs_teacher_beyond_fixed": median([(b - f) / t
                                                 for b, f, t in zip(stage1["build"], fixed, stage1["teacher"])]),
        # the same question asked inside each build, free of the drift between separate runs: the
        # build over its own teacher calls, and those calls over the plain loop's
        "build_vs_own_teacher_calls": median([b / i for b, i in timed]),
        "teacher_calls_in_build_vs_alone": median([c / t for c, t in zip(calls, stage1["teacher"])]),
        "online_vs_cached_train": online_ratio,
        "online_vs_cached_ideal": ideal,
        "online_fraction_of_ideal": online_ratio / ideal,
        "seconds": {k: median(v) for k, v in {**single, **group, **{f"online_{k}": v for k, v in online.items()},
                                              **{f"stage1_{k}": v for k, v in stage1.items()}}.items()},
    }


@torch.no_grad()
def teacher_alone(w: WideWorkload, rows: int) -> float:
    x, bs = w.dataset.inputs[:rows], w.settings.batch_size
    elapsed = timer()
    for i in range(0, rows, bs):
        w.teacher(x[i : i + bs])
    return elapsed()


def whole_build(w: WideWorkload, rows: int, record: list[tuple[float, float]] | None = None) -> float:
    """The public ``build()`` of the first ``rows`` rows, over the previous build of that size;
    ``(seconds, seconds of its teacher's calls)`` (``build_report``) is appended to ``record``."""
    subset = LabelledTensors(w.dataset.inputs[:rows], w.dataset.labels[:rows], None, {"rows": rows})
    elapsed = timer()
    cache = build(w.teacher, subset, str(w.workdir / f"wide-build-{rows}.zarr"), chunk_rows=4096,
                  batch_size=w.settings.batch_size, device="cpu", overwrite=True, progress=False)
    seconds = elapsed()
    if record is not None and cache.build_report is not None:
        record.append((seconds, cache.build_report["teacher_seconds"]))
    return seconds


def format_wide(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's rows for the printed table, beside the digits figures."""
    s = r["settings"]
    size = f"{s['classes']} classes, {s['rows']} rows"
    return [
        (f"[{size}] train() {s['epochs']} epochs, memory loader / hand-written loop",
         f"{r['train_memory_vs_hand_written']:.2f}",
         f"target <= 1.05; epochs alone {r['train_loop_vs_hand_written']:.2f}, "
         f"{sum(v for k, v in r['train_seconds_by_part'].items() if k != 'train'):.2f} s fixed, "
         f"first call {r['train_first_call_extra_seconds']:+.2f} s; "
         f"{r['train_memory_vs_hand_written_fused']:.2f} of a loop with fused Adam"),
        (f"[{size}] train() {s['epochs']} epochs, stream loader / hand-written loop",
         f"{r['train_stream_vs_hand_written']:.2f}",
         f"target <= 1.10; {r['train_stream_vs_hand_written_fused']:.2f} of a loop with fused Adam"),
        (f"[{size}] {s['students']} hand-written runs / one grouped train()", f"{r['group_vs_separate_speedup']:.2f}x",
         "target >= 1.0"),
        (f"[{size}] build() / teacher forward alone ({s['build_rows']} rows)", f"{r['build_vs_teacher']:.2f}",
         f"target <= 1.03; {r['build_fixed_seconds']:.2f} s fixed, {r['build_vs_teacher_beyond_fixed']:.2f} beyond it"
         + (f"; {r['build_vs_own_teacher_calls']:.3f} of its own teacher calls, which took "
            f"{r['teacher_calls_in_build_vs_alone']:.3f} of the plain loop's time"
            if "build_vs_own_teacher_calls" in r else "")),  # JSON from before the split has none
        (f"[{size}] online KD (hand-written) / cached train()", f"{r['online_vs_cached_train']:.2f}",
         f"ideal {r['online_vs_cached_ideal']:.2f}, {r['online_fraction_of_ideal']:.2f} of ideal (target >= 0.95)"),
    ]
