"""The ``softcache`` command: the interface scripts and other teams rely on.

Exit codes: 0 success, 1 the data or cache is bad, 2 usage error. Errors are one line on stderr
starting ``softcache: error:``; ``--debug`` shows the traceback instead. Every flag's default is
shown by ``--help``; the flags of ``build`` and ``synthesize`` are made from the fields of the
config models (:mod:`softcache.config`), so the CLI, the Python API and pipeline files agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from softcache._cli import commands
from softcache._cli.format import one_line
from softcache.cache.location import is_timeout, redact_text, timeout_scope
from softcache.errors import CacheError, SoftcacheError, UsageError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with the contract's prefix and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.split()[-1]}: {message}" if " " in self.prog else message)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every flag that has a default worth stating (not None, not
    an off switch, not one the help text already states); lists show as the values one types."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or default in ("", []) or "default" in text or isinstance(action, argparse._StoreConstAction)):
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})".strip().replace("%", "%%")


def _sub(sub: Any, name: str, common: argparse.ArgumentParser, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], formatter_class=_HelpFormatter, **kwargs)


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


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW,HIGH, not {text!r}") from None
    return low, high


def _plain(annotation: Any) -> tuple[Any, bool]:
    """A field's type without ``| None``, and whether None was allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(annotation))
    return annotation, False


def model_flags(p: argparse.ArgumentParser, model: Any, metavars: dict[str, str] | None = None) -> None:
    """One flag per field of a config model (``--chunk-rows`` for ``chunk_rows``), with the
    field's description as help and its default as the flag's default, so the CLI, the Python
    API and pipeline files cannot drift. Booleans are switches; Literals are choices."""
    metavars = metavars or {}
    for name, field in model.model_fields.items():
        flag, kind = "--" + name.replace("_", "-"), _plain(field.annotation)[0]
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
        options: dict[str, Any] = {"default": field.default, "help": field.description or ""}
        if base is bool:
            p.add_argument(flag, action="store_true", **options)
        elif typing.get_origin(base) is typing.Literal:
            p.add_argument(flag, choices=list(typing.get_args(base)), **options)
        elif typing.get_origin(base) is tuple:
            p.add_argument(flag, type=_float_pair, metavar=metavars.get(name, "LOW,HIGH"), **options)
        else:
            kind_type = base if base in (int, float) else str
            p.add_argument(flag, type=kind_type, metavar=metavars.get(name), **options)


def _trust_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-module", action="append", default=[], metavar="MODULE",
                   help="let SPECs recorded in caches and weights files name functions of this module of yours "
                        "(repeatable; also $SOFTCACHE_TRUSTED_MODULES and [tool.softcache] trusted-modules "
                        "in ./pyproject.toml)")


def _stage1_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from softcache.config import BuildConfig, SynthCacheOptions, SynthConfig

    spec_metavars = {"augment": "SPEC", "shard": "I/N", "device": "DEVICE"}
    p = _sub(sub, "build", common, help="run a teacher once and cache its soft labels")
    p.add_argument("--teacher", required=True, help="SPEC: package.module:callable[,k=v...] or weights.safetensors")
    p.add_argument("--teacher-arch", default=None, metavar="SPEC",
                   help="architecture to load a weights-file teacher into, instead of the one its metadata names")
    _trust_flags(p)
    p.add_argument("--data", required=True, help="dataset SPEC (items are (input, label) or input)")
    p.add_argument("--eval-data", default=None, help="held-out dataset SPEC: its teacher outputs go to the 'eval' split")
    p.add_argument("--out", required=True, help="cache URL: path, file://, s3://")
    model_flags(p, BuildConfig, spec_metavars)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.cmd_build)

    p = _sub(sub, "synthesize", common,
             help="data-free: make inputs from the teacher alone and cache them with its soft labels")
    p.add_argument("--teacher", required=True, help="SPEC or weights.safetensors (BatchNorm layers make synthesis work)")
    p.add_argument("--out", required=True, help="cache URL: path, file://, s3://")
    p.add_argument("--samples", type=int, default=None, help="number of inputs to synthesize")
    p.add_argument("--input-shape", default=None, metavar="C,H,W", help="shape of one input, e.g. 1,8,8")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise, the targets and the views")
    model_flags(p, SynthConfig)
    p.add_argument("--eval-data", default=None,
                   help="real held-out dataset SPEC: the teacher's outputs on it (not its inputs) go to the eval split")
    p.add_argument("--reuse-inputs", default=None, metavar="URL",
                   help="relabel the inputs of an earlier synthesized cache of this teacher instead of synthesizing")
    model_flags(p, SynthCacheOptions, spec_metavars)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.cmd_synthesize)

    p = _sub(sub, "finalize", common, help="check a sharded cache and mark it complete")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.cmd_finalize)


