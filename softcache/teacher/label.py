"""Labelling: what stage 1 stores for a block of rows, given the teacher's logits.

Labelling is split in two so that the teacher never waits for the rest: :func:`teacher_logits`
is the teacher's call, and :func:`stored_arrays` (scaling by 1/T, the statistics at T=1, the
storage dtype) is CPU work on logits the teacher no longer touches, which the build hands to
its background writer (``cache.writer.Deferred``) to run beside the teacher's next call. The
stored values are the same bit for bit whichever thread computes them.

Sampled storage (``sample:N``) draws with a counter-based rule rather than a random stream: draw
``d`` of position ``p`` of row ``r`` (the row's number in its split) is the class whose interval
of the cumulative distribution at T holds ``u * total``, where ``u`` in [0, 1) is the top 53 bits
of a splitmix64 hash chain over ``(seed, r, p, d)`` (:func:`draw_uniforms`). A draw is thus a
function of those four numbers and the teacher's probabilities only: a rebuild, a resumed build
and any sharding of the rows draw the same classes, whatever blocks the rows arrive in.

Builds draw *systematically* (``storage.sampler``): one uniform ``u`` per position (``d`` = 0 in
the chain above) and draw ``d`` at ``(u + d) / N``. Each draw alone is still uniform, so the
target ``counts / N`` stays unbiased, but a class of probability ``p`` is drawn ``floor(N p)`` or
``ceil(N p)`` times instead of anywhere from 0 to N: at a language model's entropy, 12 systematic
draws estimate the distribution about as well as several times as many independent ones, in the
same 3 bytes per draw. Caches that record no sampler were drawn independently and read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from softcache.cache import layout
from softcache.cache.manifest import Manifest, StorageInfo
from softcache.errors import CacheError
from softcache.weights import output_logits


def check_finite(logits: torch.Tensor, first_row: int) -> None:
    bad = (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad):
        rows = [first_row + int(i) for i in bad[:10]]
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CacheError(f"teacher produced NaN/Inf logits for rows {rows}{more}; nothing was marked complete")


@dataclass
class RowBlock:
    """What a producer hands the build for consecutive rows: inputs, labels, sample ids,
    and optional view parameters ``(n, V, P)`` and views already applied ``(n, V, ...)``.

    A block of token rows (``sequence``) has ``(n, L)`` token ids as inputs, no labels, and its
    ``tokens``/``loss_mask`` arrays in ``extra``."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    sample_index: np.ndarray
    views: torch.Tensor | None = None
    view_params: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    sequence: bool = False


@torch.no_grad()
def teacher_logits(teacher: nn.Module, block: RowBlock, device: torch.device) -> torch.Tensor:
    """The teacher's float32 logits ``(n, V, C)`` for every view of a block (``(n, L, C)`` for
    every position of token rows), on the CPU: the only part of labelling that needs the teacher
    (and so the only part the teacher's loop waits for)."""
    if block.sequence:
        return output_logits(teacher(block.inputs.to(device))).float().cpu()
    views = block.views if block.views is not None else block.inputs.unsqueeze(1)
    n, v = views.shape[:2]
    return output_logits(teacher(views.reshape(n * v, *views.shape[2:]).to(device))).float().cpu().reshape(n, v, -1)


def stored_logprobs(logp: torch.Tensor, storage: StorageInfo) -> np.ndarray:
    """Top-k log-probabilities in the storage dtype: float as they are, or uint8 steps of
    ``storage.scale`` nats below 0 (rounded to nearest, the last step holding everything
    smaller; ``StorageInfo.scale`` says what a step is)."""
    if storage.dtype != "uint8":
        return logp.numpy().astype(storage.dtype)
    return (-logp / float(storage.scale or 1)).round_().clamp_(0, 255).numpy().astype(np.uint8)


def compact(scaled: torch.Tensor, storage: StorageInfo, first_row: int = 0) -> dict[str, np.ndarray]:
    """The stored form of ``z / T`` ``(n, P, C)`` float32 under ``storage``, for rows
    ``first_row ..`` of their split.

    ``full`` keeps every value. ``topk`` keeps the ``k`` most probable classes' ids and
    log-probabilities at T, largest first, and the probability mass of all the others, computed
    in float32 from the full distribution before anything is rounded. ``sample`` keeps ``k``
    draws from the full distribution at T (:func:`sample_counts`)."""
    if storage.mode == "full":  # torch rounds to float16 as numpy does (to nearest, ties to even), ~5x faster
        return {layout.SOFT: scaled.to(getattr(torch, storage.dtype)).numpy()}
    logp = torch.log_softmax(scaled, dim=-1)
    if storage.mode == "sample":
        ids, counts = sample_counts(logp, int(storage.k or 0), int(storage.seed or 0), first_row,
                                    systematic=storage.sampler == "systematic")
        return {layout.SOFT: counts.numpy().astype(np.uint8), layout.SOFT_IDS: ids.numpy().astype(storage.id_dtype)}
    values, ids = logp.topk(int(storage.k or 0), dim=-1)
    rest = (1.0 - values.exp().sum(-1)).clamp_(min=0.0)
    return {layout.SOFT: stored_logprobs(values, storage), layout.SOFT_IDS: ids.numpy().astype(storage.id_dtype),
            layout.SOFT_REST: rest.numpy()}


