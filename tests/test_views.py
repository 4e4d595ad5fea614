"""Multi-view caches: the student must get, bit for bit, the view the teacher labelled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from softcache import augment as A
from softcache import views as V
from softcache.teacher.build import build
from softcache._cli.main import main
from softcache.demo import EVAL_SPEC
from softcache.config import TrainConfig
from softcache.digits import LabelledTensors, load
from softcache.errors import UsageError
from softcache.student.loaders import MemoryLoader
from softcache.cache.manifest import Spec
from softcache.models import tiny_cnn
from softcache.cache.layout import VIEW_PARAMS
from softcache.cache.store import open_cache
from softcache.student.train import train
from softcache.cache.check import validate

ROWS = 300
CHAIN = "softcache.augment:compose,crop=0.6,flip=0.5,shift=1,cutmix=1.0"


class Recorder(nn.Module):
    """A teacher that remembers every input it was shown."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_cnn()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def _subset() -> LabelledTensors:
    data = load("train")
    return LabelledTensors(data.inputs[:ROWS], data.labels[:ROWS], data.classes, {"rows": ROWS})


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("spec", [CHAIN, "softcache.augment:compose,shift=2,mixup=0.4"])
def test_student_sees_exactly_the_view_the_teacher_labelled(tmp_path, spec):
    views = 3
    teacher = Recorder()
    cache = build(teacher, _subset(), str(tmp_path / "c.zarr"), views=views, augment=spec, view_seed=5,
                  batch_size=50, chunk_rows=64, dtype="float32", progress=False)
    labelled = torch.cat(teacher.seen)[-ROWS * views:].reshape(ROWS, views, 1, 8, 8)
    raw = torch.from_numpy(np.asarray(load("train").inputs[:ROWS]))
    assert not torch.equal(labelled[:, 0], raw)  # the views really are augmented
    assert not torch.equal(labelled[:, 0], labelled[:, 1])  # and differ from each other

    replay = V.cache_replay(cache, raw)
    soft = torch.from_numpy(cache.train.soft_labels(view=None))
    loader = MemoryLoader(raw, soft, torch.from_numpy(cache.train.labels()), batch_size=64, shuffle_seed=3,
                          replay=replay)
    shown = 0
    for epoch in range(views):
        for batch in loader.epoch(epoch):
            view = (batch.rows + epoch) % views
            assert torch.equal(batch.inputs, labelled[batch.rows, view])
            assert torch.equal(batch.soft, soft[batch.rows, view])
            shown += len(batch.rows)
    assert shown == ROWS * views


def test_manifest_records_how_to_replay_and_the_cache_validates(tmp_path):
    url = str(tmp_path / "c.zarr")
    build(Recorder(), _subset(), url, eval_data=EVAL_SPEC, views=4, augment=CHAIN, view_seed=1, chunk_rows=128,
          dtype="float32", progress=False)  # float32: an untrained teacher's near-ties survive for the deep check
    cache = open_cache(url)
    v = cache.manifest.views
    assert (v.count, v.replay, v.augment, v.seed) == (4, "params", Spec.parse(CHAIN), 1)
    assert v.param_names == V.load_augmentation(CHAIN).param_names
    assert cache.train.array(VIEW_PARAMS).shape == (ROWS, 4, len(v.param_names))
    assert cache.train.array("soft_labels").shape[1] == 4
    assert cache.eval.array("soft_labels").shape[1] == 1  # the eval split is the clean input only
    assert VIEW_PARAMS not in cache.eval.group
    result = validate(url, deep=True)
    assert result["valid"], result["errors"]


def test_view_seed_keys_the_cache(tmp_path):
    keys, params = [], []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        c = build(Recorder(), _subset(), str(tmp_path / name), views=2, augment="softcache.augment:shift",
                  view_seed=seed, progress=False)
        keys.append(c.manifest.cache_key)
        params.append(np.asarray(c.train.array(VIEW_PARAMS)[:]))
    assert keys[0] == keys[1] and np.array_equal(params[0], params[1])
    assert keys[0] != keys[2] and not np.array_equal(params[0], params[2])


def test_training_on_a_multi_view_cache_runs_and_reports_accuracy(tmp_path, teacher_path):
    cache = build(str(teacher_path), "softcache.digits:load,split=train", str(tmp_path / "c.zarr"),
                  eval_data=EVAL_SPEC, views=2, augment="softcache.augment:compose,shift=1", progress=False)
    board = train(cache, ["softcache.models:tiny_cnn"], config=TrainConfig(epochs=4), progress=False).leaderboard
    assert board["test_accuracy"][0] > 0.5


