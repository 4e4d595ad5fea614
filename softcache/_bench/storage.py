"""What each way of storing soft labels costs and what it loses: ``softcache bench --storage-modes``.

Never part of the default or ``--quick`` bench (about 20 CPU minutes at full size). For each
storage mode a cache is built with the public ``softcache.build()`` and the demo's students are
trained from it with ``softcache.train()``, on two workloads:

- the language-model demo (:mod:`softcache.demo_lm`): its BPE tokenizer and GPT teacher, kept in
  the workdir as the demo keeps them (reused when there, trained only when missing), its student
  rows budget, batch size, learning rate, alpha and T = 1; modes ``full``, ``topk:16``,
  ``topk:64``, ``sample:50``, ``sample:12``; scored by held-out bits per token (the held-out
  files' rows, as the demo scores its teacher).
- the digits demo (:mod:`softcache.demo`): its teacher and its students that train at the cache
  temperature (T = 4: a compact cache trains at its own), beside its cross-entropy students;
  modes ``full``, ``topk:3``, ``topk:5``, ``sample:12``, ``sample:50``; scored by test accuracy.

Per mode and workload:

- bytes per token (per sample on digits) of the soft-label arrays (values, ids, leftover):
  nominal, from :mod:`softcache.cache.layout`, and on disk, the chunk files of those arrays over
  the tokens (chunk padding and checksums included); for sampled storage, the mean number of
  distinct ids a token keeps.
- gradient angles between the mode's loss and full distillation from the live teacher's float32
  distribution (:mod:`softcache._bench.angles`): w.r.t. the student's parameters on one held-out
  batch of the training batch size (mean over ``angle_batches`` batches), and w.r.t. the logits
  per position (mean over the positions), for the soft term alone and at the students' alpha.
  The student is the first seed's cross-entropy student as trained (at the LM demo's small
  budget, partly trained).
- the students' held-out score over the seeds (mean, std), beside full storage's: ``vs_full``
  (ratio of the means) and ``within_seed_noise`` (not worse than full storage by more than twice
  the standard error of the difference of the two means); the cross-entropy students' and the
  teacher's for reference.
- a student step from the mode's cache / a cross-entropy-only step (``StudentRun.step`` on the
  same rows, one thread, alternated rounds, median of the per-round ratios).

Targets, printed met or missed and asserted nowhere (:func:`storage_targets`).
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from softcache import demo, demo_lm
from softcache._bench.angles import CPU, held_out_batches, measure_angles
from softcache._bench.lm import library_steps
from softcache._bench.timing import alternate, median, ratio, timer
from softcache._bench.wide import one_thread
from softcache._bench.workload import StorageSettings
from softcache.cache import layout
from softcache.cache.store import Cache
from softcache.config import TEMPERATURE, StudentConfig, TrainConfig
from softcache.data import materialize
from softcache.digits import load as load_digits
from softcache.errors import UsageError
from softcache.sequences import next_token_targets
from softcache.student._batch import Batch
from softcache.student.loaders import open_loader
from softcache.student.run import make_run
from softcache.student.sequence import SequenceLoader
from softcache.student.train import TrainResult, train
from softcache.teacher.build import build
from softcache.teacher.fit import lm_bits_per_token
from softcache.text import stdlib_rows, train_tokenizer
from softcache.weights import load_model, save_model

SCRATCH = "storage-modes"
"""The workdir's folder for this comparison's caches (the LM teacher stays where the demo keeps it)."""
CE = "cross-entropy"
SAMPLE_BYTES_PER_TOKEN = 40.0
WITHIN = 1.01  # a sample mode's students' bits per token / full storage's
TOPK_BYTES_SHARE = 0.05  # a top-k mode's bytes (leftover included) / full storage's float16 bytes
COMPACT_STEP = 1.15  # a compact mode's step / a cross-entropy step


@dataclass
class Task:
    """One workload the modes are compared on: its teacher, what ``build`` labels, the students
    (every seed's, cross-entropy and distilled) and how they train and score, held-out batches
    for the gradient angles and the batches a timed step takes."""

    name: str
    unit: str  # what bytes are counted per: token or sample
    metric: str  # bits_per_token (lower is better) or accuracy
    teacher_path: Path
    teacher: nn.Module
    data: str
    eval_data: str | None
    temperature: float
    configs: list[StudentConfig]
    train_config: TrainConfig
    held_out: list[Batch]
    score: Callable[[TrainResult], dict[str, float]]
    batches: Callable[[Cache, int], list[Batch]]
    scratch: Path
    info: dict[str, Any]

    @property
    def sequence(self) -> bool:
        return self.unit == "token"


def kind(config: StudentConfig) -> str:
    """A student's architecture as the tables name it: the SPEC's callable (gpt, mlp, tiny_cnn)."""
    return config.spec_text().split(",")[0].rsplit(":", 1)[-1]


def named(configs: list[StudentConfig]) -> list[StudentConfig]:
    """The students with names that say their architecture, role and seed (leaderboard keys)."""
    return [c.model_copy(update={"name": f"{kind(c)} {CE if c.alpha == 0 else 'distilled'} s{c.seed}"})
            for c in configs]


def first_batches(epoch: Callable[[int], Iterator[Batch]], count: int) -> list[Batch]:
    """The first ``count`` batches a loader serves, epochs wrapping, taken before any timing."""
    out: list[Batch] = []
    e = 0
    while len(out) < count:
        taken = len(out)
        out += [b for _, b in zip(range(count - len(out)), epoch(e))]
        if len(out) == taken:
            raise UsageError("no rows to take training batches from")
        e += 1
    return out


def lm_task(s: StorageSettings, workdir: Path, say: Callable[[str], None]) -> Task:
    """The language-model demo's tokenizer and teacher in ``workdir`` (reused, or made as the
    demo makes them), its training rows and students, scored on the held-out rows."""
    say("language model: the demo's tokenizer and teacher")
    tokenizer = train_tokenizer(workdir / "tokenizer.json", demo_lm.VOCAB)
    teacher_path, reused = demo_lm._teacher(workdir, tokenizer, progress=False)
    teacher = load_model(str(teacher_path)).eval()
    rows, length, batch = s.lm_rows or demo_lm.STUDENT_ROWS, demo_lm.LENGTH, demo_lm.STUDENT_BATCH
    held = stdlib_rows(tokenizer, length, "eval", max_rows=s.lm_eval_rows)
    targets = next_token_targets(held.tokens, held.loss_mask)
    teacher_bits = lm_bits_per_token(teacher, held)

    def score(result: TrainResult) -> dict[str, float]:
        return {name: lm_bits_per_token(model, held) for name, model in result.models.items()}

    def batches(cache: Cache, count: int) -> list[Batch]:
        return first_batches(SequenceLoader(cache, batch_size=batch).epoch, count)

    data = (f"softcache.text:stdlib_rows,tokenizer={tokenizer.resolve()},length={length},split=train,"
            f"max_rows={rows}")
    info = {"teacher": demo_lm.TEACHER, "teacher_reused": reused, "teacher_bits_per_token": teacher_bits,
            "student": demo_lm.STUDENT, "rows": rows, "length": length, "tokens": rows * length, "batch_size": batch,
            "lr": demo_lm.STUDENT_LR, "alpha": demo_lm.ALPHA, "temperature": demo_lm.TEMPERATURE,
            "vocab": demo_lm.VOCAB, "eval_rows": len(held)}
    return Task("lm", "token", "bits_per_token", teacher_path, teacher, data, None, demo_lm.TEMPERATURE,
                named(demo_lm.students(tuple(s.seeds))), TrainConfig(epochs=1, batch_size=batch, device="cpu"),
                held_out_batches(held.tokens, targets, held.loss_mask, batch, s.angle_batches), score, batches,
                workdir / SCRATCH / "lm", info)


def digits_task(s: StorageSettings, workdir: Path, say: Callable[[str], None]) -> Task:
    """The digits demo's teacher (trained here, in seconds), its cross-entropy students and those
    of its distilled students that train at the cache temperature, scored on the test split."""
    say("digits: the demo's teacher")
    scratch = workdir / SCRATCH / "digits"
    scratch.mkdir(parents=True, exist_ok=True)
    epochs = {} if s.digits_teacher_epochs is None else {"epochs": s.digits_teacher_epochs}
    teacher, accuracy = demo.train_teacher(seed=0, device="cpu", **epochs)
    path = save_model(teacher, scratch / "teacher.safetensors", demo.TEACHER_SPEC)
    config = TrainConfig(device="cpu", **({} if s.digits_epochs is None else {"epochs": s.digits_epochs}))
    configs = [c for seed in s.seeds for c in demo.demo_students(seed)
               if (c.alpha == 0 and c.label_smoothing == 0) or (c.alpha > 0 and c.temperature == TEMPERATURE)]
    train_x, _ = materialize(load_digits("train"))
    test_x, test_y = materialize(load_digits("test"))

    def score(result: TrainResult) -> dict[str, float]:
        board = result.leaderboard
        return dict(zip(board["student"].to_list(), board["test_accuracy"].to_list()))

    def batches(cache: Cache, count: int) -> list[Batch]:  # the cache's rows are the dataset's, in order
        return first_batches(open_loader(cache, inputs=train_x, batch_size=config.batch_size, mode="memory",
                                         shuffle_seed=config.shuffle_seed).epoch, count)

    info = {"teacher": demo.TEACHER_SPEC, "teacher_accuracy": accuracy,
            "students": sorted({c.spec_text() for c in configs}), "rows": len(train_x),
            "batch_size": config.batch_size, "epochs": config.epochs, "temperature": TEMPERATURE,
            "eval_rows": len(test_x)}
    return Task("digits", "sample", "accuracy", path, teacher.eval(), demo.DATA_SPEC, demo.EVAL_SPEC, TEMPERATURE,
                named(configs), config, held_out_batches(test_x, test_y, None, config.batch_size, s.angle_batches),
                score, batches, scratch, info)


# -- bytes -------------------------------------------------------------------------------------


def stored_bytes(cache: Cache, path: Path, unit: str) -> dict[str, float]:
    """Bytes per token (or sample) of the training rows' soft-label arrays: as the layout sizes
    them, and as the chunk files on disk hold them; for sampled storage, the distinct ids kept."""
    manifest, names = cache.manifest, layout.soft_arrays(cache.manifest)
    positions = manifest.positions
    on_disk = sum(f.stat().st_size for n in names for f in (path / n).rglob("*")
                  if f.is_file() and f.name != "zarr.json")
    out = {f"bytes_per_{unit}": float(layout.label_bytes(manifest.storage, manifest.classes.count)),
           f"bytes_per_{unit}_on_disk": on_disk / (cache.train.rows * positions)}
    if manifest.storage.mode == "sample":
        counts = cache.train.read(layout.SOFT)
        out[f"distinct_ids_per_{unit}"] = float((counts > 0).sum(-1).mean())
    return out


# -- students ----------------------------------------------------------------------------------


def spread(values: list[float], metric: str) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {metric: values, "mean": statistics.fmean(values), "std": std, "seeds": len(values)}


def versus(mode: dict[str, Any], full: dict[str, Any], lower_is_better: bool) -> dict[str, Any]:
    """A mode's students beside full storage's: the ratio and difference of the means, and
    whether the mode is worse by no more than twice the standard error of that difference."""
    diff = mode["mean"] - full["mean"]
    noise = 2 * math.sqrt(mode["std"] ** 2 / mode["seeds"] + full["std"] ** 2 / full["seeds"])
    worse = diff if lower_is_better else -diff
    return {"vs_full": mode["mean"] / full["mean"], "diff_vs_full": diff, "seed_noise": noise,
            "within_seed_noise": worse <= noise}


def by_kind(configs: list[StudentConfig], scores: dict[str, float], metric: str) -> dict[str, dict[str, Any]]:
    """The seeds' scores of each architecture's students."""
    kinds: dict[str, list[float]] = {}
    for c in configs:
        kinds.setdefault(kind(c), []).append(scores[str(c.name)])
    return {k: spread(v, metric) for k, v in kinds.items()}


# -- step cost ---------------------------------------------------------------------------------


def measure_steps(task: Task, caches: dict[str, Cache], student: StudentConfig,
                  s: StorageSettings) -> dict[str, dict[str, float]]:
    """Per mode, a distilling step from its cache / a cross-entropy step on the same rows."""
    batches = {mode: task.batches(cache, s.steps) for mode, cache in caches.items()}
    first = next(iter(batches.values()))
    classes, probe = next(iter(caches.values())).num_classes, first[0].inputs[:2]
    runs = {mode: make_run(student, classes, probe, CPU) for mode in caches}
    runs[CE] = make_run(student.model_copy(update={"alpha": 0.0}), classes, probe, CPU)
    feeds = {**batches, CE: first}  # a cross-entropy step reads no soft label
    with one_thread():
        times = alternate({name: partial(library_steps, run, feeds[name], task.temperature)
                           for name, run in runs.items()}, s.repeats)
    ms = {name: 1000 * median(t) / len(feeds[name]) for name, t in times.items()}
    return {mode: {"step_vs_ce": ratio(times, mode, CE), "step_ms": ms[mode], "ce_step_ms": ms[CE]} for mode in caches}


# -- one workload ------------------------------------------------------------------------------


def measure_task(task: Task, modes: tuple[str, ...], s: StorageSettings, say: Callable[[str], None]) -> dict[str, Any]:
    """Every figure of one workload (see the module docstring)."""
    if "full" not in modes:
        raise UsageError(f"{task.name}: storage modes {', '.join(modes)} lack 'full', which the others are "
                         "compared with")
    modes = ("full", *(m for m in modes if m != "full"))
    task.scratch.mkdir(parents=True, exist_ok=True)
    lower = task.metric == "bits_per_token"
    distilled = [c for c in task.configs if c.alpha > 0]
    baselines = [c for c in task.configs if c.alpha == 0]
    caches: dict[str, Cache] = {}
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        say(f"{task.name}: {mode} cache and students")
        path = task.scratch / f"{mode.replace(':', '-')}.zarr"
        began = timer()
        cache = build(str(task.teacher_path.resolve()), task.data, str(path), eval_data=task.eval_data, storage=mode,
                      temperature=task.temperature, device="cpu", overwrite=True, progress=False)
        caches[mode] = cache
        out[mode] = {"storage": mode, "build_seconds": began(), **stored_bytes(cache, path, task.unit)}
        began = timer()  # full storage, the reference, also trains the cross-entropy students
        result = train(cache, (baselines if mode == "full" else []) + distilled, config=task.train_config,
                       progress=False)
        out[mode]["train_seconds"] = began()
        scores = task.score(result)
        out[mode]["students"] = by_kind(distilled, scores, task.metric)
        if mode == "full":
            cross_entropy = by_kind(baselines, scores, task.metric)
            angle_student = result.models[str(baselines[0].name)]
    full_bytes = out["full"][f"bytes_per_{task.unit}"]
    for mode, m in out.items():
        m["bytes_vs_full"] = m[f"bytes_per_{task.unit}"] / full_bytes
        for k, st in m["students"].items():
            st.update(versus(st, out["full"]["students"][k], lower))
    say(f"{task.name}: gradient angles to full distillation")
    for mode, angles in measure_angles(task.teacher, task.held_out, task.temperature, task.sequence, angle_student,
                                       modes, distilled[0]).items():
        out[mode].update(angles)
    say(f"{task.name}: step from each cache / cross-entropy step")
    for mode, steps in measure_steps(task, caches, distilled[0], s).items():
        out[mode].update(steps)
    return {**task.info, "metric": task.metric, "unit": task.unit, "cross_entropy": cross_entropy, "modes": out}


def storage_targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets beside the figures: a sample mode at most 40 bytes per token whose students are
    within 1% of full storage's bits per token (or within seed noise); a top-k mode's bytes,
    leftover included, at most 5% of full float16 storage's; every compact step at most 1.15 x a
    cross-entropy step. All on the language-model demo; the digits table is reported beside them."""
    out: dict[str, dict[str, Any]] = {}

    def add(key: str, value: float, target: str, met: bool) -> None:
        out[key] = {"value": value, "target": target, "met": bool(met)}

    for name, section in ((n, r[n]) for n in ("lm", "digits") if n in r):
        if name == "lm":  # one sample mode must be both small and as good as full storage
            small = [(mode, m) for mode, m in section["modes"].items()
                     if mode.startswith("sample:") and m["bytes_per_token"] <= SAMPLE_BYTES_PER_TOKEN]
            graded = [(all(st["vs_full"] <= WITHIN or st["within_seed_noise"] for st in m["students"].values()),
                       max(st["vs_full"] for st in m["students"].values()), mode) for mode, m in small]
            ok, worst, mode = max(graded, key=lambda g: (g[0], -g[1]), default=(False, math.inf, "none"))
            add(f"lm sample mode at <= {SAMPLE_BYTES_PER_TOKEN:g} bytes per token ({mode}): students' bits per "
                "token / full storage's", worst, f"<= {WITHIN:g} or within seed noise", ok)
        for mode, m in section["modes"].items():
            if name == "lm" and mode.startswith("topk:"):
                add(f"lm {mode} bytes / full float16 bytes", m["bytes_vs_full"], f"<= {TOPK_BYTES_SHARE:g}",
                    m["bytes_vs_full"] <= TOPK_BYTES_SHARE)
            if name == "lm" and mode != "full":  # digits: a 2k-parameter student, all overhead
                add(f"{name} {mode} step / cross-entropy step", m["step_vs_ce"], f"<= {COMPACT_STEP:g}",
                    m["step_vs_ce"] <= COMPACT_STEP)
    return out


