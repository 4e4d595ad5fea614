"""Every table and report the ``softcache`` command prints, one formatter per table.

The library returns data (DataFrames, dicts, result objects); these turn it into what people
read. Units: accuracies and agreements are stored as fractions (0.9849) in Parquet and in every
``--json`` object, and printed in percent under headers that say so (``test_accuracy %``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PERCENT = " %"
"""Suffix of a printed column holding percent (the stored value times 100)."""


def one_line(text: str) -> str:
    """A message that may carry newlines (from a user's spec, say) as the contract's one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table(frame: Any, str_lengths: int = 60) -> str:
    """A polars DataFrame printed whole: every row and column, no shape or dtype lines."""
    import polars as pl

    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=str_lengths,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        return str(frame)


def _in_percent(frame: Any, columns: Sequence[str]) -> Any:
    """``columns`` (fractions) times 100, rounded to 0.01, renamed ``name %``."""
    import polars as pl

    present = [c for c in columns if c in frame.columns]
    return frame.with_columns([(pl.col(c) * 100).round(2) for c in present]).rename(
        {c: c + PERCENT for c in present})


def format_board(board: Any) -> str:
    """A leaderboard: the columns that matter, accuracies in percent."""
    cols = ["student", "parameters", "temperature", "alpha", "label_smoothing", "test_accuracy", "bits_per_token",
            "perplexity", "accuracy", "teacher_agreement"]
    view = board.select([c for c in cols if c in board.columns])
    return _table(_in_percent(view, ("test_accuracy", "accuracy", "teacher_agreement")))


def format_datafree(board: Any) -> str:
    """The data-free demo's leaderboard: inputs, views, student, accuracy against the teacher's."""
    cols = ["inputs", "views", "student", "parameters", "test_accuracy", "relative_accuracy", "teacher_agreement"]
    return _table(_in_percent(board.select(cols), ("test_accuracy", "relative_accuracy", "teacher_agreement")), 50)


def class_stats(frame: Any) -> Any:
    """``stats``: per predicted class, how many rows, the mean confidence figures, and the
    precision (of the rows the teacher predicted as this class, the fraction whose label is it).
    For token rows, per position instead (a vocabulary is too long a table): how the teacher's
    confidence and next-token accuracy grow with the context it has seen."""
    import polars as pl

    if "position" in frame.columns:
        return frame.group_by("position").agg(
            pl.len().alias("rows"), pl.col("max_prob").mean(), pl.col("entropy").mean(), pl.col("margin").mean(),
            pl.col("correct").mean().alias("accuracy"),
        ).sort("position")
    return frame.group_by("prediction").agg(
        pl.len().alias("rows"), pl.col("max_prob").mean(), pl.col("entropy").mean(), pl.col("margin").mean(),
        pl.col("correct").mean().alias("precision"),
    ).sort("prediction")


def format_stats(frame: Any) -> str:
    """The per-class table of :func:`class_stats`, then the teacher's overall accuracy."""
    import polars as pl

    labelled = frame.filter(pl.col("correct").is_not_null())
    overall = (f"overall accuracy {pct(float(labelled['correct'].mean()))} ({int(labelled['correct'].sum())} of "
               f"{labelled.height} labelled rows: teacher top-1 = label)" if labelled.height and "label" in frame.columns
               else f"overall next-token accuracy {pct(float(labelled['correct'].mean()))} ({labelled.height} "
               "positions with a next token)" if labelled.height else
               "overall accuracy - (no labelled rows)")
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True):
        return f"{class_stats(frame)}\n{overall}"


def format_run(name: str, results: Sequence[Any], summary: dict[str, Any]) -> str:
    """``softcache run``: one line per stage, the leaderboard of each train stage that ran."""
    import polars as pl

    lines = []
    for r in results:
        what = r.detail.get("output") or r.detail.get("reason") or ""
        lines.append(f"{r.stage:<20} {r.status:<9} {what}" + (f"  ({r.seconds:.1f}s)" if r.seconds else ""))
        if r.status == "ran" and "leaderboard" in r.detail:
            lines.append(format_board(pl.DataFrame(r.detail["leaderboard"])))
    lines.append(f"pipeline {name}: {len(summary['ran'])} stage(s) ran in {summary['seconds']:.1f}s")
    return "\n".join(lines)


