"""Data-free stage 1: make inputs from the teacher alone and cache them with its soft labels.

When the training data cannot be shared, the teacher still remembers a lot about it: its
BatchNorm layers hold the running mean and variance of the features the real data produced.
DeepInversion (Yin et al., CVPR 2020) optimises a batch of inputs, starting from noise, so that

* the teacher predicts a sampled target class for each input (targets are class-balanced),
* at every BatchNorm layer the batch's feature mean and variance match the running statistics
  (the first layer can be weighted up: it constrains the pixels most directly),
* image priors keep the inputs natural: total variation (smoothness) and an L2 norm,
* a diversity term pushes same-class inputs apart in the teacher's penultimate features, so a
  class is not represented by near-copies of one prototype,

with small random shifts ("jitter") every step so the inputs do not overfit one alignment.
The finished inputs are written, with the teacher's logits, into an ordinary cache whose
manifest records the method, its parameters and the seed instead of a dataset; the inputs are
always stored, so stage 2 needs no data at all.

A teacher without BatchNorm has no feature statistics to match. It still works, with a
warning: the optimisation then has only the class targets, the priors and the diversity term,
which make inputs the teacher is confident about but that resemble real data less. How much
that costs depends on the teacher: dropping the statistics term for the BatchNorm digits teacher
cost 7-18 points of student accuracy, while a digits CNN without BatchNorm still taught well
(docs/datafree.md has the numbers). Always compare with the noise baseline.

``method="noise"`` labels Gaussian noise instead: the baseline any synthesis must beat.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from softcache.cache import store
from softcache.views import resolve_views
from softcache.teacher.build import block_source, run_build
from softcache.teacher.plan import BuildPlan, make_manifest, storage_info, teacher_info
from softcache.config import SynthCacheOptions, SynthConfig, with_options
from softcache.data import LabelledTensors, describe, load_dataset
from softcache.errors import UsageError
from softcache.cache.manifest import Spec, SynthesisSource
from softcache.progress import Progress
from softcache.weights import load_model, predict, probe_model, resolve_device

NO_BATCHNORM_WARNING = (
    "teacher has no BatchNorm layers: synthesis falls back to class targets, image priors and diversity only "
    "(no feature statistics to match), so inputs resemble the real data less and student quality depends on "
    "how the teacher answers off its data; compare with --method noise (docs/datafree.md)"
)


class SynthWarning(UserWarning):
    """Raised (as a warning) when synthesis runs in a degraded mode."""


@dataclass
class Synthesized:
    """The cache plus what the synthesis measured (not part of the cache key)."""

    cache: store.Cache
    seconds: float
    target_rate: float
    """Fraction of inputs the teacher assigns to the class they were optimised for."""
    fallback: bool
    """True when the teacher had no BatchNorm layers to match."""
    skipped: bool = False
    """True when ``skip_existing`` found this very cache already complete."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class _Probes:
    """Forward hooks collecting, for one teacher call, each BatchNorm layer's statistics loss
    and the penultimate features (the input of the last Linear layer)."""

    def __init__(self, model: nn.Module, first_bn_weight: float):
        self.bn_losses: list[torch.Tensor] = []
        self.features: torch.Tensor | None = None
        self._handles = []
        for i, layer in enumerate(batchnorm_layers(model)):
            weight = first_bn_weight if i == 0 else 1.0
            self._handles.append(layer.register_forward_hook(self._bn_hook(weight)))
        last = _last_linear(model)
        if last is not None:
            self._handles.append(last.register_forward_hook(self._feature_hook))

    def _bn_hook(self, weight: float):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = args[0]
            dims = [0, *range(2, x.ndim)]
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            loss = (torch.linalg.vector_norm(mean - module.running_mean)
                    + torch.linalg.vector_norm(var - module.running_var))
            self.bn_losses.append(weight * loss)

        return hook

    def _feature_hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        self.features = args[0]

    def reset(self) -> None:
        self.bn_losses, self.features = [], None

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels (both directions)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.pow(2).mean() + dy.pow(2).mean()


def same_class_similarity(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs of distinct inputs that share a target class."""
    f = F.normalize(features.flatten(1), dim=1)
    sim = f @ f.T
    mask = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool, device=f.device)
    pairs = mask.sum()
    return (sim * mask).sum() / pairs.clamp(min=1)


def balanced_targets(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Each class ``num_samples // num_classes`` or one more times, in seeded random order."""
    rng = np.random.default_rng([int(seed), 7])
    return torch.from_numpy(rng.permutation(np.arange(num_samples) % num_classes)).long()


def _jitter(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1)) if x.ndim >= 3 else x


