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
:func:`sequential_forward`); the loss is :func:`softcache.student.loss.stacked_loss`,
:func:`~softcache.student.loss.distillation_loss` per student with its gradient written out in
closed form (with a compact teacher, top-k or sampled counts, its soft term is
:func:`~softcache.student._stacked_compact.compact_soft_term`, broadcast over the students the
same way); the update is ``torch.optim.Adam``'s, per student. Each student's ``nn.Module``
keeps working: its parameters are views of its row of the buffer, so it always holds its
current weights.

A group falls back to stepping its students one by one when the architecture cannot be stacked:
modules with buffers (BatchNorm running statistics), random layers such as dropout (vmap refuses
them) or optimizers other than plain Adam; and when stacking is measured slower than stepping
them one by one, as it is once each student's matrices are large (:mod:`softcache.student._choice`
times both ways once per architecture on throw-away copies, so no student takes a probe step and
every pass of a process steps an architecture the same way).

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
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call, vmap

from softcache.config import StudentConfig
from softcache.student._adam import StackedAdam, adam_settings
from softcache.student._batch import Batch, Soft, TopK
from softcache.student._choice import DEFAULT_CHOOSER, ONE_BY_ONE, PROBE_STUDENTS, STACKED, PathChooser
from softcache.student._stacked_compact import CompactSettings, compact_stacked_loss
from softcache.student.loss import LossSettings, stacked_loss

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Identity,
)


class Student(Protocol):
    """What a group needs of each student it stacks (:class:`softcache.student.run.Student`):
    stated as a protocol so that stacking depends on no training loop."""

    config: StudentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[torch.Tensor]
    seconds: float

    def step(self, batch: Batch, soft: Soft | None, cache_temperature: float) -> None: ...


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


# -- the group -------------------------------------------------------------------------------