def format_built(summary: dict[str, Any], temperature: float) -> str:
    """``softcache build``: what this worker wrote and whether the cache is complete."""
    report, key = summary["worker"], summary["cache_key"]
    done = (f"built {summary['url']}" if summary["complete"] else
            f"shard {report.get('shard')} of {summary['url']} done; the cache completes when the other workers finish")
    return (f"{done}: {summary['rows']} rows (+{summary['eval_rows']} eval), T={temperature:g}, key {key[:12]}; "
            f"this worker wrote {len(report.get('units_written', []))} shard(s), skipped "
            f"{report.get('units_skipped', 0)} already done, in {summary['seconds']:.1f}s"
            + (f"; the teacher's calls took {report['teacher_seconds']:.1f}s" if report.get("rows_written") else ""))


def format_synthesized(summary: dict[str, Any], temperature: float) -> str:
    """``softcache synthesize``: what was made, how often the teacher agrees with the targets."""
    s = summary
    return (f"synthesized {s['url']}: {s['rows']} inputs ({s['method']}, seed {s['seed']}) x {s['views']} view(s), "
            f"T={temperature:g}; teacher predicts the target class for {100 * s['target_rate']:.1f}%; "
            f"synthesis {s['synthesis_seconds']:.1f}s, total {s['seconds']:.1f}s")


def format_finalized(obj: dict[str, Any]) -> str:
    return f"complete: {obj['url']} ({obj['rows']} rows, {obj['num_shards']} shards, key {obj['cache_key'][:12]})"


def format_signed(result: dict[str, Any]) -> str:
    return (f"signed {result['url']}: {result['files']} files, key {result['key_id'][:16]}, "
            f"signature {result['signature']}")


def format_verified(result: dict[str, Any]) -> str:
    return (f"verified {result['url']}: {result['files']} files match the signature {result['signature']} of key "
            f"{result['key_id'][:16]}" + ("" if result["listed"] else " (http: files outside the signature cannot be listed)"))


def format_validation(result: dict[str, Any]) -> str:
    lines = [f"{'valid' if result['valid'] else 'INVALID'}: {result['url']}"]
    return "\n".join(lines + [f"  error: {e}" for e in result["errors"]] + [f"  warning: {w}" for w in result["warnings"]])


def _spec_str(spec: dict[str, Any]) -> str:
    from softcache.cache.manifest import Spec

    return str(Spec.model_validate(spec))


def _rows_line(info: dict[str, Any]) -> str:
    head = f"rows         {info['rows']} train, {info['eval_rows']} eval; "
    if info.get("kind") == "sequence":
        return head + f"token rows of {info['sequence_length']} positions, vocabulary {info['classes']}"
    return head + f"{info['classes']} classes; {info['views']} view(s)" + (
        " (one fixed view per sample: augmenting inputs in training will not match the teacher's view)"
        if info.get("fixed_view") else "")


def _storage_str(storage: dict[str, Any]) -> str:
    return f"{storage['mode']}:{storage['k']}" if storage.get("k") else storage["mode"]


