"""The benchmark of language-model caches: capture and distillation at the size users run.

Setup: random token rows (:class:`~softcache.sequences.TokenRows`; timings do not depend on the
tokens or the weights) of 64 positions over a vocabulary of 8,192; a teacher
``softcache.models:gpt`` of 4 layers, 256 wide, and a student of 2 layers, 128 wide (random
weights); storage ``topk:64``; 32 rows per teacher call and per student step; one torch thread, as
in :mod:`softcache._bench.wide` (the build's writer thread then has the second core). Every ratio
is the median of per-round ratios of alternated runs (:mod:`softcache._bench.timing`); the
build's, whose runs last tens of seconds, of balanced rounds (A B B A).

- ``lm_write_overhead``: the whole public ``softcache.build()`` (manifest, teacher, top-k and
  statistics in the writer thread, chunk writes, finalize) over the token rows / a hand-written
  ``torch.no_grad`` loop of the teacher alone over the same rows in batches of the same size.
  ``label_ms_per_batch`` beside ``teacher_ms_per_batch`` says where a miss comes from: the writer
  thread labels a batch (``teacher.label.stored_arrays``) while the teacher runs the next, so the
  build cannot run faster than the slower of the two.
- ``lm_kd_vs_ce_step``: ``StudentRun.step`` on batches of a ``SequenceLoader`` distilling from the
  top-k cache (alpha 0.5, leftover bucket) / the same step with cross-entropy only (alpha 0), and
  the latter / a hand-written cross-entropy step (:func:`hand_ce_steps`).
- tokens per second: capture (rows x positions / ``build()`` seconds) and training (the
  distilling step's tokens / seconds).
- ``stream``: the streaming loader's ``memory_bound()`` for two caches of different row counts
  and the same chunking (equal: the bound does not grow with the cache), the resident memory one
  streamed epoch adds, and the bound at the chunking ``build()`` chooses for a large cache of this
  row shape.
- ``finalize_seconds``: the cache finalized once more (every chunk read back), an upper bound of
  the fixed part of a build, which takes the digests of the chunks it wrote as it wrote them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softcache._bench.memory import current_rss_mb, rss_peak
from softcache._bench.timing import alternate, balanced_rounds, median, ratio, timer
from softcache._bench.wide import one_thread
from softcache._bench.workload import LMSettings
from softcache.cache.shards import finalize
from softcache.cache.store import Cache, open_cache
from softcache.cache import layout
from softcache.config import BuildConfig, StudentConfig
from softcache.models import gpt
from softcache.sequences import TokenRows
from softcache.student._batch import Batch
from softcache.student.run import StudentRun, make_run
from softcache.student.sequence import SequenceLoader
from softcache.student.stream import StreamLoader
from softcache.teacher.build import build
from softcache.teacher.label import stored_arrays, teacher_logits
from softcache.teacher.sequence import chunk_rows as sequence_chunk_rows, sequence_blocks


@dataclass
class LMWorkload:
    settings: LMSettings
    rows: TokenRows
    teacher: nn.Module
    workdir: Path


def random_rows(s: LMSettings, n: int, seed: int = 0) -> TokenRows:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, s.vocab, (n, s.length), generator=gen)
    return TokenRows(tokens, info={"name": "random token rows for softcache bench", "rows": n, "seed": seed},
                     tokenizer={"name": "random", "vocab_size": s.vocab, "special_ids": {}},
                     packing={"method": "random", "length": s.length})


def make_lm(s: LMSettings, workdir: Path) -> LMWorkload:
    torch.manual_seed(0)
    teacher = gpt(vocab_size=s.vocab, length=s.length, layers=s.teacher_layers, width=s.teacher_width).eval()
    return LMWorkload(s, random_rows(s, s.rows), teacher, workdir)


def lm_build(w: LMWorkload, teacher: nn.Module, rows: TokenRows, name: str, **options: Any) -> Cache:
    """``softcache.build()`` as a user calls it for a language-model cache, at T = 1 (the language-model
    demo's temperature, and the usual one for next-token distillation)."""
    return build(teacher, rows, str(w.workdir / name), storage=f"topk:{w.settings.k}", temperature=1.0,
                 batch_size=w.settings.batch_size, device="cpu", overwrite=True, progress=False, **options)


def whole_build(w: LMWorkload, rows: TokenRows | None = None, name: str = "lm-build.zarr") -> float:
    elapsed = timer()
    lm_build(w, w.teacher, w.rows if rows is None else rows, name)
    return elapsed()


def one_batch(w: LMWorkload) -> TokenRows:
    """The first teacher batch of the rows: a build of it is all fixed cost and one batch."""
    return TokenRows(w.rows.tokens[: w.settings.batch_size])


@torch.no_grad()
def teacher_alone(w: LMWorkload, rows: TokenRows | None = None) -> float:
    """The loop a user writes to run the teacher over the rows, storing nothing."""
    tokens, bs = (w.rows if rows is None else rows).tokens, w.settings.batch_size
    elapsed = timer()
    for i in range(0, len(tokens), bs):
        w.teacher(tokens[i : i + bs])
    return elapsed()


def labelling_ms(w: LMWorkload, cache: Cache, repeats: int) -> dict[str, float]:
    """Milliseconds per batch of the teacher's call and of what the writer thread does with its
    logits (top-k, statistics, storage dtype), each alone in this thread."""
    block = next(sequence_blocks(w.rows, w.settings.batch_size)(range(len(w.rows))))
    logits = teacher_logits(w.teacher, block, torch.device("cpu"))

    def label() -> float:
        elapsed = timer()
        stored_arrays(logits, block, 0, cache.manifest, False)
        return elapsed()

    def call() -> float:
        elapsed = timer()
        teacher_logits(w.teacher, block, torch.device("cpu"))
        return elapsed()

    times = alternate({"teacher": call, "label": label}, repeats)
    return {f"{k}_ms_per_batch": 1000 * median(v) for k, v in times.items()}


def student_batches(cache: Cache, s: LMSettings) -> list[Batch]:
    """``s.steps`` batches as ``train()`` serves them, taken before timing (epochs wrap)."""
    loader = SequenceLoader(cache, batch_size=s.batch_size)
    out: list[Batch] = []
    epoch = 0
    while len(out) < s.steps:
        out += list(loader.epoch(epoch))[: s.steps - len(out)]
        epoch += 1
    return out


def library_steps(run: StudentRun, batches: list[Batch], temperature: float) -> float:
    elapsed = timer()
    for batch in batches:
        run.step(batch, batch.soft, temperature)
    return elapsed()


def hand_ce_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy as a user writes it (positions without a target are -1)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-1)