def _clamp(x: torch.Tensor, cfg: SynthConfig) -> None:
    if cfg.input_range is not None:
        with torch.no_grad():
            x.clamp_(*cfg.input_range)


def invert_batch(teacher: nn.Module, targets: torch.Tensor, shape: Sequence[int], cfg: SynthConfig, seed: int,
                 device: torch.device, on_step: Progress | None = None) -> torch.Tensor:
    """DeepInversion on one batch: optimise inputs from seeded noise toward ``targets``."""
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((len(targets), *shape), generator=gen).to(device)
    if cfg.input_range is not None:
        low, high = cfg.input_range
        x = (x * (high - low) / 4 + (low + high) / 2).clamp(low, high)
    x.requires_grad_(True)
    targets = targets.to(device)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.steps, 1))
    probes = _Probes(teacher, cfg.first_bn_weight)
    try:
        for _ in range(cfg.steps):
            probes.reset()
            logits = teacher(_jitter(x, cfg.jitter, gen))
            loss = F.cross_entropy(logits, targets)
            if probes.bn_losses and cfg.bn_weight:
                loss = loss + cfg.bn_weight * torch.stack(probes.bn_losses).sum()
            if cfg.tv_weight:
                loss = loss + cfg.tv_weight * total_variation(x)
            if cfg.l2_weight:
                loss = loss + cfg.l2_weight * x.flatten(1).norm(dim=1).mean()
            if cfg.diversity_weight:
                feats = probes.features if probes.features is not None else x
                loss = loss + cfg.diversity_weight * same_class_similarity(feats, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            _clamp(x, cfg)
            if on_step is not None:
                on_step.update(1)
    finally:
        probes.close()
    return x.detach().cpu()


def noise_batch(num: int, shape: Sequence[int], cfg: SynthConfig, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((num, *shape), generator=gen) * cfg.noise_std + cfg.noise_mean
    return x.clamp(*cfg.input_range) if cfg.input_range is not None else x


def synthesize_inputs(teacher: nn.Module, num_samples: int, shape: Sequence[int], num_classes: int, cfg: SynthConfig,
                      seed: int, device: torch.device,
                      progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batch by batch. Batch ``b`` is seeded by ``(seed, b)`` so a
    run is reproducible for the same batch size, teacher and device."""
    targets = balanced_targets(num_samples, num_classes, seed)
    starts = range(0, num_samples, cfg.batch_size)
    if cfg.method == "deepinversion" and not batchnorm_layers(teacher):
        warnings.warn(NO_BATCHNORM_WARNING, SynthWarning, stacklevel=2)
    steps = cfg.steps if cfg.method == "deepinversion" else 1
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # gradients flow to the inputs only
    teacher.eval()
    try:
        with Progress(total=len(starts) * steps, desc=f"synthesize ({cfg.method})", enabled=progress,
                      unit="steps") as bar:
            for b, start in enumerate(starts):
                t = targets[start : start + cfg.batch_size]
                batch_seed = int(seed) * 1_000_003 + b
                if cfg.method == "noise":
                    x = noise_batch(len(t), shape, cfg, batch_seed)
                    bar.update(1)
                else:
                    x = invert_batch(teacher, t, shape, cfg, batch_seed, device, bar)
                yield x, t
    finally:
        for p in frozen:
            p.requires_grad_(True)


def synthesize(
    teacher: str | Spec | nn.Module,
    out: str,
    config: SynthConfig | None = None,
    *,
    samples: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    eval_data: str | Spec | Dataset | None = None,
    reuse_inputs: str | None = None,
    skip_existing: bool = False,
    progress: bool = True,
    **options: Any,
) -> Synthesized:
    """Synthesize ``samples`` inputs from the teacher and write a data-free cache at ``out``.

    ``config`` says how the inputs are made (:class:`~softcache.config.SynthConfig`); keyword
    ``options`` say how the cache is written, the fields ``build`` shares
    (:class:`~softcache.config.SynthCacheOptions`: temperature, dtype, chunk rows, views,
    augment, view seed, device, overwrite); an unknown or invalid one is a one-line UsageError.

    Inputs are stored (stage 2 reads them; no dataset is needed). Labels hold the class each
    input was optimised for (for ``noise``, the teacher's own prediction); ``eval_data``, when
    given, is a real held-out set whose teacher outputs (not its inputs) go to the ``eval``
    split so students report agreement. With ``views`` > 1 and ``augment``, the teacher labels
    that many replayable views of every synthesized input (drawn with ``view_seed``, default
    ``seed``). The default T is higher than ``build``'s: synthetic inputs give confident logits,
    and a higher temperature keeps their dark knowledge visible.

    ``reuse_inputs`` names an earlier synthesized cache of the same teacher: its inputs and
    synthesis record are relabelled (other views, temperature or eval set) without paying for
    the synthesis again. With ``skip_existing``, a complete cache at ``out`` with the cache key
    this call would produce is returned as it is (pipelines rerun without synthesizing again).
    """
    opts = with_options(SynthCacheOptions, None, options, "synthesize")
    dev = resolve_device(opts.device)
    teacher_spec = None if isinstance(teacher, nn.Module) else Spec.parse(teacher)
    model = teacher if isinstance(teacher, nn.Module) else load_model(teacher_spec)  # type: ignore[arg-type]
    model = model.to(dev).eval()
    eval_set, eval_spec = load_dataset(eval_data) if eval_data is not None else (None, None)
    inputs: torch.Tensor | None = None
    if reuse_inputs is not None:
        source, inputs, labels = _reused(reuse_inputs, model)
        shape, batch_size = list(inputs.shape[1:]), 1024
    else:
        cfg = config or SynthConfig()
        if samples is None or samples < 1:
            raise UsageError(f"samples must be at least 1, not {samples}")
        if not input_shape or min(int(s) for s in input_shape) < 1:
            raise UsageError(f"input shape must be positive integers, not {input_shape}")
        shape, batch_size = [int(s) for s in input_shape], cfg.batch_size
        params = cfg.model_dump(mode="json")
        params["input_shape"] = shape
        if cfg.method == "deepinversion" and not batchnorm_layers(model):
            params["fallback"] = "no BatchNorm layers: class targets, image priors and diversity only"
        source = SynthesisSource(method=cfg.method, params=params, seed=int(seed), num_samples=samples)
    probe = probe_model(model, torch.zeros((2, *shape)), dev)
    if probe.ndim != 2:
        raise UsageError(f"teacher output has shape {tuple(probe.shape)}; expected (batch, classes)")
    num_classes = int(probe.shape[1])
    aug, view = resolve_views(opts.augment, opts.views, seed if opts.view_seed is None else opts.view_seed,
                              source.num_samples, shape=shape)
    manifest = make_manifest(  # everything the cache key needs is known before any synthesis
        teacher_info(model, teacher_spec), source, num_classes, None, shape,
        temperature=opts.temperature, storage=storage_info("full", opts.dtype), views=view,
        chunk_rows=opts.chunk_rows, shard_chunks=1,
        eval_source=describe(eval_set, eval_spec) if eval_set is not None else None,
    )
    fallback = "fallback" in source.params
    if skip_existing:
        found = store.peek_manifest(out)
        if found is not None and found.cache_key == manifest.cache_key and found.status.state == "complete":
            cache = store.open_cache(out)
            stored, stored_labels = torch.from_numpy(cache.train.inputs()), torch.from_numpy(cache.train.labels())
            return Synthesized(cache, 0.0, _target_rate(model, stored, stored_labels, dev), fallback, skipped=True)
    store.prepare_target(out, overwrite=opts.overwrite)  # fail before minutes of synthesis, not after
    seconds = 0.0
    if inputs is None:
        start = time.perf_counter()
        parts = list(synthesize_inputs(model, source.num_samples, shape, num_classes, cfg, seed, dev, progress))
        seconds = time.perf_counter() - start
        inputs = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if cfg.method == "noise":
            labels = predict(model, inputs, device=dev)
    dataset = LabelledTensors(inputs, labels, None, {"synthesis": source.method, "seed": source.seed})
    train_blocks = block_source(dataset, batch_size, aug, view)
    eval_blocks = block_source(eval_set, 1024) if eval_set is not None else None
    cache = run_build(out, model, BuildPlan(manifest=manifest, store_inputs=True, eval_inputs=False), train_blocks,
                      eval_blocks, device=dev, overwrite=opts.overwrite, progress=progress,
                      pin_threads=opts.pin_threads)
    return Synthesized(cache, seconds, _target_rate(model, inputs, labels, dev), fallback)


def _target_rate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    return float((predict(model, inputs, device=device) == labels).float().mean())


def _reused(url: str, model: nn.Module) -> tuple[SynthesisSource, torch.Tensor, torch.Tensor]:
    """The synthesis record, inputs and labels of an earlier synthesized cache of this teacher."""
    earlier = store.open_cache(url)
    source = earlier.manifest.source
    if not isinstance(source, SynthesisSource) or not earlier.train.has_inputs:
        raise UsageError(f"{url}: not a synthesized cache with stored inputs; --reuse-inputs needs one")
    if earlier.manifest.teacher.weights_digest != teacher_info(model, None).weights_digest:
        raise UsageError(f"{url}: was synthesized from another teacher (weights digest differs)")
    return source, torch.from_numpy(earlier.train.inputs()), torch.from_numpy(earlier.train.labels())