def format_inspect(info: dict[str, Any], complete: bool) -> str:
    """``softcache inspect``: the manifest's story, then the trust lines (``info["trust"]``)."""
    m = info["manifest"]
    src = m["source"]
    teacher = m["teacher"]
    source = _spec_str(src["spec"]) if src["kind"] == "dataset" and src["spec"] else src.get("method", "-")
    lines = [
        f"cache        {info['url']}  ({info['status']}, schema v{info['schema_version']})",
        f"cache key    {info['cache_key']}",
        f"teacher      {teacher['spec'] and _spec_str(teacher['spec'])}  "
        f"({teacher['num_parameters']} params, sha256 {teacher['weights_digest'][:12]})",
        f"source       {src['kind']}: {source}  ({src['num_samples']} samples)",
        _rows_line(info),
        f"soft labels  T={info['temperature']:g}, {_storage_str(info['storage'])} {info['storage']['dtype']}, "
        + (f"{info['bytes_per_token']:.1f} bytes/token" if info.get("bytes_per_token") is not None
           else f"{info['bytes_per_sample']:.1f} bytes/sample"),
        f"teacher      train accuracy {pct(info['teacher_train_accuracy'])}"
        + (f", eval accuracy {pct(info['teacher_eval_accuracy'])}" if "teacher_eval_accuracy" in info else "")
        + f", mean max prob {pct(info['teacher_mean_max_prob'])}",
    ]
    if not complete:
        lines.append(f"build        {info['shards_done']}/{info['shards_total']} shards done (incomplete: figures cover "
                     "written rows only)")
    trust = info.get("trust")
    if trust is not None:
        modules = ", ".join(f"{t['module']} ({t['from']})" for t in trust["modules"])
        lines.append(f"trusted      {modules or 'no modules beyond softcache allowlist'}")
        lines += [f"code         {problem}" for problem in trust["recorded_spec_problems"]]
    return "\n".join(lines)


def format_demo(obj: dict[str, Any], board: Any, leaderboard: str) -> str:
    """``softcache demo``: the teacher, the cache, the leaderboard and where it is saved."""
    return (f"teacher test accuracy {100 * obj['teacher_test_accuracy']:.2f}%  cache {obj['cache']}\n"
            f"{format_board(board)}\nleaderboard: {leaderboard}  ({obj['seconds']:.1f}s)")


def format_lm_demo(obj: dict[str, Any], board: Any, summary: Any, leaderboard: str) -> str:
    """``softcache demo --lm``: the teacher, the cache, the students, and mean +- std per kind."""
    lines = [f"teacher held-out {obj['teacher_bits_per_token']:.3f} bits/token"
             + (" (reused from the workdir)" if obj["teacher_reused"] else "")
             + f"  cache {obj['cache']}  {obj['bytes_per_token']:.1f} bytes/token", format_board(board)]
    for row in summary.iter_rows(named=True):
        std = row["bits_per_token_std"]
        lines.append(f"{row['kind']:<14} {row['bits_per_token_mean']:.3f} +- {std if std is not None else 0:.3f} "
                     f"bits/token over {row['seeds']} seeds, teacher agreement "
                     f"{pct(row['teacher_agreement_mean'])}")
    times = ", ".join(f"{k} {v:.0f}s" for k, v in obj["seconds"].items())
    lines.append(f"leaderboard: {leaderboard}  ({times})")
    return "\n".join(lines)


def format_datafree_demo(obj: dict[str, Any], board: Any, leaderboard: str) -> str:
    """``softcache demo --data-free``: the teacher (real data), then the students (synthesized inputs only)."""
    return (f"teacher test accuracy {100 * obj['teacher_test_accuracy']:.2f}% (trained on real data; students saw "
            f"synthesized inputs only)\n{format_datafree(board)}\nleaderboard: {leaderboard}  ({obj['seconds']:.1f}s)")


def format_storage(r: dict[str, Any]) -> str:
    """``softcache bench --storage-modes``: a table per workload, then the targets."""
    from softcache._bench.storage import format_storage as tables

    return tables(r)


