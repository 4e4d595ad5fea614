"""What each ``softcache`` subcommand does: call the library with the parsed flags, print the
result through :mod:`softcache._cli.format` (or as JSON with ``--json``), return the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

from softcache._cli import format as fmt
from softcache.errors import UsageError, first_validation_error


def emit(obj: Any, as_json: bool, human: str) -> None:
    """Print the result: the stable JSON object, or the human text (credentials redacted in both)."""
    from softcache.cache.location import redact_text

    print(redact_text(json.dumps(obj, indent=2, default=str) if as_json else human))


def warning_lines(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Library warnings as one line with the contract's prefix (they say what to expect)."""
    from softcache.cache.location import redact_text

    print(f"softcache: warning: {fmt.one_line(redact_text(str(message)))}", file=sys.stderr, flush=True)


def model_options(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The values of the flags generated from ``model``'s fields (see ``main.model_flags``)."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def _trust(args: argparse.Namespace) -> Any:
    from softcache.cache.trust import Trust

    return Trust.from_user(args.trust_module, cache_specs=getattr(args, "trust_cache_specs", False))


def cmd_build(args: argparse.Namespace) -> int:
    from softcache.config import BuildConfig
    from softcache.teacher.build import build

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = warning_lines
        cache = build(args.teacher, args.data, args.out, eval_data=args.eval_data, progress=not args.quiet,
                      teacher_arch=args.teacher_arch, trust=_trust(args), **model_options(args, BuildConfig))
    summary = {"url": cache.url, "rows": cache.train.rows, "eval_rows": cache.eval.rows if cache.eval else 0,
               "cache_key": cache.manifest.cache_key, "complete": cache.complete,
               "seconds": round(time.perf_counter() - start, 3), "worker": cache.build_report or {}}
    emit(summary, args.json, fmt.format_built(summary, cache.temperature))
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from softcache.config import SynthCacheOptions, SynthConfig
    from softcache.teacher.synth import SynthWarning, synthesize

    try:
        shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated integers, not {args.input_shape!r}") from None
    try:
        config = SynthConfig(**model_options(args, SynthConfig))
    except ValidationError as exc:
        raise UsageError(first_validation_error(exc, "synthesize")) from None
    if args.reuse_inputs is None and (args.samples is None or shape is None):
        raise UsageError("synthesize needs --samples N and --input-shape C,H,W (or --reuse-inputs URL)")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SynthWarning)
        warnings.showwarning = warning_lines
        result = synthesize(args.teacher, args.out, config, samples=args.samples, input_shape=shape, seed=args.seed,
                            eval_data=args.eval_data, reuse_inputs=args.reuse_inputs, progress=not args.quiet,
                            **model_options(args, SynthCacheOptions))
    cache = result.cache
    source = cache.manifest.source
    summary = {"url": cache.url, "rows": cache.train.rows, "views": cache.manifest.views.count,
               "method": source.method, "seed": source.seed,  # type: ignore[union-attr]
               "synthesis_seconds": round(result.seconds, 3), "seconds": round(time.perf_counter() - start, 3),
               "target_rate": result.target_rate, "fallback": result.fallback, "cache_key": cache.manifest.cache_key}
    emit(summary, args.json, fmt.format_synthesized(summary, cache.temperature))
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from softcache.cache.shards import finalize

    manifest = finalize(args.url)
    obj = {"url": args.url, "complete": True, "cache_key": manifest.cache_key, "rows": manifest.layout.rows,
           "num_shards": manifest.layout.num_shards, "finished_at": manifest.status.finished_at}
    emit(obj, args.json, fmt.format_finalized(obj))
    return 0


def run_summary(cfg: Any, file: str, results: Any, seconds: float) -> dict[str, Any]:
    """The stable ``softcache run --json`` object."""
    return {
        "pipeline": cfg.name,
        "file": file,
        "workdir": os.path.abspath(cfg.workdir),
        "stages": [r.to_json() for r in results],
        "ran": [r.stage for r in results if r.status in ("ran", "resumed")],
        "seconds": round(seconds, 3),
    }


def cmd_run(args: argparse.Namespace) -> int:
    from softcache.pipeline.config import load_pipeline
    from softcache.pipeline.run import run_pipeline

    start = time.perf_counter()
    cfg = load_pipeline(args.file, args.set or [])
    if args.verify_key:
        _verify_pipeline_cache(cfg, args.only, args.verify_key)
    results = run_pipeline(cfg, only=args.only, shard=args.shard, progress=not args.quiet, trust=_trust(args))
    obj = run_summary(cfg, args.file, results, time.perf_counter() - start)
    emit(obj, args.json, fmt.format_run(cfg.name, results, obj))
    return 0


def _verify_pipeline_cache(cfg: Any, only: str | None, key: str) -> None:
    """``run --verify-key``: the pipeline's cache came from elsewhere, so it is checked before the
    train stages; a run that builds the cache itself has nothing to verify."""
    from softcache.cache.sign import verify
    from softcache.pipeline.run import select_stages

    if "build" in select_stages(cfg, only):
        raise UsageError("--verify-key checks a cache received from elsewhere, but this run builds the cache; "
                         "run the train stages only (--only train) against the received cache")
    verify(cfg.path(cfg.cache.url), key)


