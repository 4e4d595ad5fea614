"""Many students of one architecture trained as one vectorized model.

Small students leave the CPU idle: a step of a 64-32-10 MLP is a few microseconds of arithmetic
inside a few hundred microseconds of per-operation overhead. Students that share an
architecture are therefore stacked, the parameters of student k becoming row k of one ``(K, P)``
buffer, and one forward, one backward and one optimizer update serve all K of them, each with its
own learning rate, weight decay, temperature, alpha, label smoothing and initial weights.

The result is the same as training each student alone, up to float rounding: the forward runs
through ``torch.func.functional_call`` under ``torch.func.vmap`` (or, for plain ``nn.Sequential``
stacks of convolutions, pooling, ``Linear`` and element-wise activations, through grouped
convolutions and batched matrix products that compute the same thing with less overhead, see
:func:`sequential_forward`); the loss is the one of
:func:`softcache.student.loss.distillation_loss`, per student, with its gradient written out in closed
form; the update is ``torch.optim.Adam``'s, per student. Each student's ``nn.Module`` keeps working:
its parameters are views of its row of the buffer, so it always holds its current weights.

A group falls back to stepping its students one by one when the architecture cannot be stacked:
modules with buffers (BatchNorm running statistics), random layers such as dropout (vmap refuses
them) or optimizers other than plain Adam.

A student's result does not depend on which students share its pass: a stackable student with
no partner still trains as a group of one, through the same code as in a group of twelve, and
every operation computes student k's values from student k's data only (its matmul columns, its
group of a grouped convolution, per-student reductions, element-wise Adam; see
:func:`stacked_loss` for NaN). On CPU, passes with 2 or 12 students of an architecture give each
bitwise the same result, and so does a group of one without convolutions; a lone convolutional
student differs by round-off, because oneDNN computes a ``groups=1`` convolution's backward with
another kernel (another summation order) than a grouped one. ``tests/test_isolation.py`` states
the tolerances measured.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from softcache.student.loaders import Batch

if TYPE_CHECKING:
    from softcache.student.train import StudentRun

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Identity,
)


class _NotStackable(Exception):
    """The fast path does not cover this model or input; the vmap path takes over."""


# -- forward ---------------------------------------------------------------------------------


POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _stackable_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, *ELEMENTWISE)):
        return True
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros"
    if isinstance(module, POOLS):
        return not getattr(module, "return_indices", False)
    return False


def sequential_forward(template: nn.Module) -> Forward | None:
    """A batched forward for a plain ``nn.Sequential`` of ``Conv2d``, 2-d pooling, ``Flatten``,
    ``Linear`` and element-wise activations, or None when the model is anything else.

    Activations travel in one of three layouts: the ``shared`` input ``(B, ...)``; ``channels``
    ``(B, K*C, H, W)`` after a convolution, where student k owns channels ``[k*C, (k+1)*C)``, so a
    convolution is one grouped convolution and pooling needs no change; ``stacked`` ``(K, B, F)``
    after ``Flatten``, where a ``Linear`` is one batched product (``baddbmm``). A layer that sees
    the shared input concatenates the K students' weights and runs once.
    """
    layers: list[tuple[str, nn.Module]] = []

    def collect(module: nn.Module, prefix: str) -> bool:
        if type(module) is nn.Sequential:
            return all(collect(child, f"{prefix}{name}.") for name, child in module.named_children())
        layers.append((prefix, module))
        return _stackable_layer(module)

    if type(template) is not nn.Sequential or not collect(template, ""):
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h, layout = x, "shared"
        for prefix, module in layers:
            weight, bias = params.get(f"{prefix}weight"), params.get(f"{prefix}bias")
            if isinstance(module, nn.Conv2d):
                assert weight is not None
                k, out = weight.shape[0], weight.shape[1]
                if layout == "shared" and module.groups != 1:
                    raise _NotStackable("grouped convolution of the shared input")
                if layout == "stacked":
                    raise _NotStackable("convolution after Flatten")
                groups = module.groups * (k if layout == "channels" else 1)
                h = torch.nn.functional.conv2d(h, weight.reshape(k * out, *weight.shape[2:]),
                                               bias.reshape(-1) if bias is not None else None,
                                               module.stride, module.padding, module.dilation, groups)
                layout = "channels"
            elif isinstance(module, nn.Flatten):
                if layout == "channels":
                    k = next(iter(params.values())).shape[0]
                    h, layout = h.reshape(len(h), k, -1).transpose(0, 1), "stacked"
                else:
                    h = h.flatten(2) if layout == "stacked" else h.flatten(1)
            elif isinstance(module, nn.Linear):
                assert weight is not None
                k, out = weight.shape[0], weight.shape[1]
                if layout == "shared" and h.ndim == 2:
                    flat = weight.reshape(k * out, -1).t()
                    y = torch.addmm(bias.reshape(-1), h, flat) if bias is not None else h @ flat
                    h, layout = y.view(len(h), k, out).transpose(0, 1), "stacked"
                elif layout == "stacked" and h.ndim == 3:
                    w = weight.transpose(1, 2)
                    h = torch.baddbmm(bias.unsqueeze(1), h, w) if bias is not None else torch.bmm(h, w)
                else:
                    raise _NotStackable("Linear on an input that is not (B, F) or (K, B, F)")
            elif isinstance(module, POOLS) and layout == "stacked":
                raise _NotStackable("pooling after Flatten")
            else:
                h = module(h)
        if layout != "stacked":
            raise _NotStackable("the output is not one (B, C) per student")
        return h

    return forward


def vmap_forward(template: nn.Module) -> Forward:
    """The general batched forward: ``functional_call`` on a parameter-less copy, vmapped over
    the stacked parameters with the input shared."""
    base = copy.deepcopy(template).to("meta")
    base.train()

    def single(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    return vmap(single, in_dims=(0, None), randomness="error")


# -- loss ------------------------------------------------------------------------------------


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    # z - logsumexp: the same values as log_softmax, and much faster for a short last dimension
    return z - z.logsumexp(-1, keepdim=True)


@dataclass(frozen=True)
class LossSettings:
    """Each student's T, alpha and label smoothing, as ``(K, 1, 1)`` columns made once per group
    (building small tensors every step would cost more than the arithmetic they feed)."""

    temperatures: tuple[float, ...]
    alphas: tuple[float, ...]
    label_smoothing: tuple[float, ...]
    cache_temperature: float
    temp: torch.Tensor
    scale: torch.Tensor  # T_cache / T: stored z / T_cache to z / T
    alpha: torch.Tensor
    soft_weight: torch.Tensor  # alpha T^2, the soft term's weight in the loss
    eps: torch.Tensor
    soft_on: torch.Tensor  # alpha > 0: the student learns from the teacher
    hard_on: torch.Tensor  # alpha < 1: the student learns from the labels

    @staticmethod
    def make(temperatures: Sequence[float], alphas: Sequence[float], label_smoothing: Sequence[float],
             cache_temperature: float, like: torch.Tensor) -> LossSettings:
        def col(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)

        return LossSettings(
            tuple(temperatures), tuple(alphas), tuple(label_smoothing), cache_temperature,
            temp=col(temperatures), scale=col([cache_temperature / t for t in temperatures]), alpha=col(alphas),
            soft_weight=col([a * t * t for a, t in zip(alphas, temperatures)]), eps=col(label_smoothing),
            soft_on=col(alphas) > 0, hard_on=col(alphas) < 1,
        )


def stacked_loss(logits: torch.Tensor, soft: torch.Tensor | None, labels: torch.Tensor,
                 settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-student :func:`~softcache.student.loss.distillation_loss` of ``logits`` ``(K, B, C)`` and its
    gradient with respect to the logits, in closed form.

    Soft term ``alpha T^2 KL(p_t || softmax(z/T))`` over the batch has gradient
    ``alpha T (softmax(z/T) - p_t) / B``; the hard term, cross-entropy with label smoothing
    ``eps`` over the ``n`` rows with a known label, has ``(softmax(z) - q) / n`` with
    ``q = (1 - eps) onehot(y) + eps / C``. As in the single-student loss, a term whose weight is
    zero contributes nothing and the hard term is dropped when no label in the batch is known.

    Students are isolated: a term is selected per student (``torch.where``), never multiplied by
    a zero weight, so a NaN in one student's term (0 * NaN is NaN) cannot reach another student's
    loss or gradient, and each student's row is computed as it would be in a group of one.
    """
    k, b, c = logits.shape
    loss = logits.new_zeros(k)
    grad = torch.zeros_like(logits)
    if any(a > 0 for a in settings.alphas):
        if soft is None:
            raise ValueError("alpha > 0 needs teacher soft labels")
        log_teacher = _log_softmax(soft.to(logits.dtype).unsqueeze(0) * settings.scale)
        p_teacher = log_teacher.exp()
        log_student = _log_softmax(logits / settings.temp)
        kl = (p_teacher * (log_teacher - log_student)).sum((1, 2)) / b
        loss = loss + torch.where(settings.soft_on.view(k), settings.soft_weight.view(k) * kl, 0.0)
        grad = grad + torch.where(settings.soft_on, (settings.alpha * settings.temp / b) * (log_student.exp() - p_teacher),
                                  0.0)
    known = labels >= 0
    n_known = int(known.sum())
    if any(a < 1 for a in settings.alphas) and n_known:
        log_p = _log_softmax(logits)
        mask = known.to(logits.dtype).view(1, b, 1)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), c).to(logits.dtype).unsqueeze(0)
        target = ((1 - settings.eps) * onehot + settings.eps / c) * mask
        ce = -(target * log_p).sum((1, 2)) / n_known
        loss = loss + torch.where(settings.hard_on.view(k), (1 - settings.alpha.view(k)) * ce, 0.0)
        grad = grad + torch.where(settings.hard_on, ((1 - settings.alpha) / n_known) * (log_p.exp() * mask - target), 0.0)
    return loss, grad


