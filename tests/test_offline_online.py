"""Offline distillation from a float32 cache follows the online trajectory step for step."""

from __future__ import annotations

from pathlib import Path

import torch

from softcache.teacher.build import build
from softcache.config import StudentConfig
from softcache.data import materialize
from softcache.digits import load
from softcache.student.loaders import MemoryLoader
from softcache.weights import load_model
from softcache.student.run import cached_soft, fit, make_run, online_soft


def test_cached_equals_live_teacher(teacher_path: Path, tmp_path: Path) -> None:
    cache = build(str(teacher_path), "softcache.digits:load,split=train", str(tmp_path / "f32.zarr"),
                  dtype="float32", temperature=4.0, progress=False)
    x, y = materialize(load("train"))
    soft = torch.from_numpy(cache.train.soft_labels(view=None))
    config = StudentConfig(spec="softcache.models:mlp", temperature=4.0, alpha=0.9, seed=3)

    offline = make_run(config, 10, x[:2], torch.device("cpu"))
    fit([offline], MemoryLoader(x, soft, y, batch_size=64, shuffle_seed=7), 2, cached_soft, cache.temperature)

    teacher = load_model(str(teacher_path))
    online = make_run(config, 10, x[:2], torch.device("cpu"))
    fit([online], MemoryLoader(x, None, y, batch_size=64, shuffle_seed=7), 2, online_soft(teacher, 4.0), 4.0)

    a, b = offline.loss_history(), online.loss_history()
    assert len(a) == len(b) == 2 * 19
    assert max(abs(p - q) for p, q in zip(a, b)) < 1e-5
    assert a[0] != a[-1]  # training actually moved