def _train_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from softcache.config import TrainConfig, student_default

    train_default = {name: f.default for name, f in TrainConfig.model_fields.items()}
    p = _sub(sub, "train", common, help="train students against a cache (no teacher)")
    p.add_argument("--cache", required=True)
    p.add_argument("--data", default=None, help="dataset SPEC for the cached rows (default: the one the manifest records)")
    p.add_argument("--eval-data", default=None, help="labelled dataset SPEC for test accuracy (default: the cache's eval split)")
    p.add_argument("--student", action="append", required=True, help="student SPEC; repeat for several")
    p.add_argument("--temperature", type=float, nargs="+", default=[student_default("temperature")],
                   help="one or more distillation temperatures T (a grid)")
    p.add_argument("--alpha", type=float, nargs="+", default=[student_default("alpha")],
                   help="one or more weights of the soft term; 0 = hard labels")
    p.add_argument("--lr", type=float, nargs="+", default=[student_default("lr")], help="one or more learning rates")
    p.add_argument("--seed", type=int, nargs="+", default=[student_default("seed")],
                   help="one or more seeds of the students' initial weights")
    p.add_argument("--label-smoothing", type=float, default=student_default("label_smoothing"),
                   help="label smoothing of the hard-label term")
    p.add_argument("--leftover", nargs="+", choices=["bucket", "label", "renormalize"],
                   default=[student_default("leftover")],
                   help="top-k caches: the leftover mass is an 'other' class (bucket), goes to the true label "
                        "(label), or is dropped (renormalize: biased); one or more (a grid)")
    p.add_argument("--retemper", nargs="+", choices=["refuse", "uniform-tail"], default=[student_default("retemper")],
                   help="top-k or sampled caches at a --temperature other than the cache's: refuse (default), or "
                        "uniform-tail (an approximation: kept probabilities powered by T_cache/T, the leftover spread "
                        "evenly over the classes not kept); one or more (a grid)")
    p.add_argument("--epochs", type=int, default=train_default["epochs"], help="passes over the cache")
    p.add_argument("--batch-size", type=int, default=train_default["batch_size"],
                   help="rows per step, the same batch for every student")
    p.add_argument("--shuffle-seed", type=int, default=train_default["shuffle_seed"],
                   help="seeds the batch order, shared by all students")
    p.add_argument("--loader", choices=["auto", "memory", "stream"], default=train_default["loader"],
                   help="memory: soft labels in RAM; stream: chunk-shuffled reads for caches larger than RAM; "
                        "auto: memory when they fit --memory-budget")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="RAM auto mode may use for soft labels, e.g. 2GiB (default: $SOFTCACHE_MEMORY_BUDGET, "
                        "else the smaller of 4 GiB and half the RAM)")
    p.add_argument("--buffer-chunks", type=int, default=train_default["buffer_chunks"],
                   help="stream mode: chunks decoded and shuffled together (more = better shuffle, more memory)")
    p.add_argument("--workers", type=int, default=train_default["workers"],
                   help="stream mode: worker processes reading the store")
    p.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None,
                   help="how stream-mode workers start (default: the platform's)")
    p.add_argument("--no-group", action="store_true",
                   help="step students one by one instead of stacking those that share an architecture")
    p.add_argument("--out", required=True, help="directory for leaderboard.parquet and students/*.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.add_argument("--verify-key", default=None, metavar="PUB.pem",
                   help="check the cache against its signature with this public key before training (exit 1 if not)")
    p.add_argument("--trust-cache-specs", action="store_true",
                   help="run dataset/augmentation SPECs the cache records even outside softcache's allowlist")
    _trust_flags(p)
    p.set_defaults(handler=commands.cmd_train)


