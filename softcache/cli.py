"""The ``softcache`` command: the interface scripts and other teams rely on.

Exit codes: 0 success, 1 the data or cache is bad, 2 usage error. Errors are one line on stderr
starting ``softcache: error:``; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .errors import SoftcacheError, UsageError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with the contract's prefix and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.split()[-1]}: {message}" if " " in self.prog else message)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $SOFTCACHE_THREADS, else 1: small ops run fastest single-threaded)")
    common.add_argument("--quiet", action="store_true", help="no progress output")
    return common


def _emit(obj: Any, as_json: bool, human: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else human)


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build

    start = time.perf_counter()
    cache = build(args.teacher, args.data, args.out, eval_data=args.eval_data, temperature=args.temperature,
                  storage=args.storage, dtype=args.dtype, batch_size=args.batch_size, chunk_rows=args.chunk_rows,
                  store_inputs=args.store_inputs, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    summary = {"url": cache.url, "rows": cache.train.rows, "eval_rows": cache.eval.rows if cache.eval else 0,
               "cache_key": cache.manifest.cache_key, "seconds": round(time.perf_counter() - start, 3)}
    _emit(summary, args.json, f"built {cache.url}: {summary['rows']} rows (+{summary['eval_rows']} eval), "
          f"T={cache.temperature:g}, key {cache.manifest.cache_key[:12]} in {summary['seconds']:.1f}s")
    return 0


def student_grid(specs: Sequence[str], temperatures: Sequence[float], alphas: Sequence[float], lrs: Sequence[float],
                 seeds: Sequence[int], label_smoothing: float) -> list[Any]:
    """Every spec x T x alpha x lr x seed; alpha 0 ignores T, so it appears once."""
    from .config import StudentConfig

    configs: list[StudentConfig] = []
    seen: set[tuple[Any, ...]] = set()
    for spec, t, a, lr, seed in itertools.product(specs, temperatures, alphas, lrs, seeds):
        key = (spec, t if a > 0 else None, a, lr, seed)
        if key in seen:
            continue
        seen.add(key)
        configs.append(StudentConfig(spec=spec, temperature=t, alpha=a, lr=lr, seed=seed, label_smoothing=label_smoothing))
    return configs


def _cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .config import TrainConfig
    from .train import format_board, train

    try:
        students = student_grid(args.student, args.temperature, args.alpha, args.lr, args.seed, args.label_smoothing)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, shuffle_seed=args.shuffle_seed, device=args.device)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    board = train(args.cache, students, data=args.data, eval_data=args.eval_data, out_dir=args.out, config=config,
                  progress=not args.quiet)
    _emit({"leaderboard": board.to_dicts(), "out": args.out}, args.json, format_board(board))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .store import open_cache
    from .validate import summarize

    info = summarize(open_cache(args.url, allow_incomplete=True))
    m = info["manifest"]
    src = m["source"]
    human = "\n".join([
        f"cache        {info['url']}  ({info['status']}, schema v{info['schema_version']})",
        f"cache key    {info['cache_key']}",
        f"teacher      {m['teacher']['spec'] and _spec_str(m['teacher']['spec'])}  "
        f"({m['teacher']['num_parameters']} params, sha256 {m['teacher']['weights_digest'][:12]})",
        f"source       {src['kind']}: " + (_spec_str(src['spec']) if src['kind'] == 'dataset' and src['spec'] else src.get('method', '-'))
        + f"  ({src['num_samples']} samples)",
        f"rows         {info['rows']} train, {info['eval_rows']} eval; {info['classes']} classes; {info['views']} view(s)",
        f"soft labels  T={info['temperature']:g}, {info['storage']['mode']} {info['storage']['dtype']}, "
        f"{info['bytes_per_sample']:.1f} bytes/sample",
        f"teacher      train accuracy {_pct(info['teacher_train_accuracy'])}, mean max prob {_pct(info['teacher_mean_max_prob'])}",
    ])
    _emit(info, args.json, human)
    return 0


def _spec_str(spec: dict[str, Any]) -> str:
    from .manifest import Spec

    return str(Spec.model_validate(spec))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    result = validate(args.url, deep=args.deep)
    lines = [f"{'valid' if result['valid'] else 'INVALID'}: {result['url']}"]
    lines += [f"  error: {e}" for e in result["errors"]] + [f"  warning: {w}" for w in result["warnings"]]
    _emit(result, args.json, "\n".join(lines))
    if not result["valid"]:
        print(f"softcache: error: invalid cache: {result['errors'][0]}", file=sys.stderr)
        return 1
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .store import open_cache

    cache = open_cache(args.url)
    split = cache.eval if args.split == "eval" else cache.train
    if split is None:
        raise UsageError("this cache has no eval split")
    frame = split.stats()
    if args.out:
        frame.write_parquet(args.out)
        print(f"wrote {len(frame)} rows x {len(frame.columns)} columns to {args.out}")
        return 0
    import polars as pl

    by_class = frame.group_by("prediction").agg(
        pl.len().alias("rows"), pl.col("max_prob").mean(), pl.col("entropy").mean(), pl.col("margin").mean(),
        pl.col("correct").mean().alias("accuracy"),
    ).sort("prediction")
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True):
        print(by_class)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .train import format_board

    start = time.perf_counter()
    board, cache, teacher_acc = run_demo(args.workdir, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - start
    obj = {"workdir": args.workdir, "cache": cache.url, "teacher_test_accuracy": teacher_acc,
           "leaderboard": board.to_dicts(), "seconds": round(seconds, 2)}
    human = (f"teacher test accuracy {100 * teacher_acc:.2f}%  cache {cache.url}\n{format_board(board)}\n"
             f"leaderboard: {os.path.join(args.workdir, 'leaderboard.parquet')}  ({seconds:.1f}s)")
    _emit(obj, args.json, human)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="softcache", description="Offline and data-free knowledge distillation through cached soft labels.",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", parents=[common], help="run a teacher once and cache its soft labels")
    p.add_argument("--teacher", required=True, help="SPEC: package.module:callable[,k=v...] or weights.safetensors")
    p.add_argument("--data", required=True, help="dataset SPEC (items are (input, label) or input)")
    p.add_argument("--eval-data", default=None, help="held-out dataset SPEC: its teacher outputs go to the 'eval' split")
    p.add_argument("--out", required=True, help="cache URL: path, file://, s3://")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--storage", default="full", help="full (topk:K and sample:K are reserved)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per chunk; writes cover whole chunks")
    p.add_argument("--store-inputs", action="store_true", help="also store the inputs in the cache")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_build)

    p = sub.add_parser("train", parents=[common], help="train students against a cache (no teacher)")
    p.add_argument("--cache", required=True)
    p.add_argument("--data", default=None, help="dataset SPEC for the cached rows (default: the one the manifest records)")
    p.add_argument("--eval-data", default=None, help="labelled dataset SPEC for test accuracy (default: the cache's eval split)")
    p.add_argument("--student", action="append", required=True, help="student SPEC; repeat for several")
    p.add_argument("--temperature", type=float, nargs="+", default=[4.0], help="one or more T (a grid)")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.9], help="one or more alpha; 0 = hard labels")
    p.add_argument("--lr", type=float, nargs="+", default=[0.01])
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for leaderboard.parquet and students/*.safetensors")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("inspect", parents=[common], help="summarise a cache")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("validate", parents=[common], help="check a cache; exit 0 valid, 1 invalid")
    p.add_argument("url")
    p.add_argument("--deep", action="store_true", help="also cross-check stats, sample index and cache key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser("stats", parents=[common], help="per-sample teacher statistics (polars)")
    p.add_argument("url")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--out", default=None, help="write the table as Parquet")
    p.set_defaults(handler=_cmd_stats)

    p = sub.add_parser("demo", parents=[common], help="the main job on the embedded digits data")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo outputs in --workdir")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_demo)
    return parser


def set_threads(threads: int | None) -> None:
    import torch

    value = threads if threads is not None else int(os.environ.get("SOFTCACHE_THREADS", "1"))
    if value < 1:
        raise UsageError(f"--threads must be at least 1, not {value}")
    torch.set_num_threads(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        set_threads(args.threads)
        handler: Handler = args.handler
        return handler(args)
    except SoftcacheError as exc:
        if debug:
            raise
        print(f"softcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("softcache: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract is one line, no traceback
        if debug:
            raise
        print(f"softcache: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
