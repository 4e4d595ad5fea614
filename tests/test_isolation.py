"""Students of one pass are isolated: a student's result does not depend on who shares its pass,
and one student's NaN never reaches another.

What holds, and why (CPU; measured with MKL and oneDNN on x86):

- Any two passes in which the student's architecture has at least 2 students: bitwise equal
  losses, weights and accuracy. Every operation computes student k's values from student k's
  data only (its columns of one matrix product, its group of a grouped convolution, its slice of
  a batched product, per-student reductions in the loss, element-wise Adam), and the kernels sum
  in the same order whatever the number of students.
- Alone (a group of one, through the same code): bitwise too for Linear/element-wise models (the
  MLP, the vmap path). With convolutions, within float32 round-off: oneDNN runs the backward of a
  convolution with ``groups=1`` through another kernel than a grouped one, which sums the weight
  and input gradients in another order (the forward is bitwise equal; the gradients differ by a
  few ulps). Measured on digits: per-epoch mean losses within 5e-7 relative over 60 epochs, the
  same test accuracy; asserted here: 1e-6 relative over 3 epochs, the same accuracy.
- Ungrouped (``--no-group``: autograd and torch's Adam, another order of the same sums): within
  float32 round-off as well (1.3e-6 relative over 60 epochs for the MLP); ``test_group.py``.

On a GPU, cuBLAS picks its kernel by matrix shape (and may split the sum), so passes of different
sizes can differ by round-off there too.
"""

from __future__ import annotations

import pytest
import torch

from softcache.config import StudentConfig
from softcache.student.loss import LossSettings, stacked_loss
from softcache.student.stacked import StudentGroup, plan_groups
from softcache.student.loaders import MemoryLoader
from softcache.cache.store import Cache
from softcache.student.loaders import open_loader
from softcache.student.run import StudentRun, cached_soft, fit, make_run
from softcache.weights import predict

MLP = "softcache.models:mlp,hidden=32"
CNN = "softcache.models:tiny_cnn,channels=4"
EPOCHS = 3


def mixed(spec: str, count: int) -> list[StudentConfig]:
    """Partners that differ in every per-student setting (T, alpha 0 and 1, lr, decay, smoothing, seed)."""
    grid = [(2.0, 0.5, 0.003, 0.0, 0.1), (8.0, 0.0, 0.02, 1e-3, 0.0), (1.0, 1.0, 0.01, 0.0, 0.0),
            (3.0, 0.3, 0.005, 0.0, 0.05), (6.0, 0.7, 0.002, 1e-4, 0.0), (4.0, 0.9, 0.03, 0.0, 0.0)]
    return [StudentConfig(spec=spec, temperature=t, alpha=a, lr=lr, weight_decay=wd, label_smoothing=ls, seed=10 + i)
            for i, (t, a, lr, wd, ls) in enumerate(grid[i % len(grid)] for i in range(count))]


def runs_for(configs: list[StudentConfig], probe: torch.Tensor) -> list[StudentRun]:
    return [make_run(c, 10, probe, torch.device("cpu")) for c in configs]


def stacked_as(runs: list[StudentRun]) -> str:
    """How ``fit`` will step these students (planned on fresh copies): one group, and its forward."""
    steppers = plan_groups(runs_for([r.config for r in runs], torch.zeros(2, 1, 8, 8)))  # fresh copies
    assert len(steppers) == 1 and isinstance(steppers[0], StudentGroup)
    steppers[0]._choose_forward(torch.rand(8, 1, 8, 8))
    return steppers[0].mode


def epoch_losses(run: StudentRun) -> torch.Tensor:
    return torch.tensor(run.loss_history()).view(EPOCHS, -1).mean(1)


@pytest.fixture(scope="module")
def setting(cache: Cache) -> tuple[MemoryLoader, torch.Tensor, torch.Tensor]:
    """The digits cache in RAM, and its held-out split for accuracy."""
    from softcache.data import materialize
    from softcache.digits import load

    inputs, _ = materialize(load("train"))
    loader = open_loader(cache, inputs=inputs, batch_size=64, mode="memory")
    x_test, y_test = materialize(load("test"))
    return loader, x_test, y_test  # type: ignore[return-value]


