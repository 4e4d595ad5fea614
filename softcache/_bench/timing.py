"""Timing two runs fairly on a shared machine: alternated rounds, per-round ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

Timed = Callable[[], float]
"""Runs once and returns the seconds of the part being measured (set-up excluded)."""


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def alternate(runs: dict[str, Timed], repeats: int, warmup: int = 1, balanced: bool = False) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, interleaved, the order reversed every other round.

    ``balanced``: every round runs each callable twice, in mirrored order (A B B A), and records
    the mean of its two runs. This machine's speed drifts over tens of seconds; for runs of that
    length a single A B pair catches the two in different states, while the mirrored pair gives
    both the same mean position in the round and so cancels a drift that is linear within it.
    Long comparisons (a whole build against its teacher) use it."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        if balanced:
            first = {name: runs[name]() for name in order}
            for name in reversed(order):
                times[name].append((first[name] + runs[name]()) / 2)
        else:
            for name in order:
                times[name].append(runs[name]())
    return times


def balanced_rounds(repeats: int) -> int:
    """Balanced rounds giving about ``repeats`` runs of each callable (each round runs it twice)."""
    return max(1, (repeats + 1) // 2)


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
