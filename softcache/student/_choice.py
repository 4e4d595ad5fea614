"""Stacked or one by one: which way the students of one architecture step faster, measured.

Stacking K students into one vectorized step removes per-operation overhead, which dominates
small students (the 64-32-10 MLP steps ~4x faster stacked). Once each student's matrices are
large the arithmetic dominates instead, and the stacked step can be slower than K ordinary ones
(a 256-256-1000 MLP, 8 students, batch 256, one thread: 1.4x slower; its closed-form loss over
``K x B x 1000`` logits and ``baddbmm`` cost more than K fused autograd losses and ``addmm``).
Where the crossover lies depends on the machine, the thread count and the shapes, so the
choice is timed rather than ruled by size.

The timing must not make a student's result depend on its pass: the two ways agree only to
float round-off (``tests/test_isolation.py``), so a choice that changed with the number of
partners, or from one pass to the next, would change a student's weights in the last bits.
Hence the choice is made once per process for each architecture, batch shape and thread count
(:class:`PathChooser` keeps it), from a probe on throw-away copies of one student, always
:data:`PROBE_STUDENTS` of them whatever the pass holds: real students take no probe step, and
every pass of the process steps an architecture the same way. The probe schedule is fixed, never
driven by the timings: a warm-up step each way (first calls allocate and pick kernels), then
``rounds`` alternated pairs (A B, B A, ...) so that a busy machine slows both alike. Stacking
is kept unless the median over pairs of ``stacked / one-by-one`` seconds exceeds 1. Stepping
one by one is what K separate runs do, so a group never costs more than they would (to the
probe's accuracy), and where stacking wins, it still stacks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from typing import Literal

Path = Literal["stacked", "one-by-one"]
STACKED: Path = "stacked"
ONE_BY_ONE: Path = "one-by-one"
PROBE_STUDENTS = 2
"""Students in a probe group: two, so stacking is measured as stacking (a group of one has no
per-step overhead to share) at the smallest, cheapest size. The ratio does not depend on K in a
way that two would misjudge: measured at K = 2, 4, 8, 16 it moved with noise, not with K
(docs/performance.md)."""

Timing = Callable[[Path, Callable[[], None]], float]
"""Runs one step taken ``path``'s way and returns its seconds; injectable so tests can decide."""


def wall_clock(path: Path, step: Callable[[], None]) -> float:
    """The default :data:`Timing`: the step's wall-clock seconds."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def probe(stacked: Callable[[], None], one_by_one: Callable[[], None], timing: Timing = wall_clock,
          rounds: int = 3) -> tuple[Path, float]:
    """Time both ways of stepping (each call is one step) and return the faster one with the
    median ``stacked / one-by-one`` ratio over alternated pairs."""
    steps = {STACKED: stacked, ONE_BY_ONE: one_by_one}
    stacked()
    one_by_one()
    seconds: dict[Path, list[float]] = {STACKED: [], ONE_BY_ONE: []}
    for r in range(rounds):
        for path in (STACKED, ONE_BY_ONE) if r % 2 == 0 else (ONE_BY_ONE, STACKED):
            seconds[path].append(timing(path, steps[path]))
    ratio = statistics.median(s / o if o > 0 else float("inf") for s, o in zip(seconds[STACKED], seconds[ONE_BY_ONE]))
    return (ONE_BY_ONE if ratio > 1.0 else STACKED), ratio


class PathChooser:
    """The choices made so far in this process, by key (architecture, batch shape, threads...),
    and the timing they are measured with."""

    def __init__(self, timing: Timing = wall_clock, rounds: int = 3):
        self.timing, self.rounds = timing, rounds
        self.decided: dict[Hashable, tuple[Path, float]] = {}

    def choose(self, key: Hashable, stacked: Callable[[], None], one_by_one: Callable[[], None]) -> Path:
        """The way to step ``key``'s students: measured with the two step functions the first
        time the key is seen, remembered after."""
        if key not in self.decided:
            self.decided[key] = probe(stacked, one_by_one, self.timing, self.rounds)
        return self.decided[key][0]


DEFAULT_CHOOSER = PathChooser()