def cmd_sign(args: argparse.Namespace) -> int:
    from softcache.cache.sign import sign

    result = sign(args.url, args.key, signature=args.signature)
    emit(result, args.json, fmt.format_signed(result))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from softcache.cache.sign import verification

    result = verification(args.url, args.key, signature=args.signature)
    if result["verified"]:
        emit(result, args.json, fmt.format_verified(result))
        return 0
    if args.json:
        emit(result, True, "")
    print(f"softcache: error: not verified: {fmt.one_line(str(result['reason']))}", file=sys.stderr)
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from softcache.config import StudentGrid, TrainConfig
    from softcache.student._distributed import main_process
    from softcache.student.train import train

    try:
        students = StudentGrid(spec=args.student, temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                               seed=args.seed, label_smoothing=[args.label_smoothing],
                               leftover=args.leftover, retemper=args.retemper).expand()
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
    result = train(cache, students, data=args.data, eval_data=args.eval_data, out_dir=_local_dir(args.out), config=config,
                   progress=not args.quiet, trust=_trust(args), overwrite=args.overwrite)
    if main_process():  # under torchrun every rank returns the same leaderboard; one prints it
        emit({"leaderboard": result.leaderboard.to_dicts(), "out": args.out, "seconds": result.seconds}, args.json,
             fmt.format_board(result.leaderboard))
    return 0


def _local_dir(url: str) -> str:
    """``train --out``: results are local files, so a ``file://`` URL counts as the path it names."""
    from softcache.cache.location import Location

    where = Location.of(url)
    if where.local_path is None:
        raise UsageError(f"--out {where}: results go to a local directory (a path or a file:// URL)")
    return str(where.local_path)


def _size(text: str | None) -> int | None:
    from softcache.student.loaders import parse_size

    return None if text is None else parse_size(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from softcache._bench import run_bench

    log = None if args.quiet or args.json else (lambda msg: print(f"softcache: bench: {msg}", file=sys.stderr, flush=True))
    command = "softcache bench" + " --quick" * args.quick + (f" --threads {args.threads}" if args.threads else "")
    if not args.storage_modes and (args.seeds is not None or args.workload):
        raise UsageError("--seeds and --workload choose what --storage-modes measures; add --storage-modes")
    if args.storage_modes:
        import dataclasses

        from softcache._bench.storage import run_storage_bench
        from softcache._bench.workload import StorageSettings

        settings = StorageSettings.preset(args.quick)
        if args.seeds is not None:
            if args.seeds < 2:
                raise UsageError(f"--seeds {args.seeds}: the seed noise needs at least 2 seeds per mode")
            settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
            command += f" --seeds {args.seeds}"
        if args.workload:
            settings = dataclasses.replace(settings, workloads=tuple(dict.fromkeys(args.workload)))
            command += "".join(f" --workload {w}" for w in settings.workloads)
        result = run_storage_bench(settings, workdir=args.workdir, log=log, command=command + " --storage-modes")
        emit(result, args.json, fmt.format_storage(result))
        return 0
    result = run_bench(quick=args.quick, workdir=args.workdir, log=log, command=command)
    emit(result, args.json, fmt.format_report(result))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from softcache.cache.summary import summarize
    from softcache.cache.store import open_cache
    from softcache.cache.trust import recorded_spec_problems

    cache = open_cache(args.url, allow_incomplete=args.allow_incomplete)
    info = summarize(cache)
    if not cache.complete:
        from softcache.cache.shards import units_done

        info["shards_done"], info["shards_total"] = units_done(cache.group, cache.manifest)
    # the modules the user trusts (and where they said so) and what of the code the cache names
    # may not run: checked as text, nothing is imported
    trust = _trust(args)
    info["trust"] = {**trust.describe(), "recorded_spec_problems": recorded_spec_problems(cache.manifest, trust)}
    emit(info, args.json, fmt.format_inspect(info, cache.complete))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from softcache.cache.check import validate

    result = validate(args.url, deep=args.deep)
    emit(result, args.json, fmt.format_validation(result))
    if not result["valid"]:
        print(f"softcache: error: invalid cache: {result['errors'][0]}", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
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
    print(fmt.format_stats(frame))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from softcache.demo import run_datafree_demo, run_demo

    start = time.perf_counter()
    if args.lm and args.data_free:
        raise UsageError("demo: choose --lm or --data-free, not both")
    args.workdir = args.workdir or ("runs/lm" if args.lm else "runs/demo")
    leaderboard = os.path.join(args.workdir, "leaderboard.parquet")
    if args.lm:
        from softcache.demo_lm import run_lm_demo

        if args.threads is None and "SOFTCACHE_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)  # minutes of transformer training: use every core
        lm = run_lm_demo(args.workdir, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
        obj = {"workdir": args.workdir, "cache": lm.cache.url, "teacher_bits_per_token": lm.teacher_bits_per_token,
               "bytes_per_token": lm.bytes_per_token, "teacher_reused": lm.teacher_reused,
               "leaderboard": lm.leaderboard.to_dicts(), "summary": lm.summary.to_dicts(),
               "seconds": {**lm.seconds, "total": round(time.perf_counter() - start, 1)}}
        emit(obj, args.json, fmt.format_lm_demo(obj, lm.leaderboard, lm.summary, leaderboard))
        return 0
    if args.data_free:
        board, teacher_acc = run_datafree_demo(args.workdir, overwrite=args.overwrite, device=args.device,
                                               progress=not args.quiet)
        obj = {"workdir": args.workdir, "teacher_test_accuracy": teacher_acc, "leaderboard": board.to_dicts(),
               "seconds": round(time.perf_counter() - start, 2)}
        emit(obj, args.json, fmt.format_datafree_demo(obj, board, leaderboard))
        return 0
    board, cache, teacher_acc = run_demo(args.workdir, overwrite=args.overwrite, device=args.device,
                                         progress=not args.quiet)
    obj = {"workdir": args.workdir, "cache": cache.url, "teacher_test_accuracy": teacher_acc,
           "leaderboard": board.to_dicts(), "seconds": round(time.perf_counter() - start, 2)}
    emit(obj, args.json, fmt.format_demo(obj, board, leaderboard))
    return 0
