"""Stacked or one by one: the group keeps the faster way, measured on copies, and the choice never
changes which steps a student takes nor depends on its partners. Timings are injected, so every
assertion here is deterministic."""

from __future__ import annotations

import torch

from softcache.config import StudentConfig
from softcache.student._choice import ONE_BY_ONE, PROBE_STUDENTS, STACKED, PathChooser, probe
from softcache.student.loaders import MemoryLoader
from softcache.student.run import cached_soft, fit, make_run
from softcache.student.stacked import StudentGroup

SMALL = "softcache.models:mlp,hidden=16"
LARGE = "softcache.models:mlp,hidden=96,num_classes=100"


def fixed_costs(stacked: float, one_by_one: float, calls: list[str] | None = None):
    """A timing source that runs the step and reports a fixed cost per way."""
    def timing(path: str, step) -> float:
        step()
        if calls is not None:
            calls.append(path)
        return stacked if path == STACKED else one_by_one
    return timing


def loader(classes: int, n: int = 96) -> MemoryLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    soft = torch.randn(n, 1, classes, generator=gen)
    return MemoryLoader(x, soft, y, batch_size=32, shuffle_seed=0)


def runs_for(spec: str, classes: int, k: int, data: MemoryLoader) -> list:
    return [make_run(StudentConfig(spec=spec, seed=s, alpha=0.7, lr=0.01 * (1 + s % 2)), classes, data.inputs[:2],
                     torch.device("cpu")) for s in range(k)]


def weights(run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


def test_the_probe_warms_up_each_way_then_times_alternated_pairs():
    steps: list[str] = []
    timed: list[str] = []
    path, ratio = probe(lambda: steps.append(STACKED), lambda: steps.append(ONE_BY_ONE),
                        fixed_costs(2.0, 1.0, timed), rounds=3)
    assert steps == [STACKED, ONE_BY_ONE, STACKED, ONE_BY_ONE, ONE_BY_ONE, STACKED, STACKED, ONE_BY_ONE]
    assert timed == steps[2:]  # the warm-up steps are not timed
    assert (path, ratio) == (ONE_BY_ONE, 2.0)
    assert probe(lambda: None, lambda: None, fixed_costs(1.0, 1.0))[0] == STACKED  # a tie keeps stacking


def test_a_small_model_measured_faster_stacked_stays_stacked():
    data = loader(10)
    chooser = PathChooser(fixed_costs(stacked=1.0, one_by_one=5.0))
    runs = runs_for(SMALL, 10, 3, data)
    group = StudentGroup(runs, chooser)
    batch = next(iter(data.epoch(0)))
    group.step(batch, batch.soft, 4.0)
    assert group.mode == "sequential-layers"
    assert [d[0] for d in chooser.decided.values()] == [STACKED]


def test_a_large_model_measured_slower_stacked_steps_one_by_one_with_no_extra_step():
    data = loader(100)
    chooser = PathChooser(fixed_costs(stacked=1.4, one_by_one=1.0))
    runs = runs_for(LARGE, 100, 3, data)
    group = StudentGroup(runs, chooser)
    before = [weights(r) for r in runs]
    batch = next(iter(data.epoch(0)))
    group._choose_forward(batch.inputs)
    assert group._choose_path(batch, batch.soft, 4.0) == ONE_BY_ONE
    # the probe stepped copies: the real students are untouched and have taken no step
    for run, w in zip(runs, before):
        assert all(torch.equal(a, b) for a, b in zip(weights(run), w))
        assert run.losses == [] and not run.optimizer.state
    group = StudentGroup(runs, chooser)
    for b in data.epoch(0):
        group.step(b, b.soft, 4.0)
    group.export_state()
    assert group.mode == "one-by-one"
    for run in runs:  # exactly one optimizer step per batch
        assert len(run.losses) == len(data)
        assert all(int(s["step"]) == len(data) for s in run.optimizer.state.values())


def test_the_choice_is_made_once_per_architecture_so_partners_never_change_a_result():
    data = loader(100)
    calls: list[str] = []
    chooser = PathChooser(fixed_costs(stacked=1.4, one_by_one=1.0, calls=calls))
    results = []
    for k in (1, 3):
        runs = runs_for(LARGE, 100, k, data)
        group = StudentGroup(runs, chooser)
        for epoch in range(2):
            for b in data.epoch(epoch):
                group.step(b, b.soft, 4.0)
        group.export_state()
        assert group.mode == "one-by-one"
        results.append((runs[0].loss_history(), weights(runs[0])))
    assert len(calls) == 6  # one probe (3 alternated pairs), whatever the number of students: K is not in it
    assert len(chooser.decided) == 1 and PROBE_STUDENTS == 2
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_a_group_stepping_one_by_one_ends_where_ungrouped_training_does():
    data = loader(100)
    chooser = PathChooser(fixed_costs(stacked=1.4, one_by_one=1.0))
    grouped, alone = runs_for(LARGE, 100, 2, data), runs_for(LARGE, 100, 2, data)
    group = StudentGroup(grouped, chooser)
    for epoch in range(2):
        for b in data.epoch(epoch):
            group.step(b, b.soft, 4.0)
    group.export_state()
    fit(alone, data, 2, cached_soft, 4.0, group=False)
    for g, a in zip(grouped, alone):
        assert g.loss_history() == a.loss_history()
        assert all(torch.equal(p, q) for p, q in zip(weights(g), weights(a)))


def test_a_group_stepping_one_by_one_leaves_each_students_parameters_where_they_are():
    data = loader(100)
    runs = runs_for(LARGE, 100, 3, data)
    where = [[p.data_ptr() for p in r.model.parameters()] for r in runs]
    group = StudentGroup(runs, PathChooser(fixed_costs(stacked=1.4, one_by_one=1.0)))
    for b in data.epoch(0):
        group.step(b, b.soft, 4.0)
    assert group.mode == "one-by-one" and group.flat is None  # nothing was stacked, nor copied
    assert [[p.data_ptr() for p in r.model.parameters()] for r in runs] == where
    stacked = StudentGroup(runs_for(LARGE, 100, 3, data), PathChooser(fixed_costs(stacked=1.0, one_by_one=1.4)))
    batch = next(iter(data.epoch(0)))
    stacked.step(batch, batch.soft, 4.0)
    assert stacked.flat is not None  # the students' parameters now live in one buffer
    assert all(p.untyped_storage().data_ptr() == stacked.flat.untyped_storage().data_ptr()
               for r in stacked.runs for p in r.model.parameters())
