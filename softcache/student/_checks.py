"""What is refused before any student trains: garbage never trains.

Each check names what is wrong in one line, and all of them run before the first step, so a
refusal costs a read of the cache, never a training run: a temperature outside
:data:`TEMPERATURE_RANGE`, a compact cache asked for another temperature than its own, labels
outside the classes or disagreeing with the data, no known label for a student that learns from
labels, soft labels that are not finite, class ids of compact storage outside the classes,
unwritten rows, and SPECs recorded in the cache that the user has not trusted
(:func:`recorded_code`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from softcache.cache.manifest import DatasetSource, Spec
from softcache.cache.store import Cache
from softcache.config import StudentConfig
from softcache.errors import CacheError, UsageError
from softcache.student.loaders import MemoryLoader
from softcache.student.sequence import check_tokens
from softcache.student.stream import StreamLoader


TEMPERATURE_RANGE = (0.05, 1000.0)
"""Cache temperatures ``train`` accepts: wide around every temperature distillation uses (1 to
20), and narrow enough to refuse a manifest that was typed wrong or tampered with. Below 0.05 a
logit margin of 1 becomes a factor e^20, so the cached distribution is one-hot to float
precision; above 1000 the stored values z / T crowd around 0, where float16 keeps three
significant digits that rescaling to a student's T multiplies by up to T_cache / T."""


def check_temperature(cache: Cache) -> None:
    low, high = TEMPERATURE_RANGE
    t = cache.temperature
    if not low <= t <= high:  # also false for NaN
        raise CacheError(f"{cache.url}: the manifest's temperature {t} is outside [{low:g}, {high:g}]; "
                         "the cache is damaged or was built wrongly")


def check_compact_temperature(cache: Cache, configs: Sequence[StudentConfig]) -> None:
    """A top-k cache stores probabilities at its own temperature, a sampled one draws at it:
    another temperature cannot be recovered from K values and a leftover mass, nor from counts,
    so it is refused unless the student names an approximation (``retemper``, see
    ``loss.Retemper``)."""
    st = cache.manifest.storage
    other = [c for c in configs if st.mode != "full" and c.alpha > 0 and c.temperature != cache.temperature
             and c.retemper == "refuse"]
    if other:
        holds = "draws from the teacher's distribution" if st.mode == "sample" else "the teacher's probabilities"
        raise UsageError(f"{cache.location}: this {st.mode}:{st.k} cache holds {holds} at "
                         f"T={cache.temperature:g}; student {other[0].display_name()} asks for T="
                         f"{other[0].temperature:g}, which a compact cache cannot give exactly: train at "
                         f"--temperature {cache.temperature:g}, or name an approximation (--retemper uniform-tail)")


def check_label_range(labels: torch.Tensor, classes: int, what: str) -> None:
    """A label must be a class or -1 (unknown); anything else would index past the logits or
    silently never match a prediction."""
    bad = ((labels < -1) | (labels >= classes)).nonzero().flatten()
    if len(bad):
        raise CacheError(f"{what}: {len(bad)} of {len(labels)} are outside [-1, {classes}) "
                         f"(first rows {bad[:5].tolist()}, e.g. {int(labels[bad[0]])})")


def training_labels(cache: Cache, from_data: torch.Tensor | None) -> torch.Tensor:
    """The hard label of every training row: the dataset's when the inputs come from one.

    The cache keeps its own copy of the labels, which must agree wherever it knows one. A copy
    that disagrees with the data the cache's fingerprint matched was changed after the build,
    and the soft labels written by the same build are then suspect too: that is an error rather
    than a silent switch to the dataset's labels.
    """
    stored = torch.from_numpy(cache.train.labels()).long()
    check_label_range(stored, cache.num_classes, f"{cache.url}: the cache's training labels")
    if from_data is None:
        return stored
    given = from_data.long()
    if len(given) != len(stored):
        raise CacheError(f"the training data has {len(given)} rows but the cache {len(stored)}")
    check_label_range(given, cache.num_classes, "the training data's labels")
    differ = ((stored >= 0) & (stored != given)).nonzero().flatten()
    if len(differ):
        raise CacheError(f"{cache.url}: {len(differ)} of {len(stored)} labels in the cache disagree with the "
                         f"training data's (first rows {differ[:5].tolist()}); the cache was altered or built "
                         "from other data")
    return given


