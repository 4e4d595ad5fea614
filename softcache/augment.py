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
pixel offsets are exact in float32 below 2**24, and ``views.check_rows`` refuses caches beyond that.

Inputs are (C, L) sequences or (C, H, W) images, told apart by the number of dimensions of one
sample. On a sequence the spatial operations act along L (crop and resize with linear
interpolation, flip, shift, a contiguous CutMix segment); mixup is the same for any shape. A shape
an operation cannot transform meaningfully (no channel dimension, a shift that can move every
value out, a CutMix box that can never cover anything) is refused when the parameters are drawn,
i.e. at build time, rather than producing views that are all fill or identical to the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from softcache.errors import UsageError

PartnerFn = Callable[[torch.Tensor], torch.Tensor]
"""Raw inputs of the given rows (a 1-D int64 tensor) of the split being augmented."""


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

    def check_shape(self, shape: Sequence[int]) -> str:
        """The input kind of ``shape``, or a one-line UsageError when this operation cannot
        transform it into a meaningful view."""
        return input_kind(self.name, shape)

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def apply(self, inputs: torch.Tensor, params: torch.Tensor, partners: PartnerFn | None = None) -> torch.Tensor:
        self.check_shape(tuple(inputs.shape[1:]))
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


SEQUENCE, IMAGE = "sequence", "image"
"""The two input kinds: one sample shaped (C, L) or (C, H, W)."""


def input_kind(name: str, shape: Sequence[int]) -> str:
    """Which kind a sample shape is; any other shape is refused, naming the augmentation, because
    guessing which axes are spatial is how views silently become garbage."""
    dims = tuple(int(s) for s in shape)
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise UsageError(f"augmentation {name} works on (C, L) sequences and (C, H, W) images, "
                         f"not inputs of shape {dims}")
    return SEQUENCE if len(dims) == 2 else IMAGE


def _planes(inputs: torch.Tensor) -> torch.Tensor:
    """A batch as (n, C, H, W): a sequence is an image one row high, so one implementation of
    each spatial operation serves both kinds (along L only, the row index being fixed at 0)."""
    return inputs.unsqueeze(-2) if inputs.ndim == 3 else inputs


def _spatial(shape: Sequence[int]) -> tuple[int, int]:
    """(H, W) of an image sample, (1, L) of a sequence."""
    dims = tuple(int(s) for s in shape)
    return (1, dims[-1]) if len(dims) == 2 else (dims[-2], dims[-1])


def _base_grid(size: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel centres in grid_sample's normalised coordinates (align_corners=False)."""
    return (torch.arange(size, dtype=like.dtype, device=like.device) * 2 + 1) / size - 1


class RandomResizedCrop(Op):
    """Crop a random box (area fraction in ``scale``, aspect in ``ratio``) and resize it back to
    the input size with bilinear sampling. Parameters: box width and height as fractions of the
    image, and its centre in normalised coordinates [-1, 1]. On a (C, L) sequence the window is a
    segment whose length fraction is drawn from ``scale`` (``ratio`` has no meaning there),
    resized back with linear interpolation; its ``h`` is 1 and ``cy`` 0."""

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
        if self.check_shape(shape) == SEQUENCE:
            length = rng.uniform(*self.scale, size=n)
            centre = rng.uniform(-1, 1, size=n) * (1 - length)
            return _f32(length, np.ones(n), centre, np.zeros(n))
        area = rng.uniform(*self.scale, size=n)
        log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), size=n)
        w = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)
        h = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
        cx = rng.uniform(-1, 1, size=n) * (1 - w)
        cy = rng.uniform(-1, 1, size=n) * (1 - h)
        return _f32(w, h, cx, cy)

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        planes = _planes(inputs)
        n, (height, width) = len(inputs), planes.shape[-2:]
        flat = planes.reshape(n, -1, height, width)
        p = params.to(flat.dtype)
        if inputs.ndim == 3:  # one row: sampled exactly at its centre, so bilinear is linear along L
            p = torch.cat([p[:, :1], torch.ones_like(p[:, :1]), p[:, 2:3], torch.zeros_like(p[:, :1])], dim=1)
        gx = p[:, 2:3] + p[:, 0:1] * _base_grid(width, flat)  # (n, W)
        gy = p[:, 3:4] + p[:, 1:2] * _base_grid(height, flat)  # (n, H)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(inputs.shape)


class HorizontalFlip(Op):
    """Mirror left-right (along L for a sequence) with probability ``p``. Parameter: 1.0
    flipped, 0.0 not."""

    name = "flip"
    names = ("flip",)

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise UsageError(f"flip probability must be in [0, 1], not {p}")
        self.p = float(p)

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        self.check_shape(shape)
        return _f32((rng.random(n) < self.p).astype(np.float64))

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        flip = (params[:, 0] > 0.5).reshape(-1, *([1] * (inputs.ndim - 1)))
        return torch.where(flip, inputs.flip(-1), inputs)