class StudentGroup:
    """K students of one architecture stepped together; ``step`` has a :class:`Student`'s signature.

    The flat buffer, its stacked views and the stacked Adam are built on the first stacked step
    (:meth:`_stack`): a group that steps one by one (its architecture cannot be stacked, or
    stacking is measured slower) never copies its students' weights, so it costs what the same
    students stepped ungrouped cost, and computes the same: each student's parameters stay its own.
    """

    def __init__(self, runs: Sequence[Student], chooser: PathChooser = DEFAULT_CHOOSER):
        self.runs = list(runs)
        first = dict(self.runs[0].model.named_parameters())
        self.names = list(first)
        self.shapes = [first[n].shape for n in self.names]
        self.device = first[self.names[0]].device
        self.flat: torch.Tensor | None = None  # the K students' parameters, once stacked
        self.grad: torch.Tensor | None = None
        self.optimizer: StackedAdam | None = None
        self.blocks: list[slice] = []
        self._stacked: dict[str, torch.Tensor] = {}
        self._state_in = "runs"  # where the current Adam state lives: "group" (once stacked) or "runs"
        self._chooser = chooser
        self._loss: LossSettings | None = None
        self._compact: CompactSettings | None = None
        self._template = self.runs[0].model
        self._forward: Forward | None = None
        self.mode = "pending"  # "sequential-layers" | "vmap" | "one-by-one" after the first step

    def _stack(self) -> None:
        """Move the students' parameters into one flat buffer and their Adam state into one
        :class:`StackedAdam` (once, before the first stacked step)."""
        if self.flat is not None:
            return
        k = len(self.runs)
        named = [dict(r.model.named_parameters()) for r in self.runs]
        sizes = [k * named[0][n].numel() for n in self.names]
        self.blocks = [slice(a, a + n) for a, n in zip(itertools.accumulate([0, *sizes[:-1]]), sizes)]
        # parameter i of all K students is block i of one flat buffer, laid out (K, *shape): each
        # stacked parameter is a contiguous view, and so is each student's own parameter, so every
        # student's module keeps working on its current weights
        self.flat = torch.cat([torch.stack([params[n].detach() for params in named]).reshape(-1) for n in self.names])
        self.grad = torch.zeros_like(self.flat)
        for name, block, shape in zip(self.names, self.blocks, self.shapes):
            for j, params in enumerate(named):
                params[name].data = self.flat[block].view(k, *shape)[j]
            # a leaf whose gradient accumulates in place into its block of ``self.grad``
            leaf = self.flat[block].view(k, *shape).requires_grad_(True)
            leaf.grad = self.grad[block].view(k, *shape)
            self._stacked[name] = leaf
        student = torch.cat([torch.arange(k, device=self.flat.device).repeat_interleave(n // k) for n in sizes])
        settings = [adam_settings(r.optimizer) for r in self.runs]
        _, _, betas, eps = settings[0]  # type: ignore[misc]
        self.optimizer = StackedAdam(self.flat, self.grad, student, [s[0] for s in settings],  # type: ignore[index]
                                     [s[1] for s in settings], betas, eps)  # type: ignore[index]
        self._import_state()
        self._state_in = "group"

    def stacked_params(self) -> dict[str, torch.Tensor]:
        """Each parameter of the K students as one ``(K, *shape)`` leaf tensor (views of the buffer)."""
        self._stack()
        return self._stacked

    def _student_view(self, buffer: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Parameter ``i`` of student ``j`` inside a flat buffer laid out like ``self.flat``."""
        return buffer[self.blocks[i]].view(len(self.runs), *self.shapes[i])[j]

    def _state_to_group(self) -> None:
        """Take the Adam state back from the students' optimizers before a stacked step."""
        if self.flat is None:
            self._stack()  # imports the state
        if self._state_in == "group":
            return
        self._import_state()
        self._state_in = "group"

    def _import_state(self) -> None:
        """Carry over Adam moments from earlier training, so regrouping never resets them."""
        assert self.optimizer is not None
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
        if self._state_in == "group" and self.optimizer is not None and self.optimizer.step_count > 0:
            self._state_to_runs()

    def _state_to_runs(self) -> None:
        """Hand the Adam state to the students' own optimizers before they step one by one."""
        if self._state_in == "runs":
            return
        self._state_in = "runs"
        if self.optimizer is None or self.optimizer.step_count == 0:
            return
        for j, run in enumerate(self.runs):
            fused = bool(run.optimizer.param_groups[0].get("fused"))  # its step count lives beside the weights
            for i, p in enumerate(run.model.parameters()):
                run.optimizer.state[p] = {
                    "step": torch.tensor(float(self.optimizer.step_count), device=p.device if fused else None),
                    "exp_avg": self._student_view(self.optimizer.exp_avg, i, j).clone(),
                    "exp_avg_sq": self._student_view(self.optimizer.exp_avg_sq, i, j).clone(),
                }

    def _choose_forward(self, x: torch.Tensor) -> None:
        """Pick the fastest forward that reproduces each student's own output on this batch."""
        probe = x[: min(len(x), 8)]
        with torch.no_grad():
            expected = torch.stack([r.model(probe) for r in self.runs])
            # the students' current weights stacked as the buffer will hold them (a copy: a group
            # that ends up stepping one by one never moves its students' parameters)
            named = [dict(r.model.named_parameters()) for r in self.runs]
            params = self._stacked if self.flat is not None else {
                name: torch.stack([p[name].detach() for p in named]) for name in self.names}
            for mode, make in (("sequential-layers", sequential_forward), ("vmap", vmap_forward)):
                try:
                    forward = make(self._template)
                    if forward is not None and torch.allclose(forward(params, probe), expected,
                                                              rtol=1e-4, atol=1e-5):
                        self._forward, self.mode = forward, mode
                        return
                except Exception:  # noqa: BLE001 - any failure means this path does not apply
                    continue
        self.mode, self._state_in = "one-by-one", "runs"  # the students' optimizers hold the state from here

    def step(self, batch: Batch, soft: Soft | None, cache_temperature: float) -> None:
        """One optimizer step per student on this batch: stacked, or one by one where the
        architecture cannot be stacked or stacking is measured slower (:meth:`_choose_path`)."""
        if self.mode == "pending":
            self._choose_forward(batch.inputs)
            if self._forward is not None and self._choose_path(batch, soft, cache_temperature) == ONE_BY_ONE:
                self._forward, self.mode, self._state_in = None, "one-by-one", "runs"
        if self._forward is None:
            self._step_one_by_one(batch, soft, cache_temperature)
        else:
            self._step_stacked(batch, soft, cache_temperature)

    def _choose_path(self, batch: Batch, soft: Soft | None, cache_temperature: float) -> str:
        """Stacked or one by one for this architecture (:mod:`softcache.student._choice`): timed
        on copies of the first student, the same number of them whatever this group holds."""
        first = self.runs[0]
        key = (first.config.spec_key(), tuple(self.shapes), str(self.device), self.mode,
               tuple(batch.inputs.shape), None if soft is None else
               (type(soft).__name__, *(soft.ids if isinstance(soft, TopK) else soft).shape), torch.get_num_threads())

        def probe_group() -> StudentGroup:
            copies = [copy.deepcopy(first) for _ in range(PROBE_STUDENTS)]
            group = StudentGroup(copies, self._chooser)
            group._forward, group.mode = self._forward, self.mode
            return group

        groups: list[StudentGroup] = []
        device = self.device

        def finish() -> None:  # a CUDA step is done when its kernels are, not when they are queued
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def stacked() -> None:
            groups[:] = groups or [probe_group()]
            groups[0]._state_to_group()
            groups[0]._step_stacked(batch, soft, cache_temperature)
            finish()

        def one_by_one() -> None:
            groups[:] = groups or [probe_group()]
            groups[0]._state_to_runs()
            groups[0]._step_one_by_one(batch, soft, cache_temperature)
            finish()

        try:
            return self._chooser.choose(key, stacked, one_by_one)
        except Exception:  # noqa: BLE001 - a model that cannot be copied keeps the stacked path it had
            return STACKED

    def _step_one_by_one(self, batch: Batch, soft: Soft | None, cache_temperature: float) -> None:
        for run in self.runs:
            run.step(batch, soft, cache_temperature)

    def _step_stacked(self, batch: Batch, soft: Soft | None, cache_temperature: float) -> None:
        start = time.perf_counter()
        assert self._forward is not None
        params = self.stacked_params()
        assert self.grad is not None and self.optimizer is not None
        logits = self._forward(params, batch.inputs)
        if self._loss is None or self._loss.cache_temperature != cache_temperature:
            cfgs = [r.config for r in self.runs]
            self._loss = LossSettings.make([c.temperature for c in cfgs], [c.alpha for c in cfgs],
                                           [c.label_smoothing for c in cfgs], cache_temperature, logits)
            self._compact = CompactSettings.make(cfgs, logits)
        if isinstance(soft, TopK):
            loss, grad = compact_stacked_loss(logits.detach(), soft, batch.labels, self._loss, self._compact)
        else:
            loss, grad = stacked_loss(logits.detach(), soft, batch.labels, self._loss)
        self.grad.zero_()
        logits.backward(grad)
        self.optimizer.step()
        share = (time.perf_counter() - start) / len(self.runs)
        for run, value in zip(self.runs, loss.unbind()):
            run.losses.append(value)
            run.seconds += share


def stackable(run: Student) -> bool:
    """A student can join a group: plain Adam, no buffers, every parameter trained, and the
    cache's own targets (a student that names a temperature approximation, ``retemper``, has
    targets of its own: it steps alone)."""
    params = list(run.model.parameters())
    return (adam_settings(run.optimizer) is not None and not any(True for _ in run.model.buffers())
            and run.config.retemper == "refuse"
            and bool(params) and all(p.requires_grad for p in params)
            and len(run.optimizer.param_groups[0]["params"]) == len(params))


def plan_groups(runs: Sequence[Student]) -> list[Student | StudentGroup]:
    """Students sharing a SPEC or model function (and parameter shapes, device, Adam betas and
    eps) become one group, a lone one a group of one (so its arithmetic is the same as in any
    larger group); students that cannot be stacked step alone. Order follows the first member of
    each."""
    buckets: dict[tuple[object, ...], list[Student]] = {}
    order: list[tuple[object, ...] | Student] = []
    for run in runs:
        if not stackable(run):
            order.append(run)
            continue
        _, _, betas, eps = adam_settings(run.optimizer)  # type: ignore[misc]
        device = next(run.model.parameters()).device
        shapes = tuple((name, tuple(p.shape)) for name, p in run.model.named_parameters())
        key = (run.config.spec_key(), shapes, str(device), betas, eps)
        if key not in buckets:
            buckets[key] = []
            order.append(key)
        buckets[key].append(run)
    steppers: list[Student | StudentGroup] = []
    for item in order:
        if isinstance(item, tuple):
            members = buckets[item]
            steppers.append(StudentGroup(members))
        else:
            steppers.append(item)
    return steppers


@contextlib.contextmanager
def grouped(runs: Sequence[Student], enabled: bool = True) -> Iterator[list[Student | StudentGroup]]:
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