def format_report(r: dict[str, Any]) -> str:
    """``softcache bench``: the figures as the README table prints them."""
    def target(key: str) -> str:
        t = r["targets"].get(key)
        return f"{t['target']} ({'met' if t['met'] else 'NOT met'})" if t else ""

    k = r["settings"]["students"]
    rows = [
        ("epoch from store (in-RAM mode) / epoch from tensor", f"{r['store_vs_memory_epoch']:.3f}",
         target("store_vs_memory_epoch")),
        ("epoch from store (streaming) / epoch from tensor", f"{r['streaming_vs_memory_epoch']:.3f}",
         target("streaming_vs_memory_epoch")),
        ("crc32c checks per full read of the soft labels", f"{1000 * r['checksum_seconds_per_read']:.2f} ms",
         f"{100 * r['checksum_share_of_stream_epoch']:.2f}% of a streaming epoch (both ratios above include it)"),
        ("online KD epoch / cached KD epoch", f"{r['online_vs_cached_epoch']:.2f}",
         f"ideal (teacher+student)/student {r['online_vs_cached_ideal']:.2f}; "
         f"teacher = {r['teacher_vs_student_cost']:.1f}x student"),
        (f"{k} MLP students: separate runs / one grouped pass", f"{r['group_vs_separate_speedup']:.2f}x",
         target("group_vs_separate_speedup") + f"; one pass ungrouped {r['group']['one_pass_speedup']:.2f}x"),
        (f"{k} tiny CNN students: separate runs / one grouped pass", f"{r['group_vs_separate_speedup_tiny_cnn']:.2f}x",
         f"one pass ungrouped {r['group_tiny_cnn']['one_pass_speedup']:.2f}x"),
        ("stage 1 with writing / teacher inference alone", f"{r['write_overhead']:.3f}",
         target("write_overhead") + f"; vs labelling without storage {r['storage_overhead']:.3f}"),
        ("whole build() / teacher inference alone", f"{r['build_vs_teacher']:.3f}",
         f"store creation and finalisation included, {r['stage1_rows']} rows"),
    ]
    for name, value in r["loader_samples_per_s"].items():
        rows.append((f"loader samples/s: {name.replace('_', ' ')}", f"{value:,.0f}", ""))
    mem = r["stage2_peak_memory"]
    for mode in ("memory", "stream"):
        rows.append((f"stage 2 peak memory, {mode} mode ({mem['classes']} classes x {mem['rows']} rows)",
                     f"{mem[mode]['arrays_peak_mb']:.0f} MB",
                     f"live arrays; RSS +{mem[mode]['added_mb']:.0f} MB (peak {mem[mode]['peak_mb']:.0f} MB)"))
    rows.append(("  soft labels: stored / float32 in RAM / stream bound",
                 f"{mem['stored_mb']:.0f} / {mem['float32_in_ram_mb']:.0f} / {mem['stream_bound_mb']:.0f} MB", ""))
    th = r["threads"]
    rows.append(("student step, 2 threads / 1 thread", f"{th['student_step_2_vs_1']:.2f}",
                 f"{th['student_step_ms_1_thread']:.3f} ms at 1 thread"))
    rows.append(("teacher batch, 2 threads / 1 thread", f"{th['teacher_batch_2_vs_1']:.2f}",
                 f"{th['teacher_batch_ms_1_thread']:.2f} ms at 1 thread"))
    if "wide" in r:
        from softcache._bench.wide import format_wide

        rows += format_wide(r["wide"])
    if "lm" in r:
        from softcache._bench.lm import format_lm

        rows += format_lm(r["lm"], target)
    width = max(len(a) for a, _, _ in rows)
    vwidth = max(len(b) for _, b, _ in rows)
    m, s = r["machine"], r["settings"]
    lines = [f"softcache bench{' --quick' if r['quick'] else ''}: {s['rows']} rows, chunk {s['chunk_rows']}, "
             f"batch {s['batch_size']}, {s['epochs']} epoch(s) x {s['repeats']} alternated rounds",
             f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), "
             f"zarr {m['zarr']}, load {m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}"
             if m.get("load_average_start") else f"machine: {m['cpu']}, {m['cores']} cores", ""]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c}".rstrip() for a, b, c in rows]
    lines.append(f"\n({r['seconds']:.0f} s)")
    return "\n".join(lines)
