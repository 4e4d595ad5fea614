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
