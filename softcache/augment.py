"""Replayable augmentations: every view the teacher labels can be re-created bit for bit.

A cached soft label is only right for the exact input the teacher saw. Random augmentation at
training time breaks that unless the random draw is stored: so an augmentation here is split
into ``sample`` (draw the parameters of ``n`` views from a seeded generator; the cache stores
them as ``view_params``) and ``apply`` (a deterministic, vectorised function of the raw inputs
and those parameters). Stage 1 applies each view and labels it; stage 2 re-applies the stored
parameters to the raw inputs, so the student's input equals the teacher's input exactly.

Every operation is elementwise per sample (index arithmetic, exact copies, or bilinear sampling
whose result for one sample does not depend on the rest of the batch), which is what makes a
view computed in a batch of 256 at build time equal to the same view computed in a shuffled
batch of 64 at training time.

Mixing augmentations (mixup, cutmix) store the partner's row and the mixing factor. The
partner is a row of the same split, passed through the same preceding operations with the
primary's parameters; the mixing factor is kept at or above 0.5 so that the primary sample
still dominates and its hard label remains the sensible one for the hard-label term.

Parameters are float32 (the store's ``view_params`` dtype); integers such as partner rows and
pixel offsets are exact in float32 below 2**24, and ``check_rows`` refuses caches beyond that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .manifest import Spec, ViewInfo
from .specs import call_spec, check_recorded

PartnerFn = Callable[[torch.Tensor], torch.Tensor]
"""Raw inputs of the given rows (a 1-D int64 tensor) of the split being augmented."""

MAX_EXACT_ROW = 2**24
"""float32 holds every integer up to this exactly; partner rows beyond it would be rounded."""


@runtime_checkable
class Replayable(Protocol):
    """What a view-producing augmentation must provide to be accepted by ``build --views``."""

    param_names: list[str]

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        """Parameters of ``n`` views, float32 ``(n, len(param_names))``."""
        ...

    def apply(self, inputs: torch.Tensor, params: torch.Tensor, partners: PartnerFn | None = None) -> torch.Tensor:
        """The views: a deterministic function of ``inputs (n, *shape)`` and ``params (n, P)``."""
        ...


class Op:
    """Base of the built-in operations; subclasses set ``name`` and ``names`` (unprefixed)."""

    name = "op"
    names: tuple[str, ...] = ()
    mixes = False
    """True when ``apply`` needs the partner rows (mixup, cutmix)."""

    @property
    def param_names(self) -> list[str]:
        return [f"{self.name}.{n}" for n in self.names]

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def apply(self, inputs: torch.Tensor, params: torch.Tensor, partners: PartnerFn | None = None) -> torch.Tensor:
        if not self.mixes:
            return self.transform(inputs, params)
        if partners is None:
            raise UsageError(f"augmentation {self.name} mixes rows but no partner rows were provided")
        return self.mix(inputs, partners(params[:, 0].long()), params)

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, inputs: torch.Tensor, partner: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _f32(*columns: np.ndarray) -> np.ndarray:
    return np.stack(columns, axis=1).astype(np.float32)


def _spatial(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise UsageError(f"image augmentations need inputs shaped (..., H, W); got sample shape {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def _base_grid(size: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel centres in grid_sample's normalised coordinates (align_corners=False)."""
    return (torch.arange(size, dtype=like.dtype, device=like.device) * 2 + 1) / size - 1


class RandomResizedCrop(Op):
    """Crop a random box (area fraction in ``scale``, aspect in ``ratio``) and resize it back to
    the input size with bilinear sampling. Parameters: box width and height as fractions of the
    image, and its centre in normalised coordinates [-1, 1]."""

    name = "crop"
    names = ("w", "h", "cx", "cy")

    def __init__(self, scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"crop scale must satisfy 0 < min <= max <= 1, not {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise UsageError(f"crop ratio must satisfy 0 < min <= max, not {ratio}")
        self.scale, self.ratio = (lo, hi), (float(ratio[0]), float(ratio[1]))

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        area = rng.uniform(*self.scale, size=n)
        log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), size=n)
        w = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)
        h = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
        cx = rng.uniform(-1, 1, size=n) * (1 - w)
        cy = rng.uniform(-1, 1, size=n) * (1 - h)
        return _f32(w, h, cx, cy)

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n, (height, width) = len(inputs), inputs.shape[-2:]
        flat = inputs.reshape(n, -1, height, width)
        p = params.to(flat.dtype)
        gx = p[:, 2:3] + p[:, 0:1] * _base_grid(width, flat)  # (n, W)
        gy = p[:, 3:4] + p[:, 1:2] * _base_grid(height, flat)  # (n, H)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(inputs.shape)


