"""A cache (or a weights file) someone else sends is untrusted input.

Every case starts from a real cache of the digits data (built once per module), damages or
poisons a copy the way a hostile or careless sender would, and runs the real command line on
it, each command in its own process under a 3 GiB address-space limit and a timeout
(``run_jobs`` / ``run_limited``). For each it checks the exit code, that an error is one
deliberate ``softcache: error:`` line (not a traceback, not a crash caught at the top), that no
SPEC recorded in the file ran (every hostile SPEC touches a marker file), and, for the memory
cases, that the refusal came in bounded time and memory.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from softcache.teacher.build import build
from softcache.demo import DATA_SPEC, EVAL_SPEC

TESTS = Path(__file__).resolve().parent
LAUNCHER = TESTS / "hostile_launcher.py"
GiB = 1 << 30
MEMORY_LIMIT = 3 * GiB
TIMEOUT = 120
"""Seconds any one command may take before it is killed (a refusal takes a few)."""
BOUNDED_SECONDS = 60
"""A refusal of a memory case must come within this (well under TIMEOUT on a loaded machine)."""
STUDENT = "softcache.models:mlp"
AUGMENT = "softcache.augment:compose,shift=1,mixup=0.4"
SECRET = "s3cretPassw0rd"
SPEC_REFUSED = {1, 2}
"""Running code a cache names is refused; whether that reads as a bad cache (1) or as "pass
--trust-cache-specs" (2) is the command's choice. What matters is that nothing ran."""


# --- the memory-limit harness ---------------------------------------------------------------


@dataclass
class Outcome:
    """What a command did: exit code, output, wall seconds and peak resident memory."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int
    timed_out: bool

    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"(no stderr; stdout ends {self.stdout[-200:]!r})"


@dataclass
class Job:
    """One command: ``argv`` follows the interpreter (``-m softcache ...`` or ``-c CODE ...``)."""

    id: str
    argv: list[str]
    cwd: Path
    timeout: float = TIMEOUT
    memory: int = MEMORY_LIMIT


def run_jobs(jobs: Sequence[Job], workdir: Path, workers: int | None = None, fresh: bool = False) -> dict[str, Outcome]:
    """Run every job in its own process under its memory limit and timeout, ``workers`` at a
    time (default: one per CPU), and return what each did. Jobs are forked from one process that
    has imported softcache's dependencies once, unless ``fresh`` (or ``SOFTCACHE_HOSTILE_FRESH=1``)
    asks for a new interpreter per job (see hostile_launcher.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    specs = []
    for job in jobs:
        specs.append({"id": job.id, "argv": job.argv, "cwd": str(job.cwd), "timeout": job.timeout,
                      "memory": job.memory, "stdout": str(workdir / f"{job.id}.stdout"),
                      "stderr": str(workdir / f"{job.id}.stderr")})
    (workdir / "jobs.json").write_text(json.dumps(specs))
    env = {**os.environ, "SOFTCACHE_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(TESTS), os.environ.get("PYTHONPATH", "")] if p)}
    if workers:
        env["SOFTCACHE_HOSTILE_WORKERS"] = str(workers)
    if fresh:
        env["SOFTCACHE_HOSTILE_FRESH"] = "1"
    parallel = workers or os.cpu_count() or 1
    budget = 120 + sum(job.timeout for job in jobs) / parallel
    subprocess.run([sys.executable, str(LAUNCHER), str(workdir / "jobs.json"), str(workdir / "results.json")],
                   env=env, check=True, timeout=budget, capture_output=True)
    results = json.loads((workdir / "results.json").read_text())
    outcomes = {}
    for spec in specs:
        r = results[spec["id"]]
        outcomes[spec["id"]] = Outcome(r["rc"], Path(spec["stdout"]).read_text(errors="replace"),
                                       Path(spec["stderr"]).read_text(errors="replace"), r["seconds"],
                                       r["peak_rss"], r["timed_out"])
    return outcomes


def run_limited(argv: Sequence[str], cwd: Path, *, memory: int = MEMORY_LIMIT, timeout: float = TIMEOUT) -> Outcome:
    """``python ARGV`` (e.g. ``["-m", "softcache", "validate", url]``) in its own process under
    ``memory`` bytes of address space, killed after ``timeout`` seconds."""
    return run_jobs([Job("job", list(argv), cwd, timeout, memory)], cwd / ".limited", workers=1, fresh=True)["job"]


# --- a site: one run's own copy of the cache, its marker folder, its outputs ----------------


@dataclass
class Site:
    dir: Path
    base: Path
    teacher: Path
    server: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        return self.dir / "cache.zarr"

    @property
    def markers(self) -> Path:
        return self.dir / "markers"

    def marker(self, tag: str = "MARKER") -> Path:
        return self.markers / tag

    def touch(self, tag: str = "MARKER") -> str:
        """A shell command that leaves evidence it ran."""
        return f"touch {self.marker(tag)}"


def root_meta(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "zarr.json").read_text())


def write_json(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta))


