"""What ``softcache inspect`` reports about a cache: the manifest beside measured facts.

Only what is stored is read (the statistics arrays, labels and sample index): nothing a cache
names is imported or run. Whether the cache is sound is ``check``'s question, not this one's.
"""

from __future__ import annotations

from typing import Any

import zarr

from softcache.cache.layout import SOFT, SOFT_IDS, SOFT_REST
from softcache.cache.store import Cache, Split


def _accuracy(split: Split) -> float | None:
    """How often the teacher's stored prediction (view 0) matches the label, over the rows that
    are written and labelled; None when there are none."""
    import polars as pl

    stats = split.stats().filter(pl.col("sample") >= 0)
    stats = stats.filter(pl.col("view") == 0) if "view" in stats.columns else stats
    stats = stats.filter(pl.col("correct").is_not_null())
    return float(stats["correct"].mean()) if len(stats) else None


def summarize(cache: Cache) -> dict[str, Any]:
    """The stable ``inspect --json`` object: manifest plus measured facts about the arrays.

    ``teacher_train_accuracy`` counts every (row, view) of the training rows;
    ``teacher_eval_accuracy`` is the held-out accuracy on the eval split (None without one).
    ``fixed_view`` says the teacher saw one fixed view per sample: augmenting inputs during
    training then shows the student views the teacher never labelled."""
    import polars as pl

    arrays = {
        path: {"shape": list(node.shape), "dtype": str(node.dtype), "chunks": list(node.chunks)}
        for path, node in sorted(cache.group.members(max_depth=None))
        if isinstance(node, zarr.Array)
    }
    rows = cache.train.rows
    soft_bytes = sum(cache.train.array(name).nbytes for name in (SOFT, SOFT_IDS, SOFT_REST) if name in cache.group)
    # rows never written (an incomplete cache) keep the fill values: sample_index -1, zeros
    stats = cache.train.stats().filter(pl.col("sample") >= 0)
    correct = stats["correct"].drop_nulls()
    views = cache.manifest.views
    sequence = cache.manifest.sequence
    tokens = rows * sequence.length if sequence is not None else 0
    return {
        "url": cache.url,
        "schema_version": cache.manifest.schema_version,
        "cache_key": cache.manifest.cache_key,
        "status": cache.manifest.status.state,
        "rows": rows,
        "eval_rows": cache.eval.rows if cache.eval is not None else 0,
        "classes": cache.num_classes,
        "views": views.count,
        "fixed_view": views.count == 1 and views.replay == "identity",
        "temperature": cache.temperature,
        "storage": cache.manifest.to_json()["storage"],
        "kind": cache.manifest.kind,
        "sequence_length": sequence.length if sequence is not None else None,
        "bytes_per_sample": (soft_bytes / rows) if rows else 0.0,
        "bytes_per_token": (soft_bytes / tokens) if tokens else None,
        "teacher_train_accuracy": float(correct.mean()) if len(correct) else None,
        "teacher_eval_accuracy": _accuracy(cache.eval) if cache.eval is not None else None,
        "teacher_mean_max_prob": float(stats["max_prob"].mean()) if len(stats) else None,
        "arrays": arrays,
        "manifest": cache.manifest.to_json(),
    }
