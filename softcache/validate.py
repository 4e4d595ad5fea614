"""Checking and summarising a cache: what ``softcache validate`` and ``inspect`` report.

Validation reads chunk by chunk so it runs in bounded memory on caches larger than RAM, and
collects every problem instead of stopping at the first, so one run tells the whole story.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import store
from .errors import CacheError
from .manifest import Manifest, compute_cache_key


def _check_split(split: store.Split, manifest: Manifest, rows: int, name: str, errors: list[str], deep: bool) -> None:
    expected = store.split_arrays(manifest, rows, store_inputs=split.has_inputs, with_labels=split.has_labels,
                                  eval_split=name == "eval")
    for array_name, spec in expected.items():
        if array_name not in split.group:
            errors.append(f"{name}: array {array_name!r} is missing")
            continue
        arr = split.array(array_name)
        if tuple(arr.shape) != spec.shape:
            errors.append(f"{name}: array {array_name!r} has shape {tuple(arr.shape)}, expected {spec.shape}")
        if str(arr.dtype) != spec.dtype:
            errors.append(f"{name}: array {array_name!r} has dtype {arr.dtype}, expected {spec.dtype}")
    if any(e.startswith(f"{name}: array {store.SOFT!r}") for e in errors):
        return
    soft = split.array(store.SOFT)
    step = int(soft.chunks[0])
    bad_rows: list[int] = []
    for start in range(0, split.rows, step):
        block = np.asarray(soft[start : start + step])
        bad = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))
        bad_rows.extend((start + bad).tolist())
        if deep and len(block):
            stored_pred = np.asarray(split.array("stats/prediction")[start : start + step])
            if not (block.argmax(-1) == stored_pred).all() and manifest.storage.mode == "full":
                errors.append(f"{name}: stats/prediction disagrees with soft_labels in rows {start}..{start + len(block) - 1}")
    if bad_rows:
        errors.append(f"{name}: soft_labels hold NaN/Inf in {len(bad_rows)} row(s), first {bad_rows[:10]}")
    labels = split.labels()
    if len(labels) and (labels.min() < -1 or labels.max() >= manifest.classes.count):
        errors.append(f"{name}: labels outside [-1, {manifest.classes.count})")
    if deep:
        index = split.sample_index()
        if len(index) and (index.min() < 0):
            errors.append(f"{name}: sample_index has negative entries (rows never written)")


def _check_flags(group: Any, expected: int, prefix: str, errors: list[str]) -> None:
    if store.SHARD_DONE not in group:
        errors.append(f"array '{prefix}{store.SHARD_DONE}' is missing")
        return
    done = store.shards_done(group)
    if len(done) != expected:
        errors.append(f"{prefix}shard_done has {len(done)} entries, manifest says {expected} shards")
    elif not done.all():
        errors.append(f"{prefix}shards not done: {np.flatnonzero(~done).tolist()[:20]}")


def validate(url: str, *, deep: bool = False) -> dict[str, Any]:
    """Return ``{"url", "valid", "errors", "warnings", "deep"}``; never raises for a bad cache."""
    errors: list[str] = []
    warnings: list[str] = []
    result: dict[str, Any] = {"url": str(url), "valid": False, "errors": errors, "warnings": warnings, "deep": deep}
    try:  # each array's own metadata (not the consolidated copy) unless the store cannot be listed
        group = store.open_group(str(url), "r", consolidated=None if store.is_readonly(str(url)) else False)
        manifest = store.read_manifest(group, str(url))
    except CacheError as exc:
        errors.append(str(exc))
        return result
    result["cache_key"] = manifest.cache_key
    errors.extend(f"{p}: run `softcache finalize {url}` to rewrite it" for p in store.stale_consolidated(str(url)))
    if manifest.status.state != "complete":
        errors.append(f"build status is {manifest.status.state!r}, not 'complete'")
    _check_flags(group, manifest.layout.num_shards, "", errors)
    if store.SOFT not in group:
        errors.append(f"array {store.SOFT!r} is missing")
        return result
    _check_split(store.Split(group, manifest, "train"), manifest, manifest.layout.rows, "train", errors, deep)
    if manifest.eval is not None:
        if store.EVAL not in group:
            errors.append("manifest records an eval split but group 'eval' is missing")
        else:
            eval_group = group[store.EVAL]
            _check_split(store.Split(eval_group, manifest, "eval"), manifest, manifest.eval.rows, "eval", errors, deep)  # type: ignore[arg-type]
            if store.SHARD_DONE in eval_group:  # sharded eval splits carry their own flags
                _check_flags(eval_group, eval_group[store.SHARD_DONE].shape[0], "eval/", errors)
    if deep:
        key = compute_cache_key(manifest.teacher, manifest.source, manifest.classes, manifest.temperature,
                                manifest.storage, manifest.views, manifest.eval.source if manifest.eval else None)
        if key != manifest.cache_key:
            errors.append("cache_key does not match the manifest contents (edited after the build?)")
    if manifest.views.count == 1 and manifest.views.replay == "identity":
        warnings.append("one fixed view per sample: augmenting inputs during training will not match the teacher's view")
    result["valid"] = not errors
    return result


def summarize(cache: store.Cache) -> dict[str, Any]:
    """The stable ``inspect --json`` object: manifest plus measured facts about the arrays."""
    import zarr

    arrays = {
        path: {"shape": list(node.shape), "dtype": str(node.dtype), "chunks": list(node.chunks)}
        for path, node in sorted(cache.group.members(max_depth=None))
        if isinstance(node, zarr.Array)
    }
    soft = cache.train.array(store.SOFT)
    rows = cache.train.rows
    import polars as pl

    # rows never written (an incomplete cache) keep the fill values: sample_index -1, zeros
    stats = cache.train.stats().filter(pl.col("sample") >= 0)
    labels = stats["label"].to_numpy()
    correct = stats["correct"].drop_nulls()
    return {
        "url": cache.url,
        "schema_version": cache.manifest.schema_version,
        "cache_key": cache.manifest.cache_key,
        "status": cache.manifest.status.state,
        "rows": rows,
        "eval_rows": cache.eval.rows if cache.eval is not None else 0,
        "classes": cache.num_classes,
        "views": cache.manifest.views.count,
        "temperature": cache.temperature,
        "storage": cache.manifest.storage.model_dump(mode="json"),
        "bytes_per_sample": (soft.nbytes / rows) if rows else 0.0,
        "teacher_train_accuracy": float(correct.mean()) if len(correct) and (labels >= 0).any() else None,
        "teacher_mean_max_prob": float(stats["max_prob"].mean()) if len(stats) else None,
        "arrays": arrays,
        "manifest": cache.manifest.to_json(),
    }
