"""Views of a cache: drawing, applying, storing and replaying the augmented inputs the teacher labels.

Stage 1 (``teacher``) resolves ``--views V --augment SPEC`` into an augmentation and the
manifest's view record (:func:`resolve_views`), draws each shard's parameters from a generator
keyed by (seed, first row) and labels the views (:func:`view_blocks`). Stage 2 (``student``)
re-creates the exact same views from the raw inputs and the stored parameters
(:class:`ViewReplay`, :func:`cache_replay`). The operations themselves live in
:mod:`softcache.augment`; this module is the plumbing both stages share, so neither imports the other.

An augmentation named by a cache is data: it runs only after :mod:`softcache.cache.trust` allows it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from softcache.augment import PartnerFn, Replayable
from softcache.cache.manifest import Spec, ViewInfo
from softcache.cache.trust import Trust, check_recorded
from softcache.errors import CacheError, UsageError
from softcache.spec import call_spec

MAX_EXACT_ROW = 2**24
"""float32 holds every integer up to this exactly; partner rows beyond it would be rounded."""


def load_augmentation(spec: Spec | str) -> Replayable:
    """Build the augmentation a SPEC names and refuse it unless its views can be replayed."""
    spec = Spec.parse(spec)
    return require_replayable(call_spec(spec), str(spec))


def require_replayable(obj: Any, label: str) -> Replayable:
    """A random transform without stored parameters would be labelled once and then replayed as
    if fresh: the student would train on views the teacher never saw. Refuse it here."""
    if not isinstance(obj, Replayable) or not isinstance(getattr(obj, "param_names", None), list) \
            or not obj.param_names:
        raise UsageError(
            f"augmentation {label} ({type(obj).__name__}) cannot be replayed: views need stored parameters "
            "(param_names, sample(n, rng, population=, shape=), apply(inputs, params)); use softcache.augment:compose")
    return obj


def check_deterministic(aug: Replayable, label: str, inputs: torch.Tensor, params: torch.Tensor,
                        partners: PartnerFn | None) -> None:
    """``apply`` must be a pure function of its arguments: run it twice and compare bits."""
    first = aug.apply(inputs, params, partners)
    second = aug.apply(inputs, params, partners)
    if first.shape != inputs.shape or not torch.equal(first, second):
        raise UsageError(f"augmentation {label} cannot be replayed: apply() gave different outputs "
                         "for the same inputs and parameters (it draws its own randomness)")


def apply_views(aug: Replayable, inputs: torch.Tensor, params: torch.Tensor,
                partners: PartnerFn | None) -> torch.Tensor:
    """All views of a block: ``inputs (n, *shape)``, ``params (n, V, P)`` -> ``(n, V, *shape)``."""
    n, v = params.shape[:2]
    flat = inputs.repeat_interleave(v, dim=0)
    out = aug.apply(flat, params.reshape(n * v, -1), partners)
    return out.reshape(n, v, *inputs.shape[1:])


def check_input_shape(aug: Replayable, shape: Sequence[int]) -> None:
    """Refuse, before any view is drawn, a sample shape the augmentation cannot transform into
    meaningful views (built-ins say so through ``check_shape``; other augmentations are trusted
    to check their own shape in ``sample``)."""
    check = getattr(aug, "check_shape", None)
    if callable(check):
        check(tuple(int(s) for s in shape))


def resolve_views(augment: Spec | str | None, views: int, seed: int, rows: int,
                  shape: Sequence[int] | None = None) -> tuple[Replayable | None, ViewInfo]:
    """The augmentation and the manifest's view record for ``--views V --augment SPEC``; with
    ``shape`` (one sample's) an augmentation that cannot transform it is refused here, before
    anything is written."""
    if views < 1:
        raise UsageError(f"--views must be at least 1, not {views}")
    if augment is None:
        if views != 1:
            raise UsageError(f"--views {views} needs --augment SPEC (a replayable augmentation, "
                             "e.g. softcache.augment:compose,shift=1)")
        return None, ViewInfo()
    spec = Spec.parse(augment)
    aug = load_augmentation(spec)
    check_rows(aug, rows, str(spec))
    if shape is not None:
        check_input_shape(aug, shape)
    if views == 1:
        warnings.warn(f"augmentation {spec} with one view: every epoch replays the same augmented view of a sample",
                      UserWarning, stacklevel=2)
    return aug, ViewInfo(count=views, replay="params", augment=spec, param_names=list(aug.param_names), seed=int(seed))


def check_rows(aug: Replayable, rows: int, label: str) -> None:
    if getattr(aug, "mixes", False) and rows > MAX_EXACT_ROW:
        raise UsageError(f"augmentation {label} stores partner rows as float32, exact only up to {MAX_EXACT_ROW} rows; "
                         f"this split has {rows}")


def shard_params(aug: Replayable, rows: range, views: int, seed: int, population: int,
                 shape: Sequence[int]) -> np.ndarray:
    """The view parameters of one shard ``(len(rows), V, P)``, from a generator keyed by
    (seed, first row): a shard is the same whether built alone, resumed or in one pass."""
    rng = np.random.default_rng([int(seed), int(rows.start)])
    flat = aug.sample(len(rows) * views, rng, population=population, shape=tuple(shape))
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(rows), views, -1)


def view_blocks(blocks: Iterator[Any], aug: Replayable, label: str, rows: range, views: int, seed: int,
                population: int, shape: Sequence[int], partners: PartnerFn | None) -> Iterator[Any]:
    """Add ``views`` and ``view_params`` to each ``build.RowBlock`` of a shard."""
    check_input_shape(aug, shape)
    params = shard_params(aug, rows, views, seed, population, shape)
    offset, checked = 0, False
    for block in blocks:
        n = len(block.inputs)
        p = torch.from_numpy(params[offset : offset + n])
        x = block.inputs.to(torch.float32)
        if not checked:
            check_deterministic(aug, label, x.repeat_interleave(views, 0), p.reshape(n * views, -1), partners)
            checked = True
        yield replace(block, views=apply_views(aug, x, p, partners), view_params=params[offset : offset + n])
        offset += n


class ViewReplay:
    """Stage 2: re-create the view each row is shown through, from the raw inputs and the
    stored parameters, one vectorised call per batch."""

    def __init__(self, aug: Replayable, inputs: torch.Tensor, view_params: torch.Tensor):
        if len(view_params) != len(inputs):
            raise UsageError(f"{len(inputs)} inputs but {len(view_params)} rows of view parameters")
        check_input_shape(aug, tuple(inputs.shape[1:]))
        check_stored_params(list(aug.param_names), view_params, len(inputs))
        self.aug, self.inputs, self.view_params = aug, inputs.to(torch.float32), view_params

    def to(self, device: torch.device | str) -> ViewReplay:
        return ViewReplay(self.aug, self.inputs.to(device), self.view_params.to(device))

    def _partners(self, rows: torch.Tensor) -> torch.Tensor:
        return self.inputs[rows.to(self.inputs.device)]

    def __call__(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.aug.apply(self.inputs[rows], self.view_params[rows, views], self._partners)


def check_stored_params(names: list[str], view_params: torch.Tensor, population: int) -> None:
    """Stored parameters come from a file: a NaN would turn a view into NaNs and a partner row
    outside the split would index past the inputs, so both are refused before any replay."""
    if view_params.ndim != 3 or view_params.shape[-1] != len(names):
        raise CacheError(f"view_params has shape {tuple(view_params.shape)}, expected (rows, views, {len(names)})")
    finite = torch.isfinite(view_params).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise CacheError(f"view_params hold NaN/Inf in {len(bad)} row(s), first {bad[:10].tolist()}")
    for column, name in enumerate(names):
        if not name.endswith(".partner"):
            continue
        rows = view_params[..., column]
        bad = ((rows != rows.round()) | (rows < 0) | (rows >= population)).flatten(1).any(dim=1)
        if bool(bad.any()):
            first = bad.nonzero().flatten()
            raise CacheError(f"view_params column {name} names partner rows outside 0..{population - 1} "
                             f"in {len(first)} row(s), first {first[:10].tolist()}")


def replay_for(info: ViewInfo, view_params: np.ndarray | None, inputs: torch.Tensor,
               trust: bool = False) -> ViewReplay | None:
    """The replay a cache's views need, or None when every view is the raw input."""
    if info.replay != "params":
        return None
    if info.augment is None or view_params is None:
        raise UsageError("cache says its views replay from parameters but records no augmentation or parameters")
    aug = load_augmentation(check_recorded(info.augment, "augmentation", "check it", trust))
    if list(aug.param_names) != list(info.param_names):
        raise UsageError(f"augmentation {info.augment} now has parameters {aug.param_names}, "
                         f"but the cache stored {info.param_names}")
    return ViewReplay(aug, inputs, torch.from_numpy(np.asarray(view_params, dtype=np.float32)))


def cache_replay(cache: Any, inputs: torch.Tensor, trust: Trust | bool = False) -> ViewReplay | None:
    """The replay for the training rows of an opened ``store.Cache`` (None for plain caches).

    The recorded augmentation is data, and it runs whatever inputs the user passed: it is
    checked against softcache's allowlist and ``trust`` before anything is read or imported."""
    from softcache.cache.layout import VIEW_PARAMS

    views = cache.manifest.views
    if views.replay == "params" and views.augment is not None:
        check_recorded(views.augment, "view augmentation", "", trust)
    split = cache.train
    params = np.asarray(split.array(VIEW_PARAMS)[:]) if VIEW_PARAMS in split.group else None
    return replay_for(cache.manifest.views, params, inputs, trust)
