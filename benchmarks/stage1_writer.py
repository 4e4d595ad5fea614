"""Does the build's writer thread slow the teacher? Its work switched off in every other segment.

``softcache.build()`` hands each block's labelling (statistics, float16) and its chunk writes to a
background thread, beside the teacher's next call. Timing a build against a plain teacher loop
in separate rounds mixes that thread's effect with the machine's drift between rounds. Here one
build of the 1,000-class workload of ``softcache bench`` skips the writer's labelling, its chunk
writes, or both, in every other segment of ``--segment`` rows (writes are skipped whole chunks at
a time; a skipped block's arrays are the previous block's), and the teacher's calls in the two
kinds of segment are compared: same process, same seconds, only the writer's work differs. Work
is switched by where it runs: a block is labelled beside the next call, a chunk written beside
the calls of the next segment. The build fails its final check (chunks are missing); the calls
are measured by then.

    python benchmarks/stage1_writer.py --rows 65536 --skip both --builds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from softcache._bench.wide import make_wide, one_thread, whole_build
from softcache._bench.workload import WideSettings
from softcache.errors import CacheError
from softcache.teacher import build as stage1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--segment", type=int, default=4096, help="rows; a multiple of the build's 4,096-row chunks")
    parser.add_argument("--skip", choices=("label", "write", "both"), default="both")
    parser.add_argument("--builds", type=int, default=3)
    args = parser.parse_args()
    settings = WideSettings(rows=args.rows, build_rows=args.rows)
    calls: list[tuple[int, float]] = []  # (first row, teacher CPU seconds) per call
    real_call, real_label, real_write = stage1.teacher_logits, stage1.stored_arrays, stage1.store.write_rows
    last: dict[str, Any] = {}

    def off(row: int) -> bool:
        return (row // args.segment) % 2 == 1

    def teacher_call(teacher: torch.nn.Module, block: Any, device: torch.device) -> torch.Tensor:
        began = time.thread_time()
        out = real_call(teacher, block, device)
        first = last.get("next_row", 0)
        calls.append((first, time.thread_time() - began))
        last["next_row"] = first + len(block.inputs)
        return out

    def label(logits: torch.Tensor, block: Any, row: int, *rest: Any) -> Any:
        if args.skip in ("label", "both") and off(row + len(block.inputs)) and "arrays" in last:
            return last["arrays"]  # runs beside the next block's call
        last["arrays"] = real_label(logits, block, row, *rest)
        return last["arrays"]

    def write(group: Any, start: int, block: Any, handles: Any) -> None:
        if args.skip in ("write", "both") and off(start + args.segment):
            return  # a chunk is written beside the next segment's calls
        real_write(group, start, block, handles)

    with one_thread(), tempfile.TemporaryDirectory(prefix="softcache-writer-") as tmp:
        w = make_wide(settings, Path(tmp))
        whole_build(w, settings.batch_size)  # warm-up
        ratios = []
        for n in range(args.builds):
            calls.clear()
            last.clear()
            with mock.patch.object(stage1, "teacher_logits", teacher_call), \
                    mock.patch.object(stage1, "stored_arrays", label), \
                    mock.patch.object(stage1.store, "write_rows", write):
                try:
                    whole_build(w, args.rows)
                except CacheError:
                    pass  # the skipped chunks: every call was timed before the final check
            # the first call of a segment still overlaps the previous segment's last block
            on = [c for row, c in calls if not off(row) and row % args.segment]
            skipped = [c for row, c in calls if off(row) and row % args.segment]
            ratios.append(statistics.fmean(on) / statistics.fmean(skipped))
            print(f"build {n + 1}: teacher CPU per call {1e3 * statistics.fmean(on):.2f} ms with the writer's work, "
                  f"{1e3 * statistics.fmean(skipped):.2f} ms without ({args.skip} skipped): {ratios[-1]:.3f}", flush=True)
        print(f"with / without, {args.builds} builds: mean {statistics.fmean(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