class HorizontalFlip(Op):
    """Mirror left-right with probability ``p``. Parameter: 1.0 flipped, 0.0 not."""

    name = "flip"
    names = ("flip",)

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise UsageError(f"flip probability must be in [0, 1], not {p}")
        self.p = float(p)

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        return _f32((rng.random(n) < self.p).astype(np.float64))

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        flip = (params[:, 0] > 0.5).reshape(-1, *([1] * (inputs.ndim - 1)))
        return torch.where(flip, inputs.flip(-1), inputs)


class Shift(Op):
    """Translate by whole pixels, up to ``max_shift`` each way, filling with ``fill``.
    Parameters: dx, dy (integers). Pixels are copied, never interpolated."""

    name = "shift"
    names = ("dx", "dy")

    def __init__(self, max_shift: int = 1, fill: float = 0.0):
        if int(max_shift) != max_shift or max_shift < 1:
            raise UsageError(f"max_shift must be a positive integer, not {max_shift}")
        self.max_shift, self.fill = int(max_shift), float(fill)

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        m = self.max_shift
        return _f32(rng.integers(-m, m + 1, size=n), rng.integers(-m, m + 1, size=n))

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n, (height, width), m = len(inputs), inputs.shape[-2:], self.max_shift
        flat = inputs.reshape(n, -1, height, width)
        padded = F.pad(flat, (m, m, m, m), value=self.fill)
        d = params.round().long().clamp(-m, m)
        dev = inputs.device
        rows = torch.arange(height, device=dev)[None, :] - d[:, 1:2] + m  # (n, H)
        cols = torch.arange(width, device=dev)[None, :] - d[:, 0:1] + m  # (n, W)
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(flat.shape[1], device=dev)[None, :, None, None]
        out = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
        return out.reshape(inputs.shape)


def _mix_factor(rng: np.random.Generator, alpha: float, n: int) -> np.ndarray:
    lam = rng.beta(alpha, alpha, size=n)
    return np.maximum(lam, 1 - lam)


class _Mixing(Op):
    """Operations that mix a row with a partner row; the mixing factor is drawn from
    Beta(alpha, alpha) folded to [0.5, 1] so the row itself always dominates."""

    mixes = True
    default_alpha = 1.0

    def __init__(self, alpha: float | None = None):
        alpha = self.default_alpha if alpha is None else alpha
        if alpha <= 0:
            raise UsageError(f"{self.name} alpha must be positive, not {alpha}")
        self.alpha = float(alpha)