def _cache_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "inspect", common, help="summarise a cache")
    p.add_argument("url")
    _trust_flags(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.set_defaults(handler=commands.cmd_inspect)

    p = _sub(sub, "validate", common, help="check a cache; exit 0 valid, 1 invalid")
    p.add_argument("url")
    p.add_argument("--deep", action="store_true", help="also cross-check stats, sample index and cache key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.cmd_validate)

    for verb, key, key_help, where, handler, what in (
            ("sign", "KEY.pem", "elliptic-curve private key, PEM (P-256/384/521)", "goes", commands.cmd_sign,
             "sign a complete cache (OpenSSF model-signing, EC key)"),
            ("verify", "PUB.pem", "the signer's public key, PEM", "is", commands.cmd_verify,
             "check a cache against its signature; exit 0 verified, 1 not")):
        p = _sub(sub, verb, common, help=what)
        p.add_argument("url")
        p.add_argument("--key", required=True, metavar=key, help=key_help)
        p.add_argument("--signature", default=None, metavar="URL", help=f"where the signature {where} (default: URL.sig)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=handler)

    p = _sub(sub, "stats", common, help="per-sample teacher statistics (polars); per predicted class and overall")
    p.add_argument("url")
    p.add_argument("--split", choices=["train", "eval"], default="train", help="which split's rows")
    p.add_argument("--out", default=None, help="write the per-sample table as Parquet")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a cache that is still being built (or was interrupted)")
    p.set_defaults(handler=commands.cmd_stats)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="softcache", description="Offline and data-free knowledge distillation through cached soft labels.",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _stage1_parsers(sub, common)

    p = _sub(sub, "run", common, help="run a pipeline file (teacher, build, students)")
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
    p.set_defaults(handler=commands.cmd_run)

    _train_parser(sub, common)

    p = _sub(sub, "bench", common, help="measure the performance claims side by side")
    p.add_argument("--quick", action="store_true", help="smaller workload and fewer rounds (well under 2 minutes)")
    p.add_argument("--workdir", default=None, help="where the benchmark cache goes (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="one JSON object with the figures")
    p.add_argument("--storage-modes", action="store_true",
                   help="instead: each storage mode (full, topk:K, sample:N) on the LM and digits demos' teachers: "
                        "bytes per token, gradient angle to full distillation, students' held-out scores over seeds, "
                        "step cost (about 20 CPU minutes; with --quick seconds at toy sizes; a --workdir of "
                        "softcache demo --lm reuses its teacher)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="with --storage-modes: train each mode's students with seeds 0..N-1 (default 3)")
    p.add_argument("--workload", choices=["digits", "lm"], action="append", default=None,
                   help="with --storage-modes: only this comparison (repeatable; default both)")
    p.set_defaults(handler=commands.cmd_bench)

    _cache_parsers(sub, common)

    p = _sub(sub, "demo", common, help="the main job on the embedded digits data")
    p.add_argument("--workdir", default=None,
                   help="where the teacher, the caches and the leaderboard go (default: runs/demo; --lm: runs/lm)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo outputs in --workdir")
    p.add_argument("--lm", action="store_true",
                   help="the language-model job: a BPE tokenizer, a GPT teacher and a top-k cache on the Python "
                        "standard library's source, students with and without distillation (about 10 CPU minutes; "
                        "needs pip install softcache[lm]; uses every core unless --threads is given)")
    p.add_argument("--data-free", action="store_true",
                   help="teacher from real data, students from synthesized inputs only (a few CPU minutes)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.cmd_demo)
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
            warnings.showwarning = commands.warning_lines  # library warnings as the contract's one line
            try:  # every location made meanwhile, in workers too, uses the timeout
                return handler(args)
            except Exception as exc:
                if is_timeout(exc):
                    raise _no_answer(args) from exc
                raise
    except SoftcacheError as exc:
        if debug:
            raise
        print(f"softcache: error: {one_line(redact_text(str(exc)))}", file=sys.stderr)
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