_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function: a bijection of uint64 whose every output bit depends on
    every input bit, so chaining it over the coordinates of a draw gives independent uniforms."""
    x = x + _GAMMA
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def draw_uniforms(seed: int, rows: np.ndarray, positions: int, draws: int) -> np.ndarray:
    """Uniforms in [0, 1), ``(len(rows), positions, draws)`` float64: the one at ``[i, p, d]``
    is a function of ``(seed, rows[i], p, d)`` alone (see the module docstring)."""
    def u64(values: np.ndarray | int) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).astype(np.uint64)

    h = _splitmix64(u64(seed).reshape(1, 1, 1))
    h = _splitmix64(h ^ u64(rows).reshape(-1, 1, 1))
    h = _splitmix64(h ^ u64(np.arange(positions)).reshape(1, -1, 1))
    h = _splitmix64(h ^ u64(np.arange(draws)).reshape(1, 1, -1))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_counts(logp: torch.Tensor, draws: int, seed: int, rows: int | np.ndarray,
                  systematic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` classes drawn with replacement from ``exp(logp)`` ``(n, P, C)`` at every position
    of rows ``rows ..`` (an int: the first of ``n`` consecutive rows) or of the ``n`` rows an array
    names (as a shuffled batch holds them), by inverse CDF on :func:`draw_uniforms`, as ``(ids, counts)``
    ``(n, P, min(draws, C))`` int64: the distinct ids drawn, most drawn first (ties: smaller id
    first), then unused slots of id 0 and count 0. ``systematic``: the draws of a position are
    spaced ``1 / draws`` apart from one uniform (see the module docstring).

    The cumulative distribution is summed in float64 and each ``u`` scaled by its total, so a
    class of probability 0 is never drawn and rounding cannot push a draw past the last class."""
    n, positions, classes = logp.shape
    cdf = torch.cumsum(logp.exp(), -1, dtype=torch.float64)
    total = cdf[..., -1:]
    rows = np.asarray(rows) if np.ndim(rows) else np.arange(rows, rows + n)
    if systematic:  # one uniform per position, the draws spaced 1/draws apart from it
        start = draw_uniforms(seed, rows, positions, 1)
        u = torch.from_numpy((start + np.arange(draws)) / draws)
    else:
        u = torch.from_numpy(draw_uniforms(seed, rows, positions, draws))
    below = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    picks = torch.searchsorted(cdf, below, right=True).clamp_(max=classes - 1)
    return distinct_counts(picks, min(draws, classes))