class Mixup(_Mixing):
    """Blend with a partner row: ``lam * x + (1 - lam) * partner``, ``lam ~ Beta(alpha, alpha)``
    folded to [0.5, 1]. Parameters: partner row, lam."""

    name = "mixup"
    names = ("partner", "lam")
    default_alpha = 0.4

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        return _f32(rng.integers(0, population, size=n), _mix_factor(rng, self.alpha, n))

    def mix(self, inputs: torch.Tensor, partner: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        lam = params[:, 1].to(inputs.dtype).reshape(-1, *([1] * (inputs.ndim - 1)))
        return lam * inputs + (1 - lam) * partner


class CutMix(_Mixing):
    """Paste a box of a partner row into the input. The box covers ``1 - lam`` of the area,
    ``lam ~ Beta(alpha, alpha)`` folded to [0.5, 1]. Parameters: partner row and the box in
    pixels (top, left, bottom, right; bottom/right exclusive), from which the kept fraction is
    exact."""

    name = "cutmix"
    names = ("partner", "top", "left", "bottom", "right")

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        height, width = _spatial(shape)
        cut = np.sqrt(1 - _mix_factor(rng, self.alpha, n))
        bh, bw = np.floor(cut * height).astype(np.int64), np.floor(cut * width).astype(np.int64)
        top = rng.integers(0, height - bh + 1)
        left = rng.integers(0, width - bw + 1)
        return _f32(rng.integers(0, population, size=n), top, left, top + bh, left + bw)

    def mix(self, inputs: torch.Tensor, partner: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        box = params[:, 1:5].round().long()
        ys = torch.arange(height, device=inputs.device)[None, :]
        xs = torch.arange(width, device=inputs.device)[None, :]
        in_rows = (ys >= box[:, 0:1]) & (ys < box[:, 2:3])  # (n, H)
        in_cols = (xs >= box[:, 1:2]) & (xs < box[:, 3:4])  # (n, W)
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        mask = mask.reshape(len(inputs), *([1] * (inputs.ndim - 3)), height, width)
        return torch.where(mask, partner, inputs)


class Chain(Op):
    """Operations applied in order; parameters are the concatenation of theirs. A mixing step's
    partner goes through the preceding steps with the primary's parameters."""

    name = "chain"

    def __init__(self, ops: Sequence[Op]):
        if not ops:
            raise UsageError("an augmentation chain needs at least one operation")
        self.ops = list(ops)
        self.mixes = any(op.mixes for op in self.ops)
        bounds = np.cumsum([0] + [len(op.param_names) for op in self.ops])
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    @property
    def param_names(self) -> list[str]:
        names = [n for op in self.ops for n in op.param_names]
        if len(set(names)) != len(names):
            raise UsageError(f"augmentation chain repeats an operation: {names}")
        return names

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        parts = [op.sample(n, rng, population=population, shape=shape) for op in self.ops]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def apply(self, inputs: torch.Tensor, params: torch.Tensor, partners: PartnerFn | None = None) -> torch.Tensor:
        out = inputs
        for i, (op, cols) in enumerate(zip(self.ops, self._slices)):
            if op.mixes:
                if partners is None:
                    raise UsageError(f"augmentation {op.name} mixes rows but no partner rows were provided")
                before = self.ops[:i]
                prefix = self._slices[:i]
                fetch = partners

                def prepared(rows: torch.Tensor, fetch: PartnerFn = fetch, before: list[Op] = before,
                             prefix: list[slice] = prefix) -> torch.Tensor:
                    x = fetch(rows)
                    for prev, c in zip(before, prefix):
                        x = prev.apply(x, params[:, c])
                    return x

                out = op.apply(out, params[:, cols], prepared)
            else:
                out = op.apply(out, params[:, cols])
        return out


def random_resized_crop(scale_min: float = 0.6, scale_max: float = 1.0, ratio_min: float = 3 / 4,
                        ratio_max: float = 4 / 3) -> RandomResizedCrop:
    return RandomResizedCrop((scale_min, scale_max), (ratio_min, ratio_max))


def hflip(p: float = 0.5) -> HorizontalFlip:
    return HorizontalFlip(p)


def shift(max_shift: int = 1, fill: float = 0.0) -> Shift:
    return Shift(max_shift, fill)


def mixup(alpha: float = 0.4) -> Mixup:
    return Mixup(alpha)


def cutmix(alpha: float = 1.0) -> CutMix:
    return CutMix(alpha)


def compose(crop: float = 0.0, flip: float = 0.0, shift: int = 0, mixup: float = 0.0, cutmix: float = 0.0,
            fill: float = 0.0) -> Op:
    """The CLI-friendly way to combine the built-ins (``softcache.augment:compose,shift=1,mixup=0.4``).

    ``crop``: smallest crop area fraction (0 = no crop); ``flip``: flip probability; ``shift``:
    largest shift in pixels; ``mixup`` / ``cutmix``: their Beta alpha (0 = off). Order: crop,
    flip, shift, then mixup, then cutmix.
    """
    ops: list[Op] = []
    if crop:
        ops.append(RandomResizedCrop((crop, 1.0)))
    if flip:
        ops.append(HorizontalFlip(flip))
    if shift:
        ops.append(Shift(shift, fill))
    if mixup:
        ops.append(Mixup(mixup))
    if cutmix:
        ops.append(CutMix(cutmix))
    if not ops:
        raise UsageError("compose: no operation enabled (set crop, flip, shift, mixup or cutmix)")
    return ops[0] if len(ops) == 1 else Chain(ops)


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


def resolve_views(augment: Spec | str | None, views: int, seed: int, rows: int) -> tuple[Replayable | None, ViewInfo]:
    """The augmentation and the manifest's view record for ``--views V --augment SPEC``."""
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
        self.aug, self.inputs, self.view_params = aug, inputs.to(torch.float32), view_params

    def to(self, device: torch.device | str) -> ViewReplay:
        return ViewReplay(self.aug, self.inputs.to(device), self.view_params.to(device))

    def _partners(self, rows: torch.Tensor) -> torch.Tensor:
        return self.inputs[rows.to(self.inputs.device)]

    def __call__(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.aug.apply(self.inputs[rows], self.view_params[rows, views], self._partners)


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


def cache_replay(cache: Any, inputs: torch.Tensor, trust: bool = False) -> ViewReplay | None:
    """The replay for the training rows of an opened ``store.Cache`` (None for plain caches)."""
    from .store import VIEW_PARAMS

    split = cache.train
    params = np.asarray(split.array(VIEW_PARAMS)[:]) if VIEW_PARAMS in split.group else None
    return replay_for(cache.manifest.views, params, inputs, trust)
