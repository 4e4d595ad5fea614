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
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from softcache.errors import CacheError, SoftcacheError, UsageError, first_validation_error
from softcache.cache.location import is_timeout, redact_text, timeout_scope

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
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",  # before or after the command
                        help="how long a remote request (http, s3) may wait for an answer "
                             "(default: $SOFTCACHE_TIMEOUT, else 60)")
    return common


def _trust_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-module", action="append", default=[], metavar="MODULE",
                   help="let SPECs recorded in caches and weights files name functions of this module of yours "
                        "(repeatable; also $SOFTCACHE_TRUSTED_MODULES and [tool.softcache] trusted-modules "
                        "in ./pyproject.toml)")


def _trust(args: argparse.Namespace) -> Any:
    from softcache.spec import Trust

    return Trust.from_user(args.trust_module, cache_specs=getattr(args, "trust_cache_specs", False))


def _emit(obj: Any, as_json: bool, human: str) -> None:
    from softcache.cache.location import redact_text

    print(redact_text(json.dumps(obj, indent=2, default=str) if as_json else human))


def _cmd_build(args: argparse.Namespace) -> int:
    import warnings

    from softcache.teacher.build import build

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = _warning_lines
        cache = build(args.teacher, args.data, args.out, eval_data=args.eval_data, temperature=args.temperature,
                      storage=args.storage, dtype=args.dtype, batch_size=args.batch_size, chunk_rows=args.chunk_rows,
                      shard_chunks=args.shard_chunks, store_inputs=args.store_inputs, device=args.device,
                      overwrite=args.overwrite, progress=not args.quiet, shard=args.shard, resume=args.resume,
                      views=args.views, augment=args.augment, view_seed=args.view_seed or 0,
                      teacher_arch=args.teacher_arch, trust=_trust(args))
    report = cache.build_report or {}
    summary = {"url": cache.url, "rows": cache.train.rows, "eval_rows": cache.eval.rows if cache.eval else 0,
               "cache_key": cache.manifest.cache_key, "complete": cache.complete,
               "seconds": round(time.perf_counter() - start, 3), "worker": report}
    done = (f"built {cache.url}" if cache.complete else
            f"shard {report.get('shard')} of {cache.url} done; the cache completes when the other workers finish")
    _emit(summary, args.json, f"{done}: {summary['rows']} rows (+{summary['eval_rows']} eval), "
          f"T={cache.temperature:g}, key {cache.manifest.cache_key[:12]}; this worker wrote "
          f"{len(report.get('units_written', []))} shard(s), skipped {report.get('units_skipped', 0)} already done, "
          f"in {summary['seconds']:.1f}s")
    return 0