def distinct_counts(picks: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``picks`` ``(..., N)`` and their counts in ``slots`` fixed slots,
    most frequent first (ties: smaller value first), unused slots 0 and 0. Sorting puts equal
    values in runs, and a run's number is its slot: no loop over rows or positions."""
    ordered = picks.sort(-1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run = starts.long().cumsum(-1) - 1
    shape = (*picks.shape[:-1], slots)
    counts = torch.zeros(shape, dtype=torch.int64).scatter_add_(-1, run, torch.ones_like(run))
    ids = torch.zeros(shape, dtype=torch.int64).scatter_(-1, run, ordered)
    order = counts.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order), counts.gather(-1, order)


SLICE_BYTES = 512 << 10
"""Float32 logits :func:`row_arrays` works on at once. Whole-block temporaries (64 MiB for 32
rows of 64 positions at 8k tokens) would be fresh memory maps, page-faulted in on every block and
costing as much as the arithmetic; slices are reused from the heap, and at this size a slice's
several passes (maximum, exponentials, sums) read it from the core's cache rather than from
memory. Labelling such a block in 512 KiB slices took 0.83-0.88 of the time 8 MiB slices took
(1 MiB: 0.92-0.97; 256 KiB: 1.09 and 128 KiB: 1.23, where the per-slice calls add up; medians of
12 alternated rounds, one thread)."""


STRIDE_ROWS = 8
"""Strided groups per class :func:`top_classes` reduces over: 8 halves a top-64 of 8k classes."""


def top_classes(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``z.topk(k)`` of ``(m, C)`` finite logits, largest first, in about half torch's time when
    ``k`` is small beside ``C``.

    The classes are cut into ``C // 8`` strided groups (class ``j`` in group ``j % (C // 8)``):
    their maxima are a cheap element-wise max of 8 contiguous slices. The ``k`` groups of largest
    maximum hold the ``k`` largest entries (any entry outside them is at most the ``k``-th group
    maximum, which ``k`` entries reach), so one top-k over their ``8k`` members (and the classes
    past the last whole group) gives the answer. A tie may come out in another order."""
    m, classes = z.shape
    groups = classes // STRIDE_ROWS
    if groups < 4 * k:
        return z.topk(k, dim=-1)
    whole = groups * STRIDE_ROWS
    best = z[:, :whole].view(m, STRIDE_ROWS, groups).amax(1).topk(k, dim=-1, sorted=False).indices
    members = (best.unsqueeze(-1) + torch.arange(STRIDE_ROWS) * groups).reshape(m, -1)
    if whole < classes:
        members = torch.cat([members, torch.arange(whole, classes).expand(m, -1)], 1)
    values, at = z.gather(1, members).topk(k, dim=-1)
    return values, members.gather(1, at)


def row_arrays(logits: torch.Tensor, temperature: float, storage: StorageInfo) -> dict[str, np.ndarray]:
    """The statistics at T=1 of ``(m, C)`` raw logits and, under top-k storage, the stored top-k,
    from one top-k and one or two log-sum-exps per row, slice by slice (the writer thread's main
    work, beside the teacher: one pass of exponentials instead of a log-softmax and its exp).

    The kept classes are the top ``k`` of ``z`` (the same as of ``z / T``); their
    log-probabilities at T are ``z_k / T - lse(z / T)`` and the leftover is one minus their sum.
    Maximum probability, margin and prediction come from the same top-k (:func:`top_classes`);
    the entropy at T=1 is ``lse(z) - <softmax(z), z>``. The values agree with :func:`compact` and
    a log-softmax to float32 rounding (a tie between two classes may be kept in the other order)."""
    keep = int(storage.k or 0) if storage.mode == "topk" else 0
    m, classes = logits.shape
    step = max(1, SLICE_BYTES // (4 * classes))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, m, step):
        z = logits[start : start + step]
        top, ids = top_classes(z, min(max(2, keep), classes))
        peak = top[:, :1]
        shifted = z - peak
        e = shifted.exp()
        total = e.sum(-1)
        lse1 = peak.squeeze(-1) + total.log()
        p2 = (top[:, :2] - lse1.unsqueeze(-1)).exp()
        out = {"stats/max_prob": p2[:, 0].numpy(),
               "stats/entropy": (lse1 - torch.linalg.vecdot(e, z) / total).numpy(),
               "stats/margin": (p2[:, 0] - p2[:, 1] if classes > 1 else p2[:, 0]).numpy(),
               "stats/prediction": ids[:, 0].to(torch.int32).numpy()}
        if keep:
            if temperature == 1.0:  # the usual temperature of next-token distillation: no second pass
                lse_t = lse1
            else:
                lse_t = peak.squeeze(-1) / temperature + shifted.mul_(1 / temperature).exp_().sum(-1).log()
            logp = top[:, :keep] / temperature - lse_t.unsqueeze(-1)
            out |= {layout.SOFT: stored_logprobs(logp, storage),
                    layout.SOFT_IDS: ids[:, :keep].numpy().astype(storage.id_dtype),
                    layout.SOFT_REST: (1.0 - logp.exp().sum(-1)).clamp_(min=0.0).numpy()}
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def block_arrays(logits: torch.Tensor, block: RowBlock, first_row: int, temperature: float,
                 dtype: str, storage: StorageInfo | None = None) -> dict[str, np.ndarray]:
    """The arrays to store for a block, from its teacher logits ``(n, V, C)``: soft labels
    ``z / T`` in the storage form (``storage``, default full in ``dtype``), statistics at T=1,
    and the block's own arrays. Pure CPU work on tensors the teacher no longer touches, so the
    build runs it in the writer thread."""
    n, v = logits.shape[:2]
    storage = storage or StorageInfo(dtype=dtype)  # type: ignore[arg-type]
    if not bool(logits.sum().isfinite()):  # NaN and infinities reach the sum; the exact scan names the rows
        check_finite(logits.reshape(n, -1), first_row)
    out = {k: a.reshape(n, v, *a.shape[1:]) for k, a in row_arrays(logits.reshape(n * v, -1), temperature,
                                                                    storage).items()}
    if storage.mode != "topk":
        out |= compact(logits / temperature, storage, first_row)
    out[layout.INDEX] = block.sample_index.astype(np.int64)
    if block.labels is not None:
        out[layout.LABELS] = block.labels.to(torch.int64).numpy()
    if block.view_params is not None:
        out[layout.VIEW_PARAMS] = block.view_params.astype(np.float32)
    out.update(block.extra)
    return out


def label_block(teacher: nn.Module, block: RowBlock, first_row: int, temperature: float, dtype: str,
                device: torch.device) -> dict[str, np.ndarray]:
    """Run the teacher on every view of a block and return the arrays to store for it."""
    return block_arrays(teacher_logits(teacher, block, device), block, first_row, temperature, dtype)


def stored_arrays(logits: torch.Tensor, block: RowBlock, first_row: int, manifest: Manifest,
                  store_inputs: bool) -> dict[str, np.ndarray]:
    """What the build stores for a block: :func:`block_arrays` plus, when the cache keeps them,
    the block's raw inputs."""
    arrays = block_arrays(logits, block, first_row, manifest.temperature, manifest.storage.dtype, manifest.storage)
    if store_inputs and not block.sequence:  # the raw inputs; augmented views are re-created from them and view_params
        arrays[layout.INPUTS] = block.inputs.to(torch.float32).numpy()
    return arrays
