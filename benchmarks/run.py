"""Run the softcache benchmark and keep its figures: ``python benchmarks/run.py [--quick] [--out FILE]``.

The measurements live in ``softcache._bench`` (also ``softcache bench``); this script only adds
saving the JSON object next to the printed table, so successive runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from softcache._bench import run_bench  # noqa: E402
from softcache._cli.format import format_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workload, fewer rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SOFTCACHE_THREADS", "1")),
                        help="torch CPU threads (default: $SOFTCACHE_THREADS, else 1, as the CLI)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/run.py" + " --quick" * args.quick + f" --threads {args.threads}"
    result = run_bench(quick=args.quick, log=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True),
                       command=command)
    print(format_report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