def _warning_lines(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    """Library warnings as one line with the contract's prefix (they say what to expect)."""
    from softcache.cache.location import redact_text

    print(f"softcache: warning: {_one_line(redact_text(str(message)))}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    """A message that may carry newlines (from a user's spec, say) as the contract's one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _synth_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SynthConfig field, so the CLI, the API and pipeline files cannot drift."""
    from softcache.config import SynthConfig

    for name, field in SynthConfig.model_fields.items():
        flag, what = "--" + name.replace("_", "-"), f"{field.description or name} (default {field.default})"
        if name == "method":
            p.add_argument(flag, choices=["deepinversion", "noise"], default=None, help=what)
        elif name == "input_range":
            p.add_argument(flag, default=None, metavar="LOW,HIGH", help=what)
        else:
            p.add_argument(flag, type=type(field.default), default=None, help=what)


def _cmd_synthesize(args: argparse.Namespace) -> int:
    import warnings

    from pydantic import ValidationError

    from softcache.config import SynthConfig
    from softcache.teacher.synth import SynthWarning, synthesize

    given = {name: getattr(args, name) for name in SynthConfig.model_fields if getattr(args, name) is not None}
    if "input_range" in given:
        try:
            given["input_range"] = tuple(float(v) for v in given["input_range"].split(","))
        except ValueError:
            raise UsageError(f"--input-range must be LOW,HIGH, not {given['input_range']!r}") from None
    try:
        shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
        config = SynthConfig(**given)
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise UsageError(first_validation_error(exc, "synthesize")) from None
        raise UsageError(f"--input-shape must be comma-separated integers, not {args.input_shape!r}") from None
    if args.reuse_inputs is None and (args.samples is None or shape is None):
        raise UsageError("synthesize needs --samples N and --input-shape C,H,W (or --reuse-inputs URL)")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SynthWarning)
        warnings.showwarning = _warning_lines
        result = synthesize(args.teacher, args.out, samples=args.samples, input_shape=shape, config=config,
                            seed=args.seed, temperature=args.temperature, dtype=args.dtype, views=args.views,
                            augment=args.augment, view_seed=args.view_seed, eval_data=args.eval_data,
                            reuse_inputs=args.reuse_inputs,
                            chunk_rows=args.chunk_rows, device=args.device, overwrite=args.overwrite,
                            progress=not args.quiet)
    cache = result.cache
    source = cache.manifest.source
    summary = {"url": cache.url, "rows": cache.train.rows, "views": cache.manifest.views.count,
               "method": source.method, "seed": source.seed,  # type: ignore[union-attr]
               "synthesis_seconds": round(result.seconds, 3), "seconds": round(time.perf_counter() - start, 3),
               "target_rate": result.target_rate, "fallback": result.fallback, "cache_key": cache.manifest.cache_key}
    _emit(summary, args.json, f"synthesized {cache.url}: {summary['rows']} inputs ({summary['method']}, seed {summary['seed']}) "
          f"x {summary['views']} view(s), T={cache.temperature:g}; teacher predicts the target class for "
          f"{100 * result.target_rate:.1f}%; synthesis {result.seconds:.1f}s, total {summary['seconds']:.1f}s")
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from softcache.teacher.build import finalize

    manifest = finalize(args.url)
    obj = {"url": args.url, "complete": True, "cache_key": manifest.cache_key, "rows": manifest.layout.rows,
           "num_shards": manifest.layout.num_shards, "finished_at": manifest.status.finished_at}
    _emit(obj, args.json, f"complete: {args.url} ({manifest.layout.rows} rows, {manifest.layout.num_shards} shards, "
          f"key {manifest.cache_key[:12]})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from softcache.pipeline.run import load_pipeline, run_pipeline, summary
    from softcache.student.train import format_board

    start = time.perf_counter()
    cfg = load_pipeline(args.file, args.set or [])
    if args.verify_key:
        _verify_pipeline_cache(cfg, args.only, args.verify_key)
    results = run_pipeline(cfg, only=args.only, shard=args.shard, progress=not args.quiet, trust=_trust(args))
    obj = summary(cfg, args.file, results, time.perf_counter() - start)
    lines = []
    for r in results:
        what = r.detail.get("output") or r.detail.get("reason") or ""
        lines.append(f"{r.stage:<20} {r.status:<9} {what}" + (f"  ({r.seconds:.1f}s)" if r.seconds else ""))
        if r.status == "ran" and "leaderboard" in r.detail:
            import polars as pl

            lines.append(format_board(pl.DataFrame(r.detail["leaderboard"])))
    lines.append(f"pipeline {cfg.name}: {len(obj['ran'])} stage(s) ran in {obj['seconds']:.1f}s")
    _emit(obj, args.json, "\n".join(lines))
    return 0


def _verify_pipeline_cache(cfg: Any, only: str | None, key: str) -> None:
    """``run --verify-key``: the pipeline's cache came from elsewhere, so it is checked before the
    train stages; a run that builds the cache itself has nothing to verify."""
    from softcache.pipeline.run import select_stages
    from softcache.cache.sign import verify

    if "build" in select_stages(cfg, only):
        raise UsageError("--verify-key checks a cache received from elsewhere, but this run builds the cache; "
                         "run the train stages only (--only train) against the received cache")
    verify(cfg.path(cfg.cache.url), key)


def _cmd_sign(args: argparse.Namespace) -> int:
    from softcache.cache.sign import sign

    result = sign(args.url, args.key, signature=args.signature)
    _emit(result, args.json, f"signed {result['url']}: {result['files']} files, key {result['key_id'][:16]}, "
          f"signature {result['signature']}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from softcache.cache.sign import verification

    result = verification(args.url, args.key, signature=args.signature)
    if result["verified"]:
        _emit(result, args.json, f"verified {result['url']}: {result['files']} files match the signature "
              f"{result['signature']} of key {result['key_id'][:16]}"
              + ("" if result["listed"] else " (http: files outside the signature cannot be listed)"))
        return 0
    if args.json:
        _emit(result, True, "")
    print(f"softcache: error: not verified: {_one_line(str(result['reason']))}", file=sys.stderr)
    return 1


def student_grid(specs: Sequence[str], temperatures: Sequence[float], alphas: Sequence[float], lrs: Sequence[float],
                 seeds: Sequence[int], label_smoothing: float) -> list[Any]:
    """Every spec x T x alpha x lr x seed; alpha 0 ignores T, so it appears once."""
    from softcache.config import StudentConfig

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

    from softcache.config import TrainConfig
    from softcache.student.train import format_board, train

    try:
        students = student_grid(args.student, args.temperature, args.alpha, args.lr, args.seed, args.label_smoothing)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, shuffle_seed=args.shuffle_seed, device=args.device,
                             loader=args.loader, memory_budget=_size(args.memory_budget), buffer_chunks=args.buffer_chunks,
                             workers=args.workers, start_method=args.start_method, group=not args.no_group)
    except ValidationError as exc:
        raise UsageError(first_validation_error(exc, "train")) from None
    from softcache.cache.store import open_cache

    if args.verify_key:  # before anything of the cache is read
        from softcache.cache.sign import verify

        verify(args.cache, args.verify_key)
    cache = open_cache(args.cache, allow_incomplete=args.allow_incomplete)
    board = train(cache, students, data=args.data, eval_data=args.eval_data, out_dir=_local_dir(args.out), config=config,
                  progress=not args.quiet, trust=_trust(args), overwrite=args.overwrite)
    _emit({"leaderboard": board.to_dicts(), "out": args.out}, args.json, format_board(board))
    return 0


def _local_dir(url: str) -> str:
    """``train --out``: results are local files, so a ``file://`` URL counts as the path it names."""
    from softcache.cache.location import Location

    where = Location.of(url)
    if where.local_path is None:
        raise UsageError(f"--out {where}: results go to a local directory (a path or a file:// URL)")
    return str(where.local_path)


def _size(text: str | None) -> int | None:
    from softcache.student.stream import parse_size

    return None if text is None else parse_size(text)


def _cmd_bench(args: argparse.Namespace) -> int:
    from softcache._bench import format_report, run_bench

    log = None if args.quiet or args.json else (lambda msg: print(f"softcache: bench: {msg}", file=sys.stderr, flush=True))
    command = "softcache bench" + " --quick" * args.quick + (f" --threads {args.threads}" if args.threads else "")
    result = run_bench(quick=args.quick, workdir=args.workdir, log=log, command=command)
    _emit(result, args.json, format_report(result))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from softcache.cache.store import open_cache
    from softcache.cache.check import summarize

    cache = open_cache(args.url, allow_incomplete=args.allow_incomplete)
    info = summarize(cache)
    if not cache.complete:
        from softcache.cache.shards import units_done

        info["shards_done"], info["shards_total"] = units_done(cache.group, cache.manifest)
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
    ] + ([f"build        {info['shards_done']}/{info['shards_total']} shards done (incomplete: figures cover "
           "written rows only)"] if not cache.complete else []) + _trust_lines(info, cache.manifest, _trust(args)))
    _emit(info, args.json, human)
    return 0


def _trust_lines(info: dict[str, Any], manifest: Any, trust: Any) -> list[str]:
    """``inspect``: the modules the user trusts (and where they said so) and what of the code the
    cache names may not run; adds ``info["trust"]``. Checked as text, nothing is imported."""
    from softcache.spec import recorded_spec_problems

    info["trust"] = {**trust.describe(), "recorded_spec_problems": recorded_spec_problems(manifest, trust)}
    modules = ", ".join(f"{m['module']} ({m['from']})" for m in info["trust"]["modules"])
    return [f"trusted      {modules or 'no modules beyond softcache allowlist'}"] + \
        [f"code         {problem}" for problem in info["trust"]["recorded_spec_problems"]]


def _spec_str(spec: dict[str, Any]) -> str:
    from softcache.cache.manifest import Spec

    return str(Spec.model_validate(spec))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cmd_validate(args: argparse.Namespace) -> int:
    from softcache.cache.check import validate

    result = validate(args.url, deep=args.deep)
    lines = [f"{'valid' if result['valid'] else 'INVALID'}: {result['url']}"]
    lines += [f"  error: {e}" for e in result["errors"]] + [f"  warning: {w}" for w in result["warnings"]]
    _emit(result, args.json, "\n".join(lines))
    if not result["valid"]:
        print(f"softcache: error: invalid cache: {result['errors'][0]}", file=sys.stderr)
        return 1
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from softcache.cache.store import open_cache

    if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        raise UsageError(f"--out {args.out}: needs a file path in an existing directory")
    cache = open_cache(args.url, allow_incomplete=args.allow_incomplete)
    split = cache.eval if args.split == "eval" else cache.train
    if split is None:
        raise UsageError("this cache has no eval split")
    frame = split.stats()
    if not cache.complete:  # rows not written yet hold fill values, not teacher statistics
        import polars as pl

        frame = frame.filter(pl.col("sample") >= 0)
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
    from softcache.demo import run_demo
    from softcache.student.train import format_board

    if args.data_free:
        return _demo_datafree(args)
    start = time.perf_counter()
    board, cache, teacher_acc = run_demo(args.workdir, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - start
    obj = {"workdir": args.workdir, "cache": cache.url, "teacher_test_accuracy": teacher_acc,
           "leaderboard": board.to_dicts(), "seconds": round(seconds, 2)}
    human = (f"teacher test accuracy {100 * teacher_acc:.2f}%  cache {cache.url}\n{format_board(board)}\n"
             f"leaderboard: {os.path.join(args.workdir, 'leaderboard.parquet')}  ({seconds:.1f}s)")
    _emit(obj, args.json, human)
    return 0


def _demo_datafree(args: argparse.Namespace) -> int:
    from softcache.demo import format_datafree, run_datafree_demo

    start = time.perf_counter()
    board, teacher_acc = run_datafree_demo(args.workdir, overwrite=args.overwrite, device=args.device,
                                           progress=not args.quiet)
    seconds = time.perf_counter() - start
    obj = {"workdir": args.workdir, "teacher_test_accuracy": teacher_acc, "leaderboard": board.to_dicts(),
           "seconds": round(seconds, 2)}
    human = (f"teacher test accuracy {100 * teacher_acc:.2f}% (trained on real data; students saw synthesized inputs only)\n"
             f"{format_datafree(board)}\nleaderboard: {os.path.join(args.workdir, 'leaderboard.parquet')}  ({seconds:.1f}s)")
    _emit(obj, args.json, human)
    return 0


def _view_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=int, default=1,
                   help="label this many augmented views of every input (needs --augment); stage 2 replays them exactly")
    p.add_argument("--augment", default=None, metavar="SPEC",
                   help="replayable augmentation, e.g. softcache.augment:compose,crop=0.6,flip=0.5,shift=1,mixup=0.4,cutmix=1")
    p.add_argument("--view-seed", type=int, default=None,
                   help="seeds the view parameters, which the cache stores (default: 0; synthesize: --seed)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="softcache", description="Offline and data-free knowledge distillation through cached soft labels.",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", parents=[common], help="run a teacher once and cache its soft labels")
    p.add_argument("--teacher", required=True, help="SPEC: package.module:callable[,k=v...] or weights.safetensors")
    p.add_argument("--teacher-arch", default=None, metavar="SPEC",
                   help="architecture to load a weights-file teacher into, instead of the one its metadata names")
    _trust_flags(p)
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
    p.add_argument("--shard-chunks", type=int, default=1,
                   help="chunks per shard: the unit of work split between workers and redone on resume")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="do worker I's share of N (job arrays); under torchrun RANK/WORLD_SIZE are used instead")
    p.add_argument("--resume", action="store_true",
                   help="continue a partial cache of the same build at --out: finished shards are skipped")
    _view_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_build)

    p = sub.add_parser("synthesize", parents=[common],
                       help="data-free: make inputs from the teacher alone and cache them with its soft labels")
    p.add_argument("--teacher", required=True, help="SPEC or weights.safetensors (BatchNorm layers make synthesis work)")
    p.add_argument("--out", required=True, help="cache URL: path, file://, s3://")
    p.add_argument("--samples", type=int, default=None, help="number of inputs to synthesize")
    p.add_argument("--input-shape", default=None, metavar="C,H,W", help="shape of one input, e.g. 1,8,8")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise, the targets and the views")
    _synth_flags(p)
    p.add_argument("--temperature", type=float, default=8.0, help="synthetic inputs want a higher T (default 8)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--eval-data", default=None,
                   help="real held-out dataset SPEC: the teacher's outputs on it (not its inputs) go to the eval split")
    p.add_argument("--reuse-inputs", default=None, metavar="URL",
                   help="relabel the inputs of an earlier synthesized cache of this teacher instead of synthesizing")
    _view_flags(p)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_synthesize)

    p = sub.add_parser("finalize", parents=[common], help="check a sharded cache and mark it complete")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_finalize)

    p = sub.add_parser("run", parents=[common], help="run a pipeline file (teacher, build, students)")
    p.add_argument("file", help="pipeline TOML, e.g. pipelines/digits.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key before validation, e.g. cache.temperature=8 or train.*.epochs=5; repeatable")
    p.add_argument("--only", default=None, metavar="STAGES",
                   help="comma-separated stages: teacher, build, train (all train stages) or train:NAME")
    p.add_argument("--shard", default=None, metavar="I/N", help="build stage only: this worker's share of N")
    _trust_flags(p)
    p.add_argument("--verify-key", default=None, metavar="PUB.pem",
                   help="check the pipeline's (received) cache against its signature before the train stages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_run)

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
    p.add_argument("--loader", choices=["auto", "memory", "stream"], default="auto",
                   help="memory: soft labels in RAM; stream: chunk-shuffled reads for caches larger than RAM; "
                        "auto (default): memory when they fit --memory-budget")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="RAM auto mode may use for soft labels, e.g. 2GiB (default: $SOFTCACHE_MEMORY_BUDGET, "
                        "else the smaller of 4 GiB and half the RAM)")
    p.add_argument("--buffer-chunks", type=int, default=4,
                   help="stream mode: chunks decoded and shuffled together (more = better shuffle, more memory)")
    p.add_argument("--workers", type=int, default=0, help="stream mode: worker processes reading the store")
    p.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None,
                   help="how stream-mode workers start (default: the platform's)")
    p.add_argument("--no-group", action="store_true",
                   help="step students one by one instead of stacking those that share an architecture")
    p.add_argument("--out", required=True, help="directory for leaderboard.parquet and students/*.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.add_argument("--verify-key", default=None, metavar="PUB.pem",
                   help="check the cache against its signature with this public key before training (exit 1 if not)")
    p.add_argument("--trust-cache-specs", action="store_true",
                   help="run dataset/augmentation SPECs the cache records even outside softcache's allowlist")
    _trust_flags(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("bench", parents=[common], help="measure the performance claims side by side")
    p.add_argument("--quick", action="store_true", help="smaller workload and fewer rounds (well under 2 minutes)")
    p.add_argument("--workdir", default=None, help="where the benchmark cache goes (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="one JSON object with the figures")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("inspect", parents=[common], help="summarise a cache")
    p.add_argument("url")
    _trust_flags(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("validate", parents=[common], help="check a cache; exit 0 valid, 1 invalid")
    p.add_argument("url")
    p.add_argument("--deep", action="store_true", help="also cross-check stats, sample index and cache key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser("sign", parents=[common], help="sign a complete cache (OpenSSF model-signing, EC key)")
    p.add_argument("url")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="elliptic-curve private key, PEM (P-256/384/521)")
    p.add_argument("--signature", default=None, metavar="URL", help="where the signature goes (default: URL.sig)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_sign)

    p = sub.add_parser("verify", parents=[common], help="check a cache against its signature; exit 0 verified, 1 not")
    p.add_argument("url")
    p.add_argument("--key", required=True, metavar="PUB.pem", help="the signer's public key, PEM")
    p.add_argument("--signature", default=None, metavar="URL", help="where the signature is (default: URL.sig)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("stats", parents=[common], help="per-sample teacher statistics (polars)")
    p.add_argument("url")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--out", default=None, help="write the table as Parquet")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.set_defaults(handler=_cmd_stats)

    p = sub.add_parser("demo", parents=[common], help="the main job on the embedded digits data")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo outputs in --workdir")
    p.add_argument("--data-free", action="store_true",
                   help="teacher from real data, students from synthesized inputs only (a few CPU minutes)")
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
        with timeout_scope(getattr(args, "timeout", None)), warnings.catch_warnings():
            warnings.showwarning = _warning_lines  # library warnings as the contract's one line
            try:  # every location made meanwhile, in workers too, uses the timeout
                return handler(args)
            except Exception as exc:
                if is_timeout(exc):
                    raise _no_answer(args) from exc
                raise
    except SoftcacheError as exc:
        if debug:
            raise
        print(f"softcache: error: {_one_line(redact_text(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("softcache: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract is one line, no traceback
        if debug:
            raise
        first = redact_text(str(exc).splitlines()[0]) if str(exc) else ""
        print(f"softcache: error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _no_answer(args: argparse.Namespace) -> SoftcacheError:
    """A remote read that timed out after the cache was opened (a chunk, say): name the remote
    location the command reads, without credentials."""
    from softcache.cache.location import Location, default_timeout

    for name in ("url", "cache", "teacher", "data", "eval_data", "reuse_inputs", "out"):
        value = getattr(args, name, None)
        if isinstance(value, str) and Location.of(value).remote:
            return Location.of(value).no_answer()
    return CacheError(f"a remote request got no answer within {default_timeout():g} s "
                      "(raise it with --timeout SECONDS or $SOFTCACHE_TIMEOUT)")


if __name__ == "__main__":
    sys.exit(main())
