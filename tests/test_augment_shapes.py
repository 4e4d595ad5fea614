"""Augmentations know their input's shape: (C, L) sequences and (C, H, W) images, nothing else.

On sequences every built-in acts along L; a view never silently becomes all fill or the input
itself, the stored parameters replay the labelled view bit for bit, and a shape an operation
cannot transform is refused with one line naming the operation and the shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from seqkit import load as load_sequences
from softcache import augment as A
from softcache import views as V
from softcache.teacher.build import build
from softcache._cli.main import main
from softcache.errors import CacheError, UsageError

ROWS, LENGTH, VIEWS = 240, 40, 4
CHAIN = "softcache.augment:compose,crop=0.6,flip=0.5,shift=2,mixup=0.4,cutmix=1.0"


class Recorder(nn.Module):
    """A linear teacher over the flattened input that remembers every input it was shown."""

    def __init__(self, features: int = LENGTH) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(features, 10))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _params(aug: A.Op, n: int, shape: tuple[int, ...], seed: int = 0, population: int | None = None) -> torch.Tensor:
    return torch.from_numpy(aug.sample(n, _rng(seed), population=population or n, shape=shape))


def _column(aug: A.Op, params: torch.Tensor, name: str) -> torch.Tensor:
    return params[..., aug.param_names.index(name)]


def _build_sequences(tmp_path, spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Build a real cache of 1-D inputs; return raw inputs, the labelled views, the stored
    parameters and the cache."""
    teacher = Recorder()
    cache = build(teacher, load_sequences(ROWS, LENGTH), str(tmp_path / "seq.zarr"), views=VIEWS, augment=spec,
                  view_seed=3, batch_size=50, chunk_rows=64, dtype="float32", progress=False)
    labelled = torch.cat(teacher.seen)[-ROWS * VIEWS:].reshape(ROWS, VIEWS, 1, LENGTH)
    raw = load_sequences(ROWS, LENGTH).inputs
    params = torch.from_numpy(np.asarray(cache.train.array("view_params")[:]))
    return raw, labelled, params, cache