# -- optimizer -------------------------------------------------------------------------------


class StackedAdam:
    """``torch.optim.Adam`` (L2 weight decay, no amsgrad) over one flat buffer holding every
    parameter of K students, with a learning rate and weight decay per student; the arithmetic
    follows torch's single-tensor Adam. One buffer means one set of update operations per step,
    whatever the number of parameter tensors. ``student[i]`` says which student element ``i``
    belongs to; learning rate and weight decay are expanded to one value per element once."""

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor, student: torch.Tensor, lrs: Sequence[float],
                 weight_decays: Sequence[float], betas: tuple[float, float], eps: float):
        self.flat, self.grad, self.betas, self.eps = flat, grad, betas, eps
        self.lr = torch.tensor(list(lrs), dtype=flat.dtype, device=flat.device)[student]
        self.step_count = 0
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self._decay = None if not any(weight_decays) else torch.tensor(
            list(weight_decays), dtype=flat.dtype, device=flat.device)[student]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.step_count
        bias2_sqrt = (1 - beta2**self.step_count) ** 0.5
        p, grad = self.flat, self.grad
        if self._decay is not None:
            grad = grad + p * self._decay
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        # torch rounds lr / bias1 once; this rounds lr and 1 / bias1: a difference of an ulp
        p.add_(self.exp_avg.mul(self.lr).mul_(-1 / bias1).div_(denom))


