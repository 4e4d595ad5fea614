"""Grouped training: K students stacked into one vectorized model end where each would alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softcache.config import StudentConfig, TrainConfig
from softcache.student._choice import STACKED, PathChooser
from softcache.student.stacked import StudentGroup, plan_groups
from softcache.student.loaders import MemoryLoader
from softcache.student.loss import LossSettings, distillation_loss, rescale, stacked_loss
from softcache.student.run import cached_soft, fit, make_run
from softcache.student.train import train

MLP = "softcache.models:mlp,hidden=16"
CNN = "softcache.models:tiny_cnn,channels=4"
RESIDUAL = "softcache.models:residual_mlp_for_tests"
N = 192


class ResidualMLP(nn.Module):
    """Not an nn.Sequential: only the vmap path can stack it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return self.b(torch.tanh(self.a(h))) + h[:, :10]


@pytest.fixture(autouse=True)
def residual_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    import softcache.models as models

    monkeypatch.setattr(models, "residual_mlp_for_tests", ResidualMLP, raising=False)


@pytest.fixture(scope="module")
def batches() -> MemoryLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    y[::5] = -1  # some rows without a known label
    soft = torch.randn(N, 1, 10, generator=gen) * 2
    return MemoryLoader(x, soft, y, batch_size=32, shuffle_seed=0)


def sweep(spec: str) -> list[StudentConfig]:
    """Different T, alpha (including 0 and 1), lr, weight decay, label smoothing and seed."""
    rows = [(4.0, 0.9, 0.01, 0.0, 0.0, 0), (2.0, 0.5, 0.003, 0.0, 0.1, 1), (3.0, 0.0, 0.02, 1e-3, 0.0, 2),
            (8.0, 1.0, 0.01, 0.0, 0.0, 3)]
    return [StudentConfig(spec=spec, temperature=t, alpha=a, lr=lr, weight_decay=wd, label_smoothing=ls, seed=s)
            for t, a, lr, wd, ls, s in rows]


def runs_for(configs: list[StudentConfig], loader: MemoryLoader) -> list:
    return [make_run(c, 10, loader.inputs[:2], torch.device("cpu")) for c in configs]


def max_gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("spec,mode", [(MLP, "sequential-layers"), (CNN, "sequential-layers"), (RESIDUAL, "vmap")])
def test_a_student_trained_in_a_group_ends_with_its_weights_trained_alone(batches, spec, mode):
    configs = sweep(spec)
    grouped = runs_for(configs, batches)
    steppers = plan_groups(grouped)
    assert len(steppers) == 1 and isinstance(steppers[0], StudentGroup)
    batch = next(iter(batches.epoch(0)))
    steppers[0]._choose_forward(batch.inputs)
    assert steppers[0].mode == mode
    fit(grouped, batches, 3, cached_soft, cache_temperature=4.0, group=True)
    alone = runs_for(configs, batches)
    for run in alone:
        fit([run], batches, 3, cached_soft, cache_temperature=4.0, group=False)
    initial = runs_for(configs, batches)
    for g, a, i in zip(grouped, alone, initial):
        assert max_gap(g.model, a.model) < 1e-4
        assert max_gap(g.model, i.model) > 1e-2  # it did train
        assert g.loss_history() == pytest.approx(a.loss_history(), rel=1e-4, abs=1e-5)


# the forward is chosen whatever the timings; stacked vs one by one is tests/test_grouping_choice.py's subject
STACKING_MEASURED_FASTER = PathChooser(lambda path, step: (step(), 1.0 if path == STACKED else 2.0)[1])


def test_the_group_picks_its_forward_on_the_first_batch(batches):
    for spec, mode in [(MLP, "sequential-layers"), (CNN, "sequential-layers"), (RESIDUAL, "vmap")]:
        group = StudentGroup(runs_for(sweep(spec)[:2], batches), STACKING_MEASURED_FASTER)
        batch = next(iter(batches.epoch(0)))
        group.step(batch, batch.soft, 4.0)
        assert group.mode == mode


def test_adam_state_carries_over_between_grouped_and_single_passes(batches):
    configs = sweep(MLP)[:2]
    mixed = runs_for(configs, batches)
    fit(mixed, batches, 1, cached_soft, 4.0, group=True)
    fit(mixed, batches, 1, cached_soft, 4.0, group=False)  # continues from the exported moments
    fit(mixed, batches, 1, cached_soft, 4.0, group=True)  # and back: imported again
    alone = runs_for(configs, batches)
    for run in alone:
        for _ in range(3):  # each fit call starts again at epoch 0, as above
            fit([run], batches, 1, cached_soft, 4.0, group=False)
    for m, a in zip(mixed, alone):
        assert max_gap(m.model, a.model) < 1e-4