def _changed(views: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """(rows, views) True where the view differs from its input anywhere."""
    return (views != raw[:, None]).flatten(2).any(-1)


@pytest.mark.parametrize("spec", [
    "softcache.augment:random_resized_crop,scale_min=0.5",
    "softcache.augment:hflip",
    "softcache.augment:shift,max_shift=3",
    "softcache.augment:mixup",
    "softcache.augment:cutmix",
    CHAIN,
])
def test_sequence_views_are_real_views_and_replay_exactly(tmp_path, spec):
    raw, labelled, params, cache = _build_sequences(tmp_path, spec)
    aug = V.load_augmentation(spec)
    assert params.shape == (ROWS, VIEWS, len(aug.param_names))

    # no view is all zeros (no input is) and the views really are augmented
    assert bool((raw.flatten(1).abs().amax(1) > 0).all())
    assert bool((labelled.flatten(2).abs().amax(-1) > 0).all()), "a view became all zeros"
    changed = _changed(labelled, raw)
    if "hflip" in spec:
        flipped = _column(aug, params, "flip.flip") > 0.5
        assert bool(flipped.any()) and bool((~flipped).any())
        assert torch.equal(changed, flipped)  # flipped views differ, the others are the input
        assert torch.equal(labelled[flipped], raw[:, None].expand_as(labelled)[flipped].flip(-1))
    elif "shift" in spec and "compose" not in spec:
        dx, dy = _column(aug, params, "shift.dx"), _column(aug, params, "shift.dy")
        assert bool((dy == 0).all()) and bool((dx != 0).any())  # along L only
        assert torch.equal(changed, dx != 0)
    elif "mixup" in spec and "compose" not in spec:
        partner = _column(aug, params, "mixup.partner").long()
        lam = _column(aug, params, "mixup.lam")
        # every view mixed with another row differs (Beta(0.4, 0.4) puts a draw at exactly 1.0 now
        # and then: that view is the input by definition, not by accident)
        mixed = (partner != torch.arange(ROWS)[:, None]) & (lam < 1)
        assert bool(mixed.any()) and bool(changed[mixed].all())
    elif "cutmix" in spec and "compose" not in spec:
        left, right = _column(aug, params, "cutmix.left"), _column(aug, params, "cutmix.right")
        assert bool((right - left >= 1).all()) and bool((right - left <= LENGTH // 2).all())
        partner = _column(aug, params, "cutmix.partner").long()
        differs = (raw[partner] != raw[:, None]).flatten(2).any(-1)
        assert bool(changed[differs].all()), "a CutMix view was left untouched"
    else:  # crop (never the full window) and the full chain change every view
        assert bool(changed.all())

    # stage 2 re-creates exactly the view the teacher labelled
    replay = V.cache_replay(cache, raw)
    assert replay is not None
    rows = torch.arange(ROWS)
    for view in range(VIEWS):
        assert torch.equal(replay(rows, torch.full((ROWS,), view)), labelled[:, view])
    pick = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))[:37]
    assert torch.equal(replay(pick, torch.full((37,), 2)), labelled[pick, 2])  # any batch, any order


def test_shift_moves_along_the_length_and_ignores_a_stored_row_offset():
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(1, 2, 10) + 1
    shift = A.Shift(2, fill=-1)
    out = shift.apply(x, torch.tensor([[2.0, 1.0]]))  # right by 2; dy has no meaning on a sequence
    expected = torch.full_like(x, -1)
    expected[..., 2:] = x[..., :-2]
    assert torch.equal(out, expected)  # both channels move together
    left = shift.apply(x, torch.tensor([[-1.0, 0.0]]))
    assert torch.equal(left[..., :-1], x[..., 1:]) and bool((left[..., -1] == -1).all())


def test_crop_resizes_a_segment_back_with_linear_interpolation():
    ramp = torch.arange(LENGTH, dtype=torch.float32).expand(1, 1, LENGTH).clone()
    crop = A.RandomResizedCrop()
    whole = crop.apply(ramp, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(whole, ramp, atol=1e-4)
    half = crop.apply(ramp, torch.tensor([[0.5, 0.3, -0.5, 0.9]]))[0, 0]  # h, cy are ignored on sequences
    steps = half[2:] - half[1:-1]  # the first sample point lies before the first value (border)
    assert torch.allclose(steps, torch.full_like(steps, 0.5), atol=1e-4)  # linear: a stretched ramp
    assert half.min() >= 0 and half.max() <= LENGTH / 2  # only the left half of the sequence

    p = _params(crop, 500, (1, LENGTH))
    w, h, cx, cy = p.T
    assert bool(((w >= 0.6) & (w < 1)).all()) and bool((h == 1).all()) and bool((cy == 0).all())
    assert bool(((cx - w >= -1 - 1e-6) & (cx + w <= 1 + 1e-6)).all())  # the window stays inside


def test_flip_reverses_the_length():
    x = torch.rand(2, 3, LENGTH)
    out = A.HorizontalFlip().apply(x, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_cutmix_pastes_one_contiguous_segment_of_the_partner():
    x, pool = torch.rand(256, 2, LENGTH) + 1, torch.rand(50, 2, LENGTH) - 2  # disjoint ranges
    cut = A.CutMix(1.0)
    p = _params(cut, 256, (2, LENGTH), seed=1, population=50)
    out = cut.apply(x, p, lambda rows: pool[rows])
    inside = (out < 0).all(dim=1)  # (256, L): where the partner shows, in every channel
    assert torch.equal(inside, (out < 0).any(dim=1))
    counts = inside.sum(-1)
    assert bool((counts >= 1).all()) and bool((counts <= LENGTH // 2).all())
    for i in range(256):
        where = inside[i].nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))  # contiguous
        assert (int(p[i, 2]), int(p[i, 4])) == (int(where[0]), int(where[-1]) + 1)
        assert torch.equal(out[i][:, inside[i]], pool[int(p[i, 0])][:, inside[i]])
        assert torch.equal(out[i][:, ~inside[i]], x[i][:, ~inside[i]])


def test_mixup_is_the_same_blend_for_any_shape():
    mix = A.Mixup(0.4)
    for shape in [(1, LENGTH), (3, 8, 8), (LENGTH,)]:
        x, pool = torch.rand(64, *shape), torch.rand(20, *shape)
        p = _params(mix, 64, shape, population=20)
        lam = p[:, 1].reshape(-1, *([1] * len(shape)))
        assert torch.equal(mix.apply(x, p, lambda rows: pool[rows]), lam * x + (1 - lam) * pool[p[:, 0].long()])


@pytest.mark.parametrize("shape", [(1, LENGTH), (3, 8, 8)])
def test_chain_with_mixup_then_cutmix_prepares_partners_through_the_mixup(shape):
    aug = V.load_augmentation(CHAIN)
    x = torch.rand(120, *shape)
    p = _params(aug, 120, shape, seed=4)
    fetch = lambda rows: x[rows]  # noqa: E731
    full = aug.apply(x, p, fetch)
    assert full.shape == x.shape and bool(torch.isfinite(full).all())
    pick = torch.randperm(120, generator=torch.Generator().manual_seed(0))[:29]
    assert torch.equal(aug.apply(x[pick], p[pick], fetch), full[pick])  # a view is a function of its own row


REFUSED = [
    ("softcache.augment:shift", (LENGTH,), "shift"),
    ("softcache.augment:hflip", (LENGTH,), "flip"),
    ("softcache.augment:random_resized_crop", (LENGTH,), "crop"),
    ("softcache.augment:cutmix", (LENGTH,), "cutmix"),
    ("softcache.augment:shift", (1, 2, 8, 8), "shift"),
    ("softcache.augment:compose,flip=0.5,mixup=0.4", (2, 3, 4, 5), "flip"),
    ("softcache.augment:shift,max_shift=3", (1, 3), "shift"),  # every value could move out
    ("softcache.augment:shift", (1, 1, LENGTH), "shift"),  # an image one row high: dy empties it
    ("softcache.augment:cutmix", (1, 1), "cutmix"),
    ("softcache.augment:cutmix", (1, 1, LENGTH), "cutmix"),  # no box fits in one row: a no-op
    ("softcache.augment:mixup", (0, 4), "mixup"),
]


@pytest.mark.parametrize("spec,shape,name", REFUSED)
def test_shapes_an_augmentation_cannot_transform_are_refused_in_one_line(spec, shape, name):
    aug = V.load_augmentation(spec)
    for refuse in (lambda: V.check_input_shape(aug, shape),
                   lambda: aug.sample(4, _rng(), population=4, shape=shape),
                   lambda: V.resolve_views(spec, 2, 0, 4, shape=shape)):
        with pytest.raises(UsageError) as err:
            refuse()
        message = str(err.value)
        assert "\n" not in message and f"augmentation {name}" in message and str(tuple(shape)) in message


@pytest.mark.parametrize("spec", ["softcache.augment:mixup", "softcache.augment:shift,max_shift=2", CHAIN])
def test_accepted_shapes(spec):
    aug = V.load_augmentation(spec)
    for shape in [(1, 3), (4, LENGTH), (1, 8, 8), (3, 5, 7)]:
        V.check_input_shape(aug, shape)
        p = _params(aug, 8, shape)
        assert aug.apply(torch.rand(8, *shape), p, lambda rows: torch.rand(len(rows), *shape)).shape == (8, *shape)


def test_build_refuses_a_shape_the_augmentation_cannot_transform(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"augmentation shift .*shape \(40,\)"):
        build(Recorder(), load_sequences(ROWS, LENGTH, channels=0), str(tmp_path / "c.zarr"), views=2,
              augment="softcache.augment:shift", progress=False)
    code = main(["build", "--teacher", "softcache.models:mlp,in_features=40", "--data", "seqkit:load,channels=0",
                 "--out", str(tmp_path / "d.zarr"), "--views", "2", "--augment", "softcache.augment:cutmix", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("softcache: error: augmentation cutmix") and "(40,)" in err[0]


def test_stored_parameters_that_cannot_be_replayed_are_refused():
    aug = V.load_augmentation("softcache.augment:compose,shift=1,mixup=0.4")
    inputs = torch.rand(30, 1, LENGTH)
    good = torch.from_numpy(aug.sample(60, _rng(), population=30, shape=(1, LENGTH))).reshape(30, 2, -1)
    V.ViewReplay(aug, inputs, good)  # the honest parameters are accepted
    partner = aug.param_names.index("mixup.partner")
    for value, match in [(float("nan"), "NaN/Inf"), (30.0, "partner rows outside"), (-1.0, "partner rows outside"),
                         (2.5, "partner rows outside")]:
        bad = good.clone()
        bad[7, 1, partner] = value
        with pytest.raises(CacheError, match=match):
            V.ViewReplay(aug, inputs, bad)
    bad = good.clone()
    bad[3, 0, 0] = float("inf")
    with pytest.raises(CacheError, match="NaN/Inf"):
        V.ViewReplay(aug, inputs, bad)