@pytest.mark.parametrize("spec", [MLP, CNN])
def test_a_student_trains_the_same_alone_in_a_pass_of_2_and_of_12(setting, spec: str) -> None:
    loader, x_test, y_test = setting
    student = StudentConfig(spec=spec, temperature=4.0, alpha=0.9, lr=0.01, seed=0)
    passes = {"alone": [student], "pass of 2": [student, *mixed(spec, 1)], "pass of 12": [student, *mixed(spec, 11)],
              "pass of 12, last": [*mixed(spec, 11), student]}
    results = {}
    for name, configs in passes.items():
        runs = runs_for(configs, loader.inputs[:2])
        assert stacked_as(runs) == "sequential-layers"  # all stacked, the lone student too
        fit(runs, loader, EPOCHS, cached_soft, 4.0, group=True)
        run = next(r for r in runs if r.config == student)
        accuracy = float((predict(run.model, x_test) == y_test).float().mean())
        results[name] = (epoch_losses(run), [p.detach().clone() for p in run.model.parameters()], accuracy)
    losses, weights, accuracy = results["pass of 2"]
    assert accuracy > 0.5 and bool(losses[-1] < losses[0])  # it did learn
    for name in ("pass of 12", "pass of 12, last"):
        other_losses, other_weights, other_accuracy = results[name]
        assert torch.equal(other_losses, losses), (name, (other_losses - losses).abs().max())
        assert all(torch.equal(a, b) for a, b in zip(other_weights, weights)), name
        assert other_accuracy == accuracy, name
    alone_losses, alone_weights, alone_accuracy = results["alone"]
    if spec == MLP:
        assert torch.equal(alone_losses, losses)
    assert torch.allclose(alone_losses, losses, rtol=1e-6, atol=0), (alone_losses - losses).abs().max()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(alone_weights, weights))
    assert alone_accuracy == accuracy


def test_the_soft_term_of_a_hard_label_student_is_never_computed_into_its_loss() -> None:
    """0 * NaN is NaN: a hard-label student's row is selected, not multiplied by a zero weight."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 10, generator=gen)
    soft = torch.randn(16, 10, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    poisoned = soft.clone()
    poisoned[4, 2], poisoned[9, 0] = float("nan"), float("inf")
    settings = LossSettings.make([4.0, 2.0, 3.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.1], 4.0, logits)
    clean_loss, clean_grad = stacked_loss(logits, soft, labels, settings)
    loss, grad = stacked_loss(logits, poisoned, labels, settings)
    for k in (0, 2):  # the hard-label students: bit for bit as with clean soft labels
        assert torch.equal(loss[k], clean_loss[k]) and torch.equal(grad[k], clean_grad[k])
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).any()  # the distilled one reads them


def poisoned_loader(loader: MemoryLoader) -> MemoryLoader:
    soft = loader.soft.clone()  # type: ignore[union-attr]
    soft[5, 0, 3], soft[700, 0, 0] = float("nan"), float("inf")
    return MemoryLoader(loader.inputs, soft, loader.labels, batch_size=64)


def test_nan_soft_labels_leave_the_hard_label_student_of_the_pass_untouched(setting) -> None:
    """The garbage checks of ``train`` refuse such a cache; the group must not rely on them."""
    loader = poisoned_loader(setting[0])
    hard = StudentConfig(spec=MLP, alpha=0.0, seed=3)
    together = runs_for([hard, StudentConfig(spec=MLP, alpha=0.9, seed=4)], loader.inputs[:2])
    fit(together, loader, 1, cached_soft, 4.0, group=True)
    alone = runs_for([hard], loader.inputs[:2])
    fit(alone, setting[0], 1, cached_soft, 4.0, group=True)  # with clean soft labels, which it never reads
    assert any(torch.isnan(p).any() for p in together[1].model.parameters())
    assert together[0].loss_history() == alone[0].loss_history()
    assert all(torch.equal(a, b) for a, b in zip(together[0].model.parameters(), alone[0].model.parameters()))


@pytest.mark.parametrize("group", [True, False])
def test_a_diverging_student_does_not_change_its_partners(setting, group: bool) -> None:
    loader = setting[0]
    steady = StudentConfig(spec=MLP, alpha=0.5, lr=0.01, seed=1)
    wild = StudentConfig(spec=MLP, alpha=0.5, lr=1e30, seed=2)  # its weights overflow within a few steps
    together = runs_for([steady, wild], loader.inputs[:2])
    fit(together, loader, 1, cached_soft, 4.0, group=group)
    alone = runs_for([steady], loader.inputs[:2])
    fit(alone, loader, 1, cached_soft, 4.0, group=group)
    assert any(torch.tensor(together[1].loss_history()).isnan())
    assert together[0].loss_history() == alone[0].loss_history()
    assert all(torch.equal(a, b) for a, b in zip(together[0].model.parameters(), alone[0].model.parameters()))


def test_the_vmap_path_is_isolated_too(setting, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that is not a plain ``nn.Sequential`` is stacked through vmap."""
    import softcache.models as models
    from test_group import ResidualMLP

    monkeypatch.setattr(models, "residual_for_isolation", ResidualMLP, raising=False)
    spec = "softcache.models:residual_for_isolation"
    loader = setting[0]
    student = StudentConfig(spec=spec, alpha=0.9, seed=0)
    histories = []
    for configs in ([student], [student, *mixed(spec, 11)]):
        runs = runs_for(configs, loader.inputs[:2])
        assert stacked_as(runs) == "vmap"
        fit(runs, loader, 1, cached_soft, 4.0, group=True)
        histories.append(runs[0].loss_history())
    assert histories[0] == histories[1]