class Shift(Op):
    """Translate by whole pixels, up to ``max_shift`` each way, filling with ``fill``.
    Parameters: dx, dy (integers). Pixels are copied, never interpolated. A sequence moves along
    L only (``dy`` is 0). A shift as large as the input could move every value out, leaving a
    view of fill only, so such a shape is refused."""

    name = "shift"
    names = ("dx", "dy")

    def __init__(self, max_shift: int = 1, fill: float = 0.0):
        if int(max_shift) != max_shift or max_shift < 1:
            raise UsageError(f"max_shift must be a positive integer, not {max_shift}")
        self.max_shift, self.fill = int(max_shift), float(fill)

    def check_shape(self, shape: Sequence[int]) -> str:
        kind = input_kind(self.name, shape)
        height, width = _spatial(shape)
        moved = {"length": width} if kind == SEQUENCE else {"height": height, "width": width}
        for axis, size in moved.items():
            if self.max_shift >= size:
                raise UsageError(f"augmentation {self.name} with max_shift={self.max_shift} can move every value out "
                                 f"of inputs of shape {tuple(int(d) for d in shape)} ({axis} {size}); "
                                 f"use max_shift below {size}")
        return kind

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        m = self.max_shift
        if self.check_shape(shape) == SEQUENCE:
            return _f32(rng.integers(-m, m + 1, size=n), np.zeros(n))
        return _f32(rng.integers(-m, m + 1, size=n), rng.integers(-m, m + 1, size=n))

    def transform(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        planes = _planes(inputs)
        n, (height, width), m = len(inputs), planes.shape[-2:], self.max_shift
        flat = planes.reshape(n, -1, height, width)
        padded = F.pad(flat, (m, m, m, m), value=self.fill)
        d = params.round().long().clamp(-m, m)
        if inputs.ndim == 3:
            d = torch.cat([d[:, :1], torch.zeros_like(d[:, :1])], dim=1)
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

    def check_shape(self, shape: Sequence[int]) -> str:
        """Blending is elementwise: any non-empty sample shape will do."""
        dims = tuple(int(s) for s in shape)
        if not dims or min(dims) < 1:
            raise UsageError(f"augmentation {self.name} needs inputs with at least one element, not shape {dims}")
        return {2: SEQUENCE, 3: IMAGE}.get(len(dims), "other")

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        self.check_shape(shape)
        return _f32(rng.integers(0, population, size=n), _mix_factor(rng, self.alpha, n))

    def mix(self, inputs: torch.Tensor, partner: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        lam = params[:, 1].to(inputs.dtype).reshape(-1, *([1] * (inputs.ndim - 1)))
        return lam * inputs + (1 - lam) * partner


class CutMix(_Mixing):
    """Paste a box of a partner row into the input. The box covers ``1 - lam`` of the area,
    ``lam ~ Beta(alpha, alpha)`` folded to [0.5, 1]. Parameters: partner row and the box in
    pixels (top, left, bottom, right; bottom/right exclusive), from which the kept fraction is
    exact. On a sequence the box is a contiguous segment of L (top 0, bottom 1) of at least one
    element, so no view is left untouched; an image or sequence too small for any box to fit in
    half of it is refused."""

    name = "cutmix"
    names = ("partner", "top", "left", "bottom", "right")

    def check_shape(self, shape: Sequence[int]) -> str:
        kind = input_kind(self.name, shape)
        height, width = _spatial(shape)
        if (width if kind == SEQUENCE else min(height, width)) < 2:
            raise UsageError(f"augmentation {self.name} cannot paste anything into inputs of shape "
                             f"{tuple(int(d) for d in shape)}: it needs at least 2 positions along each spatial axis")
        return kind

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        if self.check_shape(shape) == SEQUENCE:
            length = int(shape[-1])
            cut = np.maximum(np.floor((1 - _mix_factor(rng, self.alpha, n)) * length).astype(np.int64), 1)
            left = rng.integers(0, length - cut + 1)
            return _f32(rng.integers(0, population, size=n), np.zeros(n), left, np.ones(n), left + cut)
        height, width = _spatial(shape)
        cut = np.sqrt(1 - _mix_factor(rng, self.alpha, n))
        bh, bw = np.floor(cut * height).astype(np.int64), np.floor(cut * width).astype(np.int64)
        top = rng.integers(0, height - bh + 1)
        left = rng.integers(0, width - bw + 1)
        return _f32(rng.integers(0, population, size=n), top, left, top + bh, left + bw)

    def mix(self, inputs: torch.Tensor, partner: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 3:  # a segment of L: the box on the one-row image, rows fixed to [0, 1)
            rows = torch.tensor([0.0, 1.0], dtype=params.dtype, device=params.device).expand(len(params), 2)
            spans = torch.stack([params[:, 0], rows[:, 0], params[:, 2], rows[:, 1], params[:, 4]], dim=1)
            return self.mix(_planes(inputs), _planes(partner), spans).reshape(inputs.shape)
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

    def check_shape(self, shape: Sequence[int]) -> str:
        kinds = [op.check_shape(shape) for op in self.ops]
        return kinds[0]

    def sample(self, n: int, rng: np.random.Generator, *, population: int, shape: Sequence[int]) -> np.ndarray:
        parts = [op.sample(n, rng, population=population, shape=shape) for op in self.ops]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def apply(self, inputs: torch.Tensor, params: torch.Tensor, partners: PartnerFn | None = None) -> torch.Tensor:
        out = inputs
        for i, (op, cols) in enumerate(zip(self.ops, self._slices)):
            if op.mixes:
                if partners is None:
                    raise UsageError(f"augmentation {op.name} mixes rows but no partner rows were provided")

                def prepared(rows: torch.Tensor, fetch: PartnerFn = partners, i: int = i) -> torch.Tensor:
                    # the partner goes through the steps before this one as the row itself does,
                    # mixing steps included (their partners are prepared the same way, recursively)
                    x = fetch(rows)
                    return Chain(self.ops[:i]).apply(x, params[:, : self._slices[i].start], fetch) if i else x

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