def run_storage_bench(settings: StorageSettings | None = None, workdir: str | Path | None = None,
                      log: Callable[[str], None] | None = None, command: str | None = None) -> dict[str, Any]:
    """Every figure on digits and on the language-model demo; one JSON-ready object. The LM
    teacher and tokenizer live in ``workdir`` as ``softcache demo --lm`` keeps them (a demo's
    workdir reuses its teacher), the caches under ``workdir/storage-modes``; without a workdir,
    all of it goes to a temporary directory removed afterwards."""
    from softcache._bench import machine  # the package imports this module: read at call time

    s = settings or StorageSettings()
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="softcache-storage-")) if owned else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": command, "machine": machine(), "settings": s.__dict__}
    try:
        if "digits" in s.workloads:
            result["digits"] = measure_task(digits_task(s, root, say), s.digits_modes, s, say)
        if "lm" in s.workloads:
            result["lm"] = measure_task(lm_task(s, root, say), s.lm_modes, s, say)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    result["targets"] = storage_targets(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# -- the printed tables ------------------------------------------------------------------------


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_section(title: str, sec: dict[str, Any]) -> list[str]:
    """One workload's table: a row per mode."""
    unit, metric = sec["unit"], sec["metric"]
    pct = metric == "accuracy"

    def score(st: dict[str, Any]) -> str:
        scale = 100 if pct else 1
        return f"{scale * st['mean']:.{2 if pct else 3}f} +- {scale * st['std']:.{2 if pct else 3}f}"

    ce = ", ".join(f"{k} {score(st)}" for k, st in sec["cross_entropy"].items())
    lines = [title, f"  cross-entropy students: {ce}" + (" (%)" if pct else " bits/token")]
    header = (f"  {'mode':<10} {'B/' + unit:>9} {'on disk':>9} {'ids':>5} {'angle':>6} {'@alpha':>6} {'/pos':>6} "
              f"{'step/CE':>7}  students ({'accuracy %' if pct else 'bits/token'} mean +- std, / full, noise)")
    lines.append(header)
    for mode, m in sec["modes"].items():
        students = "; ".join(
            f"{k} {score(st)}" + ("" if mode == "full" else
                                  f" ({st['vs_full']:.4f}, {'within' if st['within_seed_noise'] else 'OUTSIDE'} noise)")
            for k, st in m["students"].items())
        ids = m.get(f"distinct_ids_per_{unit}")
        lines.append(f"  {mode:<10} {m[f'bytes_per_{unit}']:>9.1f} {m[f'bytes_per_{unit}_on_disk']:>9.1f} "
                     f"{_num(ids, 1):>5} {m['param_angle_deg']:>6.2f} {m['param_angle_deg_at_alpha']:>6.2f} "
                     f"{m['logit_angle_deg']:>6.2f} {m['step_vs_ce']:>7.2f}  {students}")
    return lines


def format_storage(r: dict[str, Any]) -> str:
    """``softcache bench --storage-modes``: a table per workload, then the targets."""
    lines = []
    if "digits" in r:
        d = r["digits"]
        lines += format_section(f"digits: teacher test accuracy {100 * d['teacher_accuracy']:.2f}%, {d['rows']} rows, "
                                f"T={d['temperature']:g}, batch {d['batch_size']}, {d['epochs']} epochs", d)
    if "lm" in r:
        m = r["lm"]
        lines += [""] + format_section(
            f"language model: V={m['vocab']}, {m['rows']} rows x {m['length']} tokens, batch {m['batch_size']}, "
            f"T={m['temperature']:g}, alpha {m['alpha']:g}; teacher {m['teacher_bits_per_token']:.3f} bits/token "
            f"on {m['eval_rows']} held-out rows" + (" (reused)" if m["teacher_reused"] else ""), m)
    lines += ["", "angle: degrees between the gradients w.r.t. the student's parameters of one held-out batch's "
              "soft term and of full distillation from the live teacher (@alpha: the students' loss); /pos: the "
              "same w.r.t. each position's logits, mean over positions", "targets:"]
    for key, t in r["targets"].items():
        lines.append(f"  {key}: {t['value']:.4g} (target {t['target']}: {'met' if t['met'] else 'missed'})")
    lines.append(f"\n({r['seconds']:.0f} s)")
    return "\n".join(lines)