def _adam_settings(optimizer: torch.optim.Optimizer) -> tuple[float, float, tuple[float, float], float] | None:
    """(lr, weight_decay, betas, eps) of a plain Adam with one parameter group, else None."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    if g.get("amsgrad") or g.get("maximize") or g.get("decoupled_weight_decay") or isinstance(g["lr"], torch.Tensor):
        return None
    return float(g["lr"]), float(g["weight_decay"]), (float(g["betas"][0]), float(g["betas"][1])), float(g["eps"])


# -- the group -------------------------------------------------------------------------------


class StudentGroup:
    """K students of one architecture stepped together; ``step`` has :class:`StudentRun`'s signature."""

    def __init__(self, runs: Sequence[StudentRun]):
        self.runs = list(runs)
        k = len(self.runs)
        models = [r.model for r in self.runs]
        named = [dict(m.named_parameters()) for m in models]
        self.names = list(named[0])
        self.shapes = [named[0][n].shape for n in self.names]
        sizes = [k * named[0][n].numel() for n in self.names]
        self.blocks = [slice(a, a + n) for a, n in zip(itertools.accumulate([0, *sizes[:-1]]), sizes)]
        # parameter i of all K students is block i of one flat buffer, laid out (K, *shape): each
        # stacked parameter is a contiguous view, and so is each student's own parameter, so every
        # student's module keeps working on its current weights
        self.flat = torch.cat([torch.stack([params[n].detach() for params in named]).reshape(-1) for n in self.names])
        self.grad = torch.zeros_like(self.flat)
        self._stacked: dict[str, torch.Tensor] = {}
        for name, block, shape in zip(self.names, self.blocks, self.shapes):
            for j, params in enumerate(named):
                params[name].data = self.flat[block].view(k, *shape)[j]
            # a leaf whose gradient accumulates in place into its block of ``self.grad``
            leaf = self.flat[block].view(k, *shape).requires_grad_(True)
            leaf.grad = self.grad[block].view(k, *shape)
            self._stacked[name] = leaf
        student = torch.cat([torch.arange(k, device=self.flat.device).repeat_interleave(n // k) for n in sizes])
        settings = [_adam_settings(r.optimizer) for r in self.runs]
        _, _, betas, eps = settings[0]  # type: ignore[misc]
        self.optimizer = StackedAdam(self.flat, self.grad, student, [s[0] for s in settings],  # type: ignore[index]
                                     [s[1] for s in settings], betas, eps)  # type: ignore[index]
        self._import_state()
        self._loss: LossSettings | None = None
        self._template = models[0]
        self._forward: Forward | None = None
        self.mode = "pending"  # "sequential-layers" | "vmap" | "one-by-one" after the first step

    def stacked_params(self) -> dict[str, torch.Tensor]:
        """Each parameter of the K students as one ``(K, *shape)`` leaf tensor (views of the buffer)."""
        return self._stacked

    def _student_view(self, buffer: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Parameter ``i`` of student ``j`` inside a flat buffer laid out like ``self.flat``."""
        return buffer[self.blocks[i]].view(len(self.runs), *self.shapes[i])[j]

    def _import_state(self) -> None:
        """Carry over Adam moments from earlier training, so regrouping never resets them."""
        states = [[r.optimizer.state.get(p) for p in r.model.parameters()] for r in self.runs]
        present = [s for per_run in states for s in per_run if s]
        if not present:
            return
        steps = {int(s["step"]) for s in present}
        if len(present) != sum(len(p) for p in states) or len(steps) != 1:
            raise ValueError("students of a group must have taken the same number of steps")
        self.optimizer.step_count = steps.pop()
        for j, per_run in enumerate(states):
            for i, state in enumerate(per_run):
                self._student_view(self.optimizer.exp_avg, i, j).copy_(state["exp_avg"])
                self._student_view(self.optimizer.exp_avg_sq, i, j).copy_(state["exp_avg_sq"])

    def export_state(self) -> None:
        """Write the Adam moments back into each student's own optimizer (after a pass)."""
        if self.mode == "one-by-one" or self.optimizer.step_count == 0:
            return
        for j, run in enumerate(self.runs):
            for i, p in enumerate(run.model.parameters()):
                run.optimizer.state[p] = {
                    "step": torch.tensor(float(self.optimizer.step_count)),
                    "exp_avg": self._student_view(self.optimizer.exp_avg, i, j).clone(),
                    "exp_avg_sq": self._student_view(self.optimizer.exp_avg_sq, i, j).clone(),
                }

    def _choose_forward(self, x: torch.Tensor) -> None:
        """Pick the fastest forward that reproduces each student's own output on this batch."""
        probe = x[: min(len(x), 8)]
        with torch.no_grad():
            expected = torch.stack([r.model(probe) for r in self.runs])
            for mode, make in (("sequential-layers", sequential_forward), ("vmap", vmap_forward)):
                try:
                    forward = make(self._template)
                    if forward is not None and torch.allclose(forward(self.stacked_params(), probe), expected,
                                                              rtol=1e-4, atol=1e-5):
                        self._forward, self.mode = forward, mode
                        return
                except Exception:  # noqa: BLE001 - any failure means this path does not apply
                    continue
        self.mode = "one-by-one"

    def step(self, batch: Batch, soft: torch.Tensor | None, cache_temperature: float) -> None:
        start = time.perf_counter()
        if self.mode == "pending":
            self._choose_forward(batch.inputs)
        if self._forward is None:
            for run in self.runs:
                run.step(batch, soft, cache_temperature)
            return
        logits = self._forward(self.stacked_params(), batch.inputs)
        if self._loss is None or self._loss.cache_temperature != cache_temperature:
            cfgs = [r.config for r in self.runs]
            self._loss = LossSettings.make([c.temperature for c in cfgs], [c.alpha for c in cfgs],
                                           [c.label_smoothing for c in cfgs], cache_temperature, logits)
        loss, grad = stacked_loss(logits.detach(), soft, batch.labels, self._loss)
        self.grad.zero_()
        logits.backward(grad)
        self.optimizer.step()
        share = (time.perf_counter() - start) / len(self.runs)
        for run, value in zip(self.runs, loss.unbind()):
            run.losses.append(value)
            run.seconds += share


def stackable(run: StudentRun) -> bool:
    """A student can join a group: plain Adam, no buffers, every parameter trained."""
    params = list(run.model.parameters())
    return (_adam_settings(run.optimizer) is not None and not any(True for _ in run.model.buffers())
            and bool(params) and all(p.requires_grad for p in params)
            and len(run.optimizer.param_groups[0]["params"]) == len(params))


def plan_groups(runs: Sequence[StudentRun]) -> list[StudentRun | StudentGroup]:
    """Students sharing a SPEC (and device, Adam betas and eps) become one group, a lone one a
    group of one (so its arithmetic is the same as in any larger group); students that cannot be
    stacked step alone. Order follows the first member of each."""
    buckets: dict[tuple[object, ...], list[StudentRun]] = {}
    order: list[tuple[object, ...] | StudentRun] = []
    for run in runs:
        if not stackable(run):
            order.append(run)
            continue
        _, _, betas, eps = _adam_settings(run.optimizer)  # type: ignore[misc]
        device = next(run.model.parameters()).device
        key = (str(run.config.spec), str(device), betas, eps)
        if key not in buckets:
            buckets[key] = []
            order.append(key)
        buckets[key].append(run)
    steppers: list[StudentRun | StudentGroup] = []
    for item in order:
        if isinstance(item, tuple):
            members = buckets[item]
            steppers.append(StudentGroup(members))
        else:
            steppers.append(item)
    return steppers


@contextlib.contextmanager
def grouped(runs: Sequence[StudentRun], enabled: bool = True) -> Iterator[list[StudentRun | StudentGroup]]:
    """What a training pass steps on each batch: groups of stacked students and lone students.

    On exit each grouped student's optimizer receives its Adam state, so a later pass, grouped
    or not, continues exactly where this one stopped.
    """
    steppers = plan_groups(runs) if enabled else list(runs)
    try:
        yield steppers
    finally:
        for s in steppers:
            if isinstance(s, StudentGroup):
                s.export_state()