def check_known_labels(cache: Cache, labels: torch.Tensor, configs: Sequence[StudentConfig]) -> None:
    """A student with alpha < 1 learns partly from labels; with none known (a data-free cache,
    or data without labels) it would silently train on the soft term alone, or on nothing."""
    hard = [c for c in configs if c.alpha < 1]
    if hard and not bool((labels >= 0).any()):
        raise CacheError(f"{cache.url}: no training row has a known label, but {len(hard)} student(s) learn from "
                         f"labels (alpha < 1, e.g. {hard[0].display_name()}); use alpha=1 or pass labelled --data")


def check_finite(cache: Cache, loader: MemoryLoader | StreamLoader) -> None:
    """NaN or infinite soft labels make every student that reads them NaN. In memory mode the
    scan reads the tensors already loaded; in stream mode it is one extra pass over the store,
    a group of chunks at a time, so it stays within the loader's memory bound."""
    found = nonfinite_rows(loader.soft_blocks())
    if found.count:
        raise CacheError(f"{cache.url}: the soft labels of {found.count} of {cache.train.rows} training rows are NaN "
                         f"or infinite (first rows {found.first}); the cache is corrupt")


def check_soft_ids(cache: Cache, loader: MemoryLoader | StreamLoader) -> None:
    """The class ids of compact storage index the student's logits, so an id outside the classes
    (a damaged or edited cache) would index past them. Checked as token rows check theirs
    (``sequence.check_tokens``, on the ids as stored), a block at a time: the arrays already in
    RAM in memory mode, one extra pass over the stored ids in stream mode."""
    for _, ids in loader.id_blocks():
        check_tokens(cache, cache.train, None, ids)


def check_written(cache: Cache) -> None:
    """An incomplete cache (read with ``allow_incomplete``) can be trained on only once every
    training row is stored: unwritten rows hold fill values (uniform soft labels, no label) that
    would silently pull every student towards the uniform distribution."""
    for split in (cache.train, cache.eval):
        missing = int((split.sample_index() < 0).sum()) if split is not None else 0
        if missing:
            raise CacheError(f"{cache.url}: {missing} of {split.rows} {split.name} rows are not written yet "  # type: ignore[union-attr]
                             "(the build is unfinished); finish it before training (softcache build --resume)")


def recorded_code(cache: Cache, data: str | Dataset | None,
                   eval_data: str | Dataset | None) -> list[tuple[str, Spec, str]]:
    """The SPECs recorded in the cache that training would run, each with what replaces it, so
    one check before any work names everything the user has to pass."""
    m, runs = cache.manifest, []
    if data is None and not cache.train.has_inputs and isinstance(m.source, DatasetSource) and m.source.spec:
        runs.append(("training data", m.source.spec, "pass --data SPEC"))
    if eval_data is None and m.eval is not None and cache.eval is not None and m.eval.source.spec:
        runs.append(("evaluation data", m.eval.source.spec, "pass --eval-data SPEC"))
    if m.views.replay == "params" and m.views.augment is not None:
        runs.append(("view augmentation", m.views.augment, ""))
    return runs


@dataclass
class NonFinite:
    """Rows whose soft labels hold a NaN or an infinity: how many, and the first few."""

    count: int = 0
    first: list[int] = field(default_factory=list)


def nonfinite_rows(blocks: Iterable[tuple[int, np.ndarray | torch.Tensor]], keep: int = 5) -> NonFinite:
    """Scan ``(first_row, values)`` blocks of soft labels, a row being bad when any of its values
    (any view, any class) is not finite: such a row turns a student's loss into NaN, so a cache
    holding one must be refused before any student trains on it."""
    found = NonFinite()
    for start, values in blocks:
        block = torch.as_tensor(values)
        if _all_finite(block):
            continue
        bad = (~block.reshape(len(block), -1).isfinite().all(1)).nonzero().flatten()
        found.count += len(bad)
        if len(found.first) < keep:
            found.first.extend((bad[: keep - len(found.first)] + start).tolist())
    return found


def _all_finite(block: torch.Tensor) -> bool:
    """A quick whole-block test, a fraction of the cost of an element-wise one: NaN and infinities
    propagate through a float32 sum (one that merely overflows just falls through to the exact
    test), and through the extremes of a float16 block, which are cheaper to find than a widening
    sum of it (memory mode holds the cache's float16 values as stored)."""
    if block.numel() == 0:
        return True
    if block.dtype == torch.float16:
        low, high = torch.aminmax(block)  # both extremes in one pass
        return bool(low.isfinite()) and bool(high.isfinite())
    return bool(block.sum().isfinite())