def test_non_replayable_augmentation_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"torch\.nn:Dropout .*cannot be replayed"):
        build(Recorder(), _subset(), str(tmp_path / "c.zarr"), views=2, augment="torch.nn:Dropout", progress=False)
    code = main(["build", "--teacher", "softcache.models:tiny_cnn", "--data", "softcache.digits:load",
                 "--out", str(tmp_path / "d.zarr"), "--views", "2", "--augment", "torch.nn:Dropout,p=0.3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("softcache: error: augmentation torch.nn:Dropout,p=0.3 (Dropout) cannot be replayed")
    assert not (tmp_path / "c.zarr").exists() or not any((tmp_path / "c.zarr").iterdir())


def test_views_without_augmentation_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--views 3 needs --augment"):
        build(Recorder(), _subset(), str(tmp_path / "c.zarr"), views=3, progress=False)


class DrawsItsOwnRandomness(A.Shift):
    def apply(self, inputs, params, partners=None):
        return super().apply(inputs, params + torch.randint(-1, 2, params.shape).float())


def test_apply_that_is_not_a_function_of_its_parameters_is_refused():
    aug = DrawsItsOwnRandomness(1)
    x = torch.rand(64, 1, 8, 8)
    p = torch.from_numpy(aug.sample(64, _rng(), population=64, shape=(1, 8, 8)))
    with pytest.raises(UsageError, match="cannot be replayed: apply"):
        V.check_deterministic(aug, "custom", x, p, None)
    V.check_deterministic(A.Shift(1), "shift", x, p, None)  # the honest one passes


def test_shift_moves_pixels_and_fills():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = A.Shift(1, fill=-1).apply(x, torch.tensor([[1.0, -1.0]]))  # right 1, up 1
    expected = torch.full_like(x, -1)
    expected[..., :3, 1:] = x[..., 1:, :3]
    assert torch.equal(out, expected)


def test_flip_follows_its_parameter():
    x = torch.rand(2, 1, 8, 8)
    out = A.HorizontalFlip().apply(x, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_crop_full_box_is_identity_and_half_box_zooms_the_left_half():
    cols = torch.arange(8, dtype=torch.float32).expand(1, 1, 8, 8).clone()
    crop = A.RandomResizedCrop()
    assert torch.allclose(crop.apply(cols, torch.tensor([[1.0, 1.0, 0.0, 0.0]])), cols, atol=1e-5)
    left = crop.apply(cols, torch.tensor([[0.5, 1.0, -0.5, 0.0]]))[0, 0, 0]
    assert left.min() >= 0 and left.max() <= 3.5 + 1e-5  # only the left half of the columns
    assert bool((left[1:] > left[:-1]).all())  # still increasing left to right, stretched


def test_mixup_and_cutmix_store_partner_and_factor():
    x, pool = torch.rand(256, 1, 8, 8), torch.rand(50, 1, 8, 8)
    fetch = lambda rows: pool[rows]  # noqa: E731
    mix = A.Mixup(0.4)
    p = torch.from_numpy(mix.sample(256, _rng(), population=50, shape=(1, 8, 8)))
    assert p[:, 0].min() >= 0 and p[:, 0].max() < 50 and bool((p[:, 0] == p[:, 0].round()).all())
    assert p[:, 1].min() >= 0.5 and p[:, 1].max() <= 1
    lam = p[:, 1].reshape(-1, 1, 1, 1)
    assert torch.equal(mix.apply(x, p, fetch), lam * x + (1 - lam) * pool[p[:, 0].long()])

    cut = A.CutMix(1.0)
    p = torch.from_numpy(cut.sample(256, _rng(1), population=50, shape=(1, 8, 8)))
    out = cut.apply(x, p, fetch)
    partner = pool[p[:, 0].long()]
    for i in (0, 1, 2):
        t, l, b, r = (int(v) for v in p[i, 1:])
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[t:b, l:r] = True
        assert torch.equal(out[i, 0][inside], partner[i, 0][inside])
        assert torch.equal(out[i, 0][~inside], x[i, 0][~inside])
    area = (p[:, 3] - p[:, 1]) * (p[:, 4] - p[:, 2]) / 64
    assert area.max() <= 0.5 + 1 / 64 and area.max() > 0


def test_views_do_not_depend_on_the_rest_of_the_batch():
    aug = V.load_augmentation(CHAIN)
    x = torch.rand(200, 1, 8, 8)
    p = torch.from_numpy(aug.sample(200, _rng(2), population=200, shape=(1, 8, 8)))
    fetch = lambda rows: x[rows]  # noqa: E731
    full = aug.apply(x, p, fetch)
    pick = torch.randperm(200)[:37]
    assert torch.equal(aug.apply(x[pick], p[pick], fetch), full[pick])


def test_sampling_is_seeded():
    aug = V.load_augmentation(CHAIN)
    a, b = (aug.sample(10, _rng(7), population=10, shape=(1, 8, 8)) for _ in range(2))
    c = aug.sample(10, _rng(8), population=10, shape=(1, 8, 8))
    assert a.dtype == np.float32 and a.shape == (10, len(aug.param_names))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_build_with_views(tmp_path, teacher_path, capsys):
    out = tmp_path / "c.zarr"
    code = main(["build", "--teacher", str(teacher_path), "--data", "softcache.digits:load,split=test",
                 "--out", str(out), "--views", "3", "--augment", "softcache.augment:compose,shift=1,mixup=0.4",
                 "--view-seed", "2", "--json", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["rows"] == 597
    assert open_cache(str(out)).manifest.views.count == 3