def test_students_step_with_fused_adam_and_learn_what_the_for_loop_adam_learns(batches):
    """The fused kernel is the default on CPU; it rounds in another order, so the weights agree
    with torch's for-loop Adam to float round-off, step after step, and a grouped pass hands
    its moments back in the form the fused kernel reads (its step count beside the weights)."""
    configs = sweep(MLP)
    fused = runs_for(configs, batches)
    assert all(r.optimizer.param_groups[0]["fused"] for r in fused)
    plain = runs_for(configs, batches)
    for r in plain:
        r.optimizer = torch.optim.Adam(r.model.parameters(), lr=r.config.lr, weight_decay=r.config.weight_decay)
    fit(fused, batches, 1, cached_soft, 4.0, group=True)  # stacked, then the state exported to fused Adam
    fit(fused, batches, 2, cached_soft, 4.0, group=False)
    for r in plain:
        fit([r], batches, 1, cached_soft, 4.0, group=False)
        fit([r], batches, 2, cached_soft, 4.0, group=False)
    initial = runs_for(configs, batches)
    for f, p, i in zip(fused, plain, initial):
        assert max_gap(f.model, p.model) < 1e-4
        assert max_gap(f.model, i.model) > 1e-2  # it did train
        state = f.optimizer.state[next(f.model.parameters())]
        assert state["step"].device == next(f.model.parameters()).device and int(state["step"]) == 3 * 6


def test_closed_form_loss_and_gradient_match_autograd():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 16, 10, generator=gen)
    soft = torch.randn(16, 10, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    labels[:4] = -1
    temps, alphas, smooth = [4.0, 2.0, 1.0], [0.9, 0.0, 1.0], [0.0, 0.2, 0.1]
    loss, grad = stacked_loss(logits, soft, labels, LossSettings.make(temps, alphas, smooth, 4.0, logits))
    for k in range(3):
        z = logits[k].clone().requires_grad_(True)
        ref = distillation_loss(z, rescale(soft, 4.0, temps[k]), labels, temperature=temps[k], alpha=alphas[k],
                                label_smoothing=smooth[k])
        ref.backward()
        assert float(loss[k]) == pytest.approx(float(ref.detach()), rel=1e-5)
        assert torch.allclose(grad[k], z.grad, atol=1e-6)
    # hard labels only, all unknown: nothing to learn from, as in the single-student loss
    hard_only = LossSettings.make(temps, [0.0] * 3, smooth, 4.0, logits)
    loss, grad = stacked_loss(logits, None, torch.full((16,), -1), hard_only)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0
    with pytest.raises(ValueError):
        stacked_loss(logits, None, labels, LossSettings.make(temps, alphas, smooth, 4.0, logits))


def test_plan_groups_stacks_shared_architectures_only(batches):
    configs = sweep(MLP)[:3] + sweep(CNN)[:1] + [StudentConfig(spec="softcache.models:teacher_cnn,width=4")] * 2
    steppers = plan_groups(runs_for(configs, batches))
    kinds = [(type(s).__name__, len(s.runs) if isinstance(s, StudentGroup) else 1) for s in steppers]
    # the MLPs form one group, the lone CNN a group of one; the BatchNorm students (buffers) step alone
    assert kinds == [("StudentGroup", 3), ("StudentGroup", 1), ("StudentRun", 1), ("StudentRun", 1)]


def test_unstackable_layers_fall_back_to_one_by_one(batches, monkeypatch):
    import softcache.models as models

    monkeypatch.setattr(models, "dropout_mlp", lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5),
                                                                     nn.Linear(8, 10)), raising=False)
    configs = [StudentConfig(spec="softcache.models:dropout_mlp", seed=s) for s in range(2)]
    runs = runs_for(configs, batches)
    before = [p.detach().clone() for p in runs[0].model.parameters()]
    group = StudentGroup(runs)
    batch = next(iter(batches.epoch(0)))
    group.step(batch, batch.soft, 4.0)
    assert group.mode == "one-by-one"  # vmap refuses the random layer, so each student steps alone
    assert any(not torch.equal(a, b) for a, b in zip(before, runs[0].model.parameters()))
    fit(runs, batches, 1, cached_soft, 4.0, group=True)
    assert all(len(r.losses) == 1 + len(batches) for r in runs)


def test_train_leaderboard_is_the_same_grouped_or_not(batches, tmp_path):
    from softcache.teacher.build import build
    from softcache.digits import LabelledTensors

    data = LabelledTensors(batches.inputs, batches.labels.clamp(min=0), None, {"rows": N})
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    cache = build(teacher, data, str(tmp_path / "c.zarr"), chunk_rows=64, progress=False)
    configs = sweep(MLP)
    boards = [train(cache, configs, data=data, config=TrainConfig(epochs=2, group=g), progress=False).leaderboard
              for g in (True, False)]
    a, b = (board.sort("student") for board in boards)
    assert a["student"].to_list() == b["student"].to_list()
    assert a["final_loss"].to_list() == pytest.approx(b["final_loss"].to_list(), rel=1e-4)
