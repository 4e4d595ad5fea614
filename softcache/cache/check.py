"""Checking and summarising a cache: what ``softcache validate`` and ``inspect`` report.

Validation first checks every array's metadata against the manifest and the format
(``store.check_cache``, the checker ``open_cache`` and ``finalize`` share), then reads every
array chunk row by chunk row, so it runs in bounded memory on caches larger than RAM: each read
checks the chunk's size and crc32c, and a missing chunk is an error. It collects every problem
instead of stopping at the first, so one run tells the whole story, and it reports a bad cache,
never raises for one. ``--deep`` adds the costly checks: stored predictions against the soft
labels, the cache key, and the content digest over every stored byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softcache.cache import store
from softcache.errors import CacheError
from softcache.cache.manifest import Manifest, compute_cache_key
from softcache.spec import recorded_spec_problems


def _check_contents(check: store.CacheCheck, manifest: Manifest, prefix: str, errors: list[str], deep: bool) -> None:
    """Read every checked array of one split (``prefix`` "" or "eval/") and check its values."""
    arrays = {path.removeprefix(prefix): node for path, (node, _) in check.arrays.items()
              if store.split_prefix(path) == prefix and path.removeprefix(prefix) != store.SHARD_DONE}
    if not arrays:
        return
    name = "eval" if prefix else "train"
    step = int(next(iter(arrays.values())).chunks[0])
    rows = int(next(iter(arrays.values())).shape[0])
    failed: set[str] = set()
    nonfinite: list[int] = []
    nonfinite_count = disagree = 0
    labels_outside = unwritten = False
    for start in range(0, rows, step):
        block: dict[str, np.ndarray] = {}
        for key, node in arrays.items():
            if key in failed:
                continue
            try:
                block[key] = np.asarray(node[start : start + step])
            except (CacheError, ValueError) as exc:  # one line per array: the first bad chunk
                errors.append(f"{name}: array {key!r}: {exc}")
                failed.add(key)
        soft = block.get(store.SOFT)
        if soft is not None and len(soft):
            bad = np.flatnonzero(~np.isfinite(soft.reshape(len(soft), -1)).all(axis=1))
            nonfinite_count += len(bad)
            nonfinite.extend((start + bad[: 10 - len(nonfinite)]).tolist())
            prediction = block.get("stats/prediction")
            if deep and prediction is not None and manifest.storage.mode == "full":
                disagree += int((soft.argmax(-1) != prediction).sum())
        labels = block.get(store.LABELS)
        if labels is not None and len(labels):
            labels_outside |= bool(labels.min() < -1 or labels.max() >= manifest.classes.count)
        index = block.get(store.INDEX)
        if deep and index is not None and len(index):
            unwritten |= bool(index.min() < 0)
    if nonfinite_count:
        errors.append(f"{name}: soft_labels hold NaN/Inf in {nonfinite_count} row(s), first {nonfinite}")
    if disagree:
        errors.append(f"{name}: stats/prediction disagrees with soft_labels in {disagree} (row, view) pair(s)")
    if labels_outside:
        errors.append(f"{name}: labels outside [-1, {manifest.classes.count})")
    if unwritten:
        errors.append(f"{name}: sample_index has negative entries (rows never written)")


def _check_digest(group: Any, manifest: Manifest, check: store.CacheCheck, errors: list[str],
                  warnings: list[str]) -> None:
    """Recompute the content digest that ``finalize`` recorded: any changed byte shows, even one
    whose chunk checksum was recomputed to match."""
    if manifest.integrity is None:
        warnings.append("the manifest records no content digest (a cache written by softcache 0.1?): "
                        "--deep cannot detect changed bytes in it")
        return
    if errors:  # some array is already unreadable or wrong: the digest cannot match and says no more
        return
    try:
        digest, chunks = store.content_digest(group, check)
    except CacheError as exc:
        errors.append(f"content digest not computed: {exc}")
        return
    recorded = manifest.integrity
    if (digest, chunks) != (recorded.content_digest, recorded.chunks):
        errors.append(f"content digest mismatch: the stored chunks differ from the finalized cache (recorded "
                      f"{recorded.content_digest[:16]} over {recorded.chunks} chunks, found {digest[:16]} over {chunks})")


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
    errors.extend(recorded_spec_problems(manifest))  # the code it names, checked as text: nothing is imported
    try:
        errors.extend(f"{p}: run `softcache finalize {url}` to rewrite it" for p in store.stale_consolidated(str(url)))
        if manifest.status.state != "complete":
            errors.append(f"build status is {manifest.status.state!r}, not 'complete'")
        check = store.check_cache(group, manifest, listing=True, flags=True)
        errors.extend(check.errors)
        if check.unverified:
            warnings.append(store.unverified_message(str(url), check.unverified))
        for prefix in ("", f"{store.EVAL}/"):
            _check_contents(check, manifest, prefix, errors, deep)
        if deep:
            key = compute_cache_key(manifest.teacher, manifest.source, manifest.classes, manifest.temperature,
                                    manifest.storage, manifest.views, manifest.eval.source if manifest.eval else None)
            if key != manifest.cache_key:
                errors.append("cache_key does not match the manifest contents (edited after the build?)")
            _check_digest(group, manifest, check, errors, warnings)
    except CacheError as exc:  # the store refused something the checks did not foresee: still a report
        errors.append(str(exc))
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