def hand_ce_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch]) -> float:
    """The cross-entropy training step a user writes without softcache."""
    model.train()
    elapsed = timer()
    for batch in batches:
        loss = hand_ce_loss(model(batch.inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return elapsed()


def measure_steps(cache: Cache, s: LMSettings) -> dict[str, list[float]]:
    spec = s.model_spec(s.student_layers, s.student_width)
    batches = student_batches(cache, s)
    t, probe = cache.temperature, batches[0].inputs[:2]

    def run(alpha: float) -> StudentRun:
        config = StudentConfig(spec=spec, alpha=alpha, temperature=t, leftover="bucket")
        return make_run(config, cache.num_classes, probe, torch.device("cpu"))

    kd, ce = run(0.5), run(0.0)
    torch.manual_seed(0)
    hand = gpt(vocab_size=s.vocab, length=s.length, layers=s.student_layers, width=s.student_width)
    hand_opt = torch.optim.Adam(hand.parameters(), lr=0.01)
    return alternate({"kd": lambda: library_steps(kd, batches, t), "ce": lambda: library_steps(ce, batches, t),
                      "hand_ce": lambda: hand_ce_steps(hand, hand_opt, batches)}, s.repeats)


def stream_figures(cache: Cache, batch_size: int) -> dict[str, Any]:
    """One cache's streaming memory bound, the resident memory one streamed epoch adds (sampled
    every 2 ms in this process) and, for comparison, the bytes the in-RAM loader holds."""
    memory = SequenceLoader(cache, batch_size=batch_size)
    held = (memory.tokens, memory.mask, memory.values, memory.ids, memory.rest)
    out: dict[str, Any] = {"rows": cache.train.rows, "chunk_rows": cache.manifest.layout.chunk_rows,
                           "memory_loader_mb": sum(t.numel() * t.element_size() for t in held if t is not None) / 2**20}
    del memory, held
    before = current_rss_mb()
    with rss_peak() as peak, StreamLoader(cache, batch_size=batch_size) as loader:
        for _ in loader.epoch(0):
            pass
        out["bound_mb"] = loader.memory_bound() / 2**20
        out["group_mb"] = loader.buffer_bytes() / 2**20
    out["epoch_rss_added_mb"] = peak[0] - before
    return out


def measure_stream(w: LMWorkload) -> dict[str, Any]:
    """The bound for two caches that differ only in their row count, both spanning several chunks
    (``stream_chunk_rows``; labelled by a one-layer teacher, since only their shapes matter), and
    the bound at the chunk rows ``build()`` picks for a large cache of this row shape (the bound
    is linear in the chunk rows)."""
    s = w.settings
    torch.manual_seed(0)
    small = gpt(vocab_size=s.vocab, length=s.length, layers=1, width=32).eval()
    caches = [lm_build(w, small, random_rows(s, n, seed=i + 1), f"lm-stream-{n}.zarr", chunk_rows=s.stream_chunk_rows)
              for i, n in enumerate(s.stream_rows)]
    figures = [stream_figures(c, s.batch_size) for c in caches]
    bounds = {f["bound_mb"] for f in figures}
    large = sequence_chunk_rows(BuildConfig().chunk_rows, layout.row_bytes(caches[0].manifest))
    return {"caches": figures, "bound_mb": max(bounds), "bound_independent_of_rows": len(bounds) == 1,
            "build_chunk_rows": large, "bound_mb_at_build_chunk_rows": max(bounds) * large / figures[0]["chunk_rows"]}


def measure_lm(s: LMSettings, workdir: Path) -> dict[str, Any]:
    """Every language-model figure; see the module docstring."""
    with one_thread():
        w = make_lm(s, workdir)
        first = one_batch(w)
        one = {"build_one": lambda: whole_build(w, first, "lm-build-one.zarr"),
               "teacher_one": lambda: teacher_alone(w, first)}
        for warm in one.values():  # the warm-up: a one-batch build passes through every path a full one does
            warm()
        stage1 = alternate({"build": lambda: whole_build(w), "teacher": lambda: teacher_alone(w), **one},
                           balanced_rounds(s.repeats), warmup=0, balanced=True)
        cache = open_cache(str(workdir / "lm-build.zarr"))
        began = timer()
        finalize(cache.url)  # reads every chunk back: an upper bound of the build's own finalize
        finalize_seconds = began()
        labelling = labelling_ms(w, cache, s.repeats)
        steps = measure_steps(cache, s)
        stream = measure_stream(w)
    tokens = s.rows * s.length
    step_tokens = s.steps * s.batch_size * s.length
    return {
        "settings": s.describe(),
        "lm_write_overhead": ratio(stage1, "build", "teacher"),
        # what a build costs beyond one batch's teacher call whatever its size (store, manifest,
        # the last batch's labelling, finalize), and the ratio once that is taken out
        "build_fixed_seconds": (fixed := median(stage1["build_one"]) - median(stage1["teacher_one"])),
        "lm_write_overhead_beyond_fixed": (median(stage1["build"]) - fixed) / median(stage1["teacher"]),
        "lm_kd_vs_ce_step": ratio(steps, "kd", "ce"),
        "ce_step_vs_hand_written": ratio(steps, "ce", "hand_ce"),
        "capture_tokens_per_s": tokens / median(stage1["build"]),
        "teacher_tokens_per_s": tokens / median(stage1["teacher"]),
        "train_tokens_per_s": step_tokens / median(steps["kd"]),
        "ce_train_tokens_per_s": step_tokens / median(steps["ce"]),
        "finalize_seconds": finalize_seconds,
        **labelling,
        "stream": stream,
        "seconds": {k: median(v) for k, v in {**{f"stage1_{k}": v for k, v in stage1.items()},
                                              **{f"steps_{k}": v for k, v in steps.items()}}.items()},
    }


def format_lm(r: dict[str, Any], target: Callable[[str], str]) -> list[tuple[str, str, str]]:
    """The section's rows for the printed table; ``target(key)`` says a ratio's target and whether it is met."""
    s = r["settings"]
    size = f"LM V={s['vocab']} L={s['length']} topk:{s['k']}"
    sm = r["stream"]
    same = "same" if sm["bound_independent_of_rows"] else "NOT the same"
    stream = (f"{sm['bound_mb']:.1f} MB", f"{same} for " + " and ".join(f"{c['rows']} rows" for c in sm["caches"])
              + f" ({sm['caches'][0]['chunk_rows']}-row chunks); one epoch RSS "
              + ", ".join(f"+{c['epoch_rss_added_mb']:.1f} MB" for c in sm["caches"])
              + f"; {sm['bound_mb_at_build_chunk_rows']:.0f} MB at the {sm['build_chunk_rows']}-row chunks of a "
              "large cache")
    return [
        (f"[{size}] build() / teacher forward alone ({s['rows']} rows)", f"{r['lm_write_overhead']:.2f}",
         target("lm_write_overhead") + f"; per batch: teacher {r['teacher_ms_per_batch']:.0f} ms, "
         f"labelling {r['label_ms_per_batch']:.0f} ms (writer thread); fixed {r['build_fixed_seconds']:.2f} s, "
         f"beyond it {r['lm_write_overhead_beyond_fixed']:.2f}"),
        (f"[{size}] student step distilling / cross-entropy only", f"{r['lm_kd_vs_ce_step']:.2f}",
         target("lm_kd_vs_ce_step") + f"; cross-entropy step / hand-written {r['ce_step_vs_hand_written']:.2f}"),
        (f"[{size}] tokens/s: capture (build) / training (distilling step)",
         f"{r['capture_tokens_per_s']:,.0f} / {r['train_tokens_per_s']:,.0f}",
         f"teacher alone {r['teacher_tokens_per_s']:,.0f}"),
        (f"[{size}] stage 2 streaming memory bound", *stream),
    ]