def rekey(manifest: dict[str, Any]) -> None:
    """Recompute the cache key as a sender who edits the manifest would (when it still parses)."""
    from softcache.cache.manifest import Manifest, compute_cache_key

    try:
        m = Manifest.model_validate(manifest)
        manifest["cache_key"] = compute_cache_key(m.teacher, m.source, m.classes, m.temperature, m.storage, m.views,
                                                  m.eval.source if m.eval else None)
    except Exception:  # noqa: BLE001 - a manifest the model refuses keeps its stale key
        pass


def edit_manifest(cache: Path, change: Callable[[dict[str, Any]], None], *, key: bool = True) -> None:
    meta = root_meta(cache)
    change(meta["attributes"]["softcache"])
    if key:
        rekey(meta["attributes"]["softcache"])
    write_json(cache / "zarr.json", meta)


def edit_array(cache: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change an array's metadata in its own zarr.json and in the consolidated copy, so readers
    of either see the same (hostile) declaration."""
    own = cache / name / "zarr.json"
    meta = json.loads(own.read_text())
    change(meta)
    write_json(own, meta)
    root = root_meta(cache)
    consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    if name in consolidated:
        change(consolidated[name])
        write_json(cache / "zarr.json", root)


def write_values(cache: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite an array's values through zarr (its codecs, checksums included, stay valid)."""
    array = zarr.open_array(str(cache / name), mode="r+")
    array[...] = change(np.asarray(array[...]))


def reseal(cache: Path) -> None:
    """Finalize again, as a sender with softcache would after editing values, so consolidated
    metadata and any digest a finalize records match the edited chunks. If finalize refuses,
    the cache is put back to complete as it was: the reader must refuse it by itself."""
    from softcache.cache.shards import finalize
    from softcache.errors import SoftcacheError

    edit_manifest(cache, lambda m: m["status"].update(state="building"), key=False)
    try:
        finalize(str(cache))
    except SoftcacheError:
        edit_manifest(cache, lambda m: m["status"].update(state="complete"), key=False)


def chunk_files(cache: Path, name: str) -> list[Path]:
    return sorted(p for p in (cache / name / "c").rglob("*") if p.is_file())


@functools.lru_cache(maxsize=1)
def _zeros_member(size: int = 64 << 20) -> bytes:
    return gzip.compress(bytes(size), compresslevel=9)


def write_gzip_bomb(path: Path, inflated: int = 4 * GiB) -> None:
    """A few MB that inflate to ``inflated`` bytes of zeros: concatenated gzip members."""
    member = _zeros_member()
    with open(path, "wb") as handle:
        for _ in range(inflated // (64 << 20)):
            handle.write(member)


class _Touch:
    """Unpickling this runs a shell command: what ``allow_pickle=true`` hands a sender."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def evil_safetensors(site: Site, arch: str, name: str = "evil.safetensors") -> Path:
    import torch
    from safetensors.torch import save_file

    path = site.dir / name
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"softcache.arch": arch})
    return path


def evil_pickle(site: Site) -> Path:
    path = site.dir / "evil.pkl"
    path.write_bytes(pickle.dumps(_Touch(site.touch("PICKLE"))))
    return path


# --- hostile caches -------------------------------------------------------------------------


def _pristine(site: Site) -> None:
    pass


def _augment_runs_code(site: Site) -> None:
    edit_manifest(site.cache, lambda m: m["views"].update(augment={
        "target": "softcache.augment:call_spec", "kwargs": {"spec": "os:system", "command": site.touch()}}))


def _data_unpickles(site: Site) -> None:
    pkl = evil_pickle(site)
    edit_manifest(site.cache, lambda m: m["source"].update(spec={
        "target": "softcache.digits:np.load", "kwargs": {"file": str(pkl), "allow_pickle": True}}))


def _data_outside(site: Site) -> None:
    edit_manifest(site.cache, lambda m: m["source"].update(spec={"target": "os:system",
                                                                 "kwargs": {"command": site.touch()}}))


def _eval_outside(site: Site) -> None:
    edit_manifest(site.cache, lambda m: m["eval"]["source"].update(spec={"target": "os:system",
                                                                         "kwargs": {"command": site.touch()}}))


def _arch(arch: Callable[[Site], str]) -> Callable[[Site], None]:
    def make(site: Site) -> None:
        site.extra["weights"] = evil_safetensors(site, arch(site))
    return make


def _redeclare_string(name: str) -> Callable[[Site], None]:
    def make(site: Site) -> None:
        edit_array(site.cache, name, lambda a: a.update(data_type="string", fill_value="",
                                                         codecs=[{"name": "vlen-utf8", "configuration": {}}]))
    return make


def _gzip_bomb(site: Site) -> None:
    edit_array(site.cache, "soft_labels", lambda a: a.update(codecs=[
        {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip", "configuration": {"level": 1}}]))
    first = chunk_files(site.cache, "soft_labels")[0]
    write_gzip_bomb(first)


def _huge_chunk(site: Site) -> None:
    edit_array(site.cache, "soft_labels",
               lambda a: a["chunk_grid"]["configuration"].update(chunk_shape=[2**31, *a["shape"][1:]]))


def _dev_zero(site: Site) -> None:
    first = chunk_files(site.cache, "soft_labels")[0]
    first.unlink()
    first.symlink_to("/dev/zero")


TRAIN_ARRAYS = ("soft_labels", "sample_index", "labels", "view_params", "stats/max_prob", "stats/entropy",
                "stats/margin", "stats/prediction")


def _sparse_chunk(site: Site) -> None:
    """A chunk file of 4 GiB that takes no disk (sparse): reading it whole would take the memory."""
    os.truncate(chunk_files(site.cache, "soft_labels")[0], 4 * GiB)


def _fifo_chunk(site: Site) -> None:
    """A named pipe where a chunk should be: opening it waits for a writer that never comes."""
    first = chunk_files(site.cache, "soft_labels")[0]
    first.unlink()
    os.mkfifo(first)


def _classes_1e9(site: Site) -> None:
    classes = 10**9
    edit_manifest(site.cache, lambda m: m["classes"].update(count=classes, names=None))

    def widen(meta: dict[str, Any]) -> None:
        meta["shape"][-1] = classes
        meta["chunk_grid"]["configuration"]["chunk_shape"][-1] = classes
    edit_array(site.cache, "soft_labels", widen)


def _rows_1e12(site: Site) -> None:
    rows = 10**12
    meta = root_meta(site.cache)["attributes"]["softcache"]
    shards = -(-rows // meta["layout"]["shard_rows"])

    def manifest(m: dict[str, Any]) -> None:
        m["layout"].update(rows=rows, num_shards=shards)
        m["source"]["num_samples"] = rows
    edit_manifest(site.cache, manifest)
    for name in TRAIN_ARRAYS:
        edit_array(site.cache, name, lambda a: a.update(shape=[rows, *a["shape"][1:]]))
    edit_array(site.cache, "shard_done", lambda a: a.update(shape=[shards]))


def _soft_deleted(site: Site) -> None:
    shutil.rmtree(site.cache / "soft_labels")


def _eval_deleted(site: Site) -> None:
    shutil.rmtree(site.cache / "eval")


def _half_chunks(site: Site) -> None:
    for chunk in chunk_files(site.cache, "soft_labels")[1::2]:
        chunk.unlink()


def _nan_rows(site: Site) -> None:
    def poison(values: np.ndarray) -> np.ndarray:
        values[5, 0, 3] = np.nan
        values[700, 1, :] = np.inf
        return values
    write_values(site.cache, "soft_labels", poison)
    reseal(site.cache)


def _temperature(value: float) -> Callable[[Site], None]:
    def make(site: Site) -> None:
        edit_manifest(site.cache, lambda m: m.update(temperature=value))
    return make


def _labels_shifted(site: Site) -> None:
    write_values(site.cache, "labels", lambda y: (y + 1) % 10)


def _scaled(site: Site) -> None:
    write_values(site.cache, "soft_labels", lambda z: (z.astype(np.float32) * 0.05).astype(z.dtype))


def _truncated(site: Site) -> None:
    chunk = chunk_files(site.cache, "soft_labels")[2]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


def _labels_out_of_range(site: Site) -> None:
    def poison(y: np.ndarray) -> np.ndarray:
        y[10] = 57
        return y
    write_values(site.cache, "labels", poison)
    reseal(site.cache)


def _view_param(column: str, value: float) -> Callable[[Site], None]:
    def make(site: Site) -> None:
        names = root_meta(site.cache)["attributes"]["softcache"]["views"]["param_names"]

        def poison(p: np.ndarray) -> np.ndarray:
            p[3, 1, names.index(column)] = value
            return p
        write_values(site.cache, "view_params", poison)
        reseal(site.cache)
    return make


def _existing_out(site: Site) -> None:
    (site.dir / "out").mkdir()  # an earlier run's results: a leaderboard (and weights) already there
    (site.dir / "out" / "leaderboard.parquet").write_text("earlier results\n")


def _big_attribute(site: Site) -> None:
    edit_manifest(site.cache, lambda m: m["source"]["info"].update(padding="x" * 50_000_000), key=False)


def _deep_json(site: Site) -> None:
    meta = root_meta(site.cache)
    meta["attributes"]["softcache"]["source"]["info"]["deep"] = "@DEEP@"
    text = json.dumps(meta).replace('"@DEEP@"', "[" * 100_000 + "]" * 100_000)
    (site.cache / "zarr.json").write_text(text)


def _dotdot_member(site: Site) -> None:
    """The consolidated metadata names a node outside the store, and there is one to read."""
    shutil.copytree(site.cache / "labels", site.dir / "escape")
    root = root_meta(site.cache)
    root["consolidated_metadata"]["metadata"]["../escape"] = root["consolidated_metadata"]["metadata"]["labels"]
    write_json(site.cache / "zarr.json", root)


def _symlinked_chunk(site: Site) -> None:
    first = chunk_files(site.cache, "soft_labels")[0]
    outside = site.dir / "outside-chunk"
    shutil.copyfile(first, outside)
    first.unlink()
    first.symlink_to(outside)


def _symlinked_folder(site: Site) -> None:
    chunks = site.cache / "soft_labels" / "c"
    outside = site.dir / "outside-chunks"
    shutil.move(str(chunks), outside)
    chunks.symlink_to(outside, target_is_directory=True)


def _garbage_text(relative: str) -> Callable[[Site], None]:
    def make(site: Site) -> None:
        (site.cache / relative).write_text("{not json")
    return make


def _longer_than_manifest(site: Site) -> None:
    edit_array(site.cache, "soft_labels", lambda a: a.update(shape=[2 * a["shape"][0], *a["shape"][1:]]))


def _negative_shape(site: Site) -> None:
    edit_array(site.cache, "soft_labels", lambda a: a.update(shape=[-5, *a["shape"][1:]]))


def _chunk_outside_grid(site: Site) -> None:
    first = chunk_files(site.cache, "soft_labels")[0]
    stray = site.cache / "soft_labels" / "c" / "99" / "0" / "0"
    stray.parent.mkdir(parents=True)
    shutil.copyfile(first, stray)


# --- commands -------------------------------------------------------------------------------

SC = ["-m", "softcache"]


def _train(site: Site, *extra: str, student: str = STUDENT, epochs: int = 1) -> list[str]:
    return [*SC, "train", "--cache", str(site.cache), "--student", student, "--epochs", str(epochs),
            "--out", str(site.dir / "out"), "--quiet", *extra]


def _pipeline(site: Site) -> Path:
    path = site.dir / "pipeline.toml"
    path.write_text(f"""version = 1
name = "received"
workdir = {json.dumps(str(site.dir))}

[teacher]
spec = {json.dumps(str(site.teacher))}

[data]
train = "{DATA_SPEC}"
eval = "{EVAL_SPEC}"

[cache]
url = {json.dumps(str(site.cache))}
chunk_rows = 256

[[train]]
name = "students"
out = "run-out"
epochs = 1

[[train.students]]
spec = "{STUDENT}"
""")
    return path


API_TRAIN = """
import sys

import softcache
from softcache.errors import SoftcacheError

try:
    softcache.train(sys.argv[1], [sys.argv[3]], out_dir=sys.argv[2], config=softcache.TrainConfig(epochs=1),
                    progress=False)
except SoftcacheError as exc:
    print(f"softcache: error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""

COMMANDS: dict[str, Callable[[Site], list[str]]] = {
    "train": lambda s: _train(s),
    "train-data": lambda s: _train(s, "--data", DATA_SPEC, "--eval-data", EVAL_SPEC),
    "train-data-only": lambda s: _train(s, "--data", DATA_SPEC),
    "train-hard": lambda s: _train(s, "--alpha", "0", "--data", DATA_SPEC, "--eval-data", EVAL_SPEC, "--json",
                                   epochs=3),
    "train-student": lambda s: _train(s, student=str(s.extra["weights"])),
    "train-into-cache": lambda s: [*SC, "train", "--cache", str(s.cache), "--student", STUDENT, "--epochs", "1",
                                   "--out", str(s.cache / "results"), "--quiet"],
    "run": lambda s: [*SC, "run", str(_pipeline(s)), "--only", "train", "--quiet"],
    "api": lambda s: ["-c", API_TRAIN, str(s.cache), str(s.dir / "out"), STUDENT],
    "inspect": lambda s: [*SC, "inspect", str(s.cache)],
    "validate": lambda s: [*SC, "validate", str(s.cache)],
    "validate-deep": lambda s: [*SC, "validate", str(s.cache), "--deep"],
    "stats": lambda s: [*SC, "stats", str(s.cache)],
    "build-teacher": lambda s: [*SC, "build", "--teacher", str(s.extra["weights"]), "--data", EVAL_SPEC,
                                "--out", str(s.dir / "built.zarr"), "--quiet"],
    "build-url": lambda s: [*SC, "build", "--teacher", f"{s.server.replace('://', f'://reader:{SECRET}@')}/"
                            f"{s.teacher.name}", "--data", EVAL_SPEC, "--out", str(s.dir / "built.zarr"),
                            "--quiet", "--json"],
}


# --- expectations ---------------------------------------------------------------------------


def assert_one_line_error(outcome: Outcome) -> None:
    """The contract for a refusal: one ``softcache: error:`` line (warnings in the same form
    may come before it), no traceback, and a deliberate message rather than an unexpected
    exception caught at the top ("rerun with --debug")."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("softcache: error:")]
    other = [line for line in lines if not line.startswith(("softcache: error:", "softcache: warning:"))]
    assert len(errors) == 1 and not other, f"stderr is not one error line:\n{outcome.stderr[-3000:]}"
    assert "rerun with --debug" not in errors[0], f"crashed instead of refusing: {errors[0]}"


def _leaderboard(outcome: Outcome) -> list[dict[str, Any]]:
    return json.loads(outcome.stdout)["leaderboard"]


def no_results(site: Site, outcome: Outcome) -> None:
    out = site.dir / "out"
    assert not (out / "leaderboard.parquet").exists(), "a refused training still wrote a leaderboard"
    assert not list(out.glob("students/*.safetensors")), "a refused training still wrote students"


def hard_labels_are_the_users(site: Site, outcome: Outcome) -> None:
    """Either the disagreement was refused, or the hard-label student learnt the user's labels."""
    if outcome.rc == 0:
        accuracy = _leaderboard(outcome)[0]["test_accuracy"]
        assert accuracy > 0.5, f"hard-label student trained on the cache's wrong labels: test accuracy {accuracy}"


def trained(site: Site, outcome: Outcome) -> None:
    assert (site.dir / "out" / "leaderboard.parquet").is_file()


def learnt(site: Site, outcome: Outcome) -> None:
    accuracy = _leaderboard(outcome)[0]["test_accuracy"]
    assert accuracy > 0.5, f"control: a hard-label student should learn digits in 3 epochs, got {accuracy}"


def kept_existing(site: Site, outcome: Outcome) -> None:
    out = site.dir / "out"
    assert (out / "leaderboard.parquet").read_text() == "earlier results\n"
    assert not (out / "students").exists()


def nothing_inside_cache(site: Site, outcome: Outcome) -> None:
    assert not (site.cache / "results").exists(), "train wrote its results inside the cache"


def no_secret(site: Site, outcome: Outcome) -> None:
    assert SECRET not in outcome.stdout + outcome.stderr, "the credential was printed"
    built = site.dir / "built.zarr"
    assert built.is_dir(), "the build over a credentialed URL did not produce a cache"
    for path in built.rglob("zarr.json"):
        assert SECRET not in path.read_text(), f"the credential was recorded in {path.relative_to(site.dir)}"


@dataclass(frozen=True)
class Run:
    case: str
    command: str
    make: Callable[[Site], None]
    codes: frozenset[int]
    bounded: bool = False
    check: Callable[[Site, Outcome], None] | None = None

    @property
    def id(self) -> str:
        return f"{self.case}:{self.command}"


def runs(case: str, make: Callable[[Site], None], commands: dict[str, Sequence[int]], *, bounded: bool = False,
         check: Callable[[Site, Outcome], None] | None = None) -> list[Run]:
    return [Run(case, command, make, frozenset(codes), bounded, check) for command, codes in commands.items()]


READ_ONLY = {"inspect": (0, 1), "stats": (0, 1)}
"""Read-only commands never import what a cache names; showing or refusing it are both fine."""

RUNS: list[Run] = [
    # controls: the untouched cache works, so a refusal below is about the damage
    *runs("pristine", _pristine, {"run": (0,), "api": (0,), "validate-deep": (0,), "inspect": (0,), "stats": (0,)}),
    Run("pristine", "train", _pristine, frozenset({0}), check=trained),
    Run("pristine", "train-hard", _pristine, frozenset({0}), check=learnt),
    # code named by a cache or a weights file never runs
    *runs("augment-call-spec", _augment_runs_code, {
        "train": SPEC_REFUSED, "train-data": SPEC_REFUSED, "run": SPEC_REFUSED, "api": SPEC_REFUSED,
        "validate": (1,), "validate-deep": (1,), **READ_ONLY}),
    *runs("data-np-load-pickle", _data_unpickles, {
        "train": SPEC_REFUSED, "api": SPEC_REFUSED, "run": (0, 1, 2), "validate": (1,), "validate-deep": (1,),
        **READ_ONLY}),
    *runs("data-outside-softcache", _data_outside, {
        "train": SPEC_REFUSED, "api": SPEC_REFUSED, "run": (0, 1, 2), "validate": (0, 1), "validate-deep": (0, 1),
        **READ_ONLY}),
    *runs("eval-outside-softcache", _eval_outside, {"train-data-only": SPEC_REFUSED, "validate": (0, 1)}),
    *runs("arch-os-system", _arch(lambda s: f"os:system,command={s.touch()}"),
          {"build-teacher": SPEC_REFUSED, "train-student": SPEC_REFUSED}),
    *runs("arch-call-spec", _arch(lambda s: f"softcache.augment:call_spec,spec=os:system,command={s.touch()}"),
          {"build-teacher": SPEC_REFUSED, "train-student": SPEC_REFUSED}),
    *runs("arch-np-load-pickle", _arch(lambda s: f"softcache.digits:np.load,file={evil_pickle(s)},allow_pickle=true"),
          {"build-teacher": SPEC_REFUSED, "train-student": SPEC_REFUSED}),
    # tiny caches that would exhaust memory or time are refused in bounded time and memory
    *runs("soft-labels-as-string", _redeclare_string("soft_labels"), {"train": (1,), "validate": (1,), "inspect": (1,)},
          bounded=True),
    *runs("max-prob-as-string", _redeclare_string("stats/max_prob"), {"inspect": (1,), "stats": (1,),
                                                                       "validate": (1,)}, bounded=True),
    *runs("gzip-bomb-4GB", _gzip_bomb, {"validate": (1,), "train": (1,)}, bounded=True),
    *runs("chunk-shape-2e31", _huge_chunk, {"validate": (1,), "train": (1,)}, bounded=True),
    *runs("chunk-is-dev-zero", _dev_zero, {"validate": (1,), "train": (1,)}, bounded=True),
    *runs("rows-1e12", _rows_1e12, {"validate": (1,), "validate-deep": (1,), "inspect": (1,), "train": (1,)},
          bounded=True),
    *runs("chunk-sparse-4GiB", _sparse_chunk, {"validate": (1,), "train": (1,)}, bounded=True),
    *runs("chunk-is-a-fifo", _fifo_chunk, {"validate": (1,), "train": (1,)}, bounded=True),
    *runs("classes-1e9", _classes_1e9, {"validate": (1,), "inspect": (1,), "train": (1,)}, bounded=True),
    *runs("metadata-50MB", _big_attribute, {"inspect": (1,), "validate": (1,)}, bounded=True),
    *runs("metadata-nested-1e5", _deep_json, {"inspect": (1,), "validate": (1,)}, bounded=True),
    # garbage does not train, and validation reports it
    *runs("soft-labels-deleted", _soft_deleted, {"train": (1,), "validate": (1,)}, check=no_results),
    *runs("eval-split-deleted", _eval_deleted, {"train": (1,), "validate": (1,)}, check=no_results),
    *runs("half-the-chunks-deleted", _half_chunks, {"train": (1,), "validate": (1,)}, check=no_results),
    *runs("nan-inf-in-2-rows", _nan_rows, {"train": (1,), "validate": (1,)}, check=no_results),
    *runs("temperature-infinity", _temperature(float("inf")), {"train": (1,), "validate": (1,)}, check=no_results),
    *runs("temperature-1e-30", _temperature(1e-30), {"train": (1,)}, check=no_results),
    *runs("labels-shifted-by-one", _labels_shifted, {"validate-deep": (1,)}),
    Run("labels-shifted-by-one", "train-hard", _labels_shifted, frozenset({0, 1}), check=hard_labels_are_the_users),
    *runs("logits-scaled-0.05", _scaled, {"validate-deep": (1,)}),
    *runs("truncated-chunk", _truncated, {"validate": (1,), "train": (1,)}, check=no_results),
    *runs("label-outside-classes", _labels_out_of_range, {"train": (1,)}, check=no_results),
    *runs("view-partner-out-of-range", _view_param("mixup.partner", 1e7), {"train": (1,)}, check=no_results),
    *runs("view-param-nan", _view_param("mixup.lam", float("nan")), {"train": (1,)}, check=no_results),
    *runs("chunk-outside-the-grid", _chunk_outside_grid, {"validate-deep": (1,)}),
    *runs("array-longer-than-manifest", _longer_than_manifest, {"validate": (1,), "train": (1,)}),
    *runs("negative-shape", _negative_shape, {"inspect": (1,), "validate": (1,), "train": (1,)}),
    *runs("root-zarr-json-not-json", _garbage_text("zarr.json"), {"inspect": (1,), "validate": (1,), "train": (1,)}),
    *runs("array-zarr-json-not-json", _garbage_text("soft_labels/zarr.json"), {"validate": (1,)}),
    # nothing is read from outside the store
    *runs("chunk-symlink-outside", _symlinked_chunk, {"validate": (1,), "train": (1,)}),
    *runs("chunk-folder-symlink-outside", _symlinked_folder, {"validate": (1,)}),
    *runs("member-named-dotdot", _dotdot_member, {"validate": (1,), "inspect": (0, 1)}),
    # outputs and shared artifacts
    Run("credentialed-teacher-url", "build-url", _pristine, frozenset({0}), check=no_secret),
    Run("out-exists", "train", _existing_out, frozenset({2}), check=kept_existing),
    Run("out-inside-cache", "train-into-cache", _pristine, frozenset({2}), check=nothing_inside_cache),
]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cache every case starts from: digits, a trained teacher, 2 replayable views."""
    out = tmp_path_factory.mktemp("hostile-base") / "cache.zarr"
    build(str(teacher_path), DATA_SPEC, str(out), eval_data=EVAL_SPEC, views=2, augment=AUGMENT, chunk_rows=256,
          progress=False)
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def server(teacher_path: Path) -> Iterator[str]:
    """Serves the teacher's folder over HTTP (it ignores credentials: the client must still not
    record or print them)."""
    handler = functools.partial(_Quiet, directory=str(teacher_path.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Done:
    site: Site
    outcome: Outcome | None
    error: str | None = None


def _selected(request: pytest.FixtureRequest) -> list[Run]:
    """The runs the session will test (all of them, or those ``-k`` left), so that they can
    run side by side before the first test looks at its result."""
    chosen = []
    for item in request.session.items:
        run = getattr(item, "callspec", None) and item.callspec.params.get("run")
        if isinstance(run, Run):
            chosen.append(run)
    return chosen


@pytest.fixture(scope="module")
def done(request: pytest.FixtureRequest, base: Path, teacher_path: Path, server: str,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    root = tmp_path_factory.mktemp("hostile")
    sites: dict[str, Done] = {}
    jobs = []
    for i, run in enumerate(_selected(request)):
        site = Site(root / f"run{i:03d}", base, teacher_path, server)
        site.markers.mkdir(parents=True)
        shutil.copytree(base, site.cache, symlinks=True)
        try:
            run.make(site)
            argv = COMMANDS[run.command](site)
        except Exception as exc:  # noqa: BLE001 - reported by the run's own test
            sites[run.id] = Done(site, None, f"could not prepare the case: {type(exc).__name__}: {exc}")
            continue
        sites[run.id] = Done(site, None)
        jobs.append(Job(run.id.replace(":", "__"), argv, site.dir))
    outcomes = run_jobs(jobs, root / "jobs") if jobs else {}
    for run_id, entry in sites.items():
        entry.outcome = outcomes.get(run_id.replace(":", "__"))
    return sites


# --- the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS, ids=[r.id for r in RUNS])
def test_hostile(run: Run, done: dict[str, Done]) -> None:
    entry = done[run.id]
    assert entry.error is None, entry.error
    site, outcome = entry.site, entry.outcome
    assert outcome is not None
    ran = sorted(p.name for p in site.markers.iterdir())
    assert not ran, f"code named by the file ran (markers {ran}); exit {outcome.rc}"
    assert not outcome.timed_out, f"killed after {TIMEOUT}s: {outcome.last_line()}"
    assert outcome.rc in run.codes, (f"exit {outcome.rc} (expected {sorted(run.codes)}) in {outcome.seconds:.1f}s: "
                                     f"{outcome.last_line()}")
    if outcome.rc != 0:
        assert_one_line_error(outcome)
        if run.command.startswith("validate"):
            assert outcome.stdout.startswith("INVALID"), f"validate did not report: {outcome.stdout[:500]}"
    if run.bounded:
        assert outcome.seconds < BOUNDED_SECONDS, f"refusal took {outcome.seconds:.1f}s"
    assert outcome.peak_rss < MEMORY_LIMIT
    if run.check is not None:
        run.check(site, outcome)


def test_no_machine_path_is_recorded(base: Path, teacher_path: Path) -> None:
    """The base cache was built from a teacher file in a temporary folder of this machine."""
    text = (base / "zarr.json").read_text()
    assert str(teacher_path.parent) not in text, "the teacher's absolute path is recorded in the manifest"
    assert str(base.parent) not in text, "the cache's own absolute path is recorded in the manifest"


def test_harness_enforces_the_memory_limit(tmp_path: Path) -> None:
    """The limit is real: a command that allocates 4 GiB fails under it and succeeds without."""
    code = "import numpy; a = numpy.ones(1 << 29); print(a.sum())"
    limited = run_limited(["-c", code], tmp_path, memory=2 * GiB, timeout=60)
    assert limited.rc != 0 and "MemoryError" in limited.stderr
    roomy = run_limited(["-c", "import numpy; a = numpy.ones(1 << 20); print(int(a.sum()))"], tmp_path, timeout=60)
    assert roomy.rc == 0 and roomy.stdout.strip() == str(1 << 20)
    slow = run_limited(["-c", "import time; time.sleep(30)"], tmp_path, timeout=1)
    assert slow.timed_out and slow.seconds < 10
