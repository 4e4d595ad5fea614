"""A user's own dataset through the CLI: items softcache cannot use are refused in one line naming
the dataset SPEC and what the item is; numpy float64 inputs are cast to float32, the dtype of the
models and of the views, so they label exactly as the same data given as float32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softcache.cache.store import open_cache

MODULE = "softcache_user_items"
SOURCE = '''
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

ROWS = 24


class Items(Dataset):
    """Rows of shape (1, 4, 4), drawn as numpy float64 (numpy's default), served in one form."""

    def __init__(self, form):
        rng = np.random.default_rng(0)
        self.x, self.y, self.form = rng.random((ROWS, 1, 4, 4)), rng.integers(0, 3, ROWS), form

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        if self.form == "dict":
            return {"image": self.x[i], "label": int(self.y[i])}
        x = self.x[i].astype(np.float32) if self.form == "float32" else self.x[i]
        return x, int(self.y[i])


def dict_items():
    return Items("dict")


def float64_items():
    return Items("float64")


def float32_items():
    return Items("float32")


def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user")
    (root / f"{MODULE}.py").write_text(SOURCE)
    return root


def build(user_dir: Path, data: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``softcache build`` in a fresh process, the user's module found through PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(user_dir), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "softcache", "build", "--teacher", f"{MODULE}:teacher", "--data", f"{MODULE}:{data}",
           "--out", str(out), "--device", "cpu", "--quiet"]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, cwd=user_dir, capture_output=True, text=True,
                          timeout=300)


def test_dict_items_are_one_line_naming_the_spec_the_type_and_the_keys(user_dir: Path, tmp_path: Path) -> None:
    proc = build(user_dir, "dict_items", tmp_path / "dict.zarr")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in (f"{MODULE}:dict_items", "dict", "'image'", "'label'"):
        assert needle in lines[0], lines[0]
    assert "Could not infer dtype" not in proc.stderr
    assert not (tmp_path / "dict.zarr").exists()  # refused before anything was written


def test_float64_items_are_cast_to_float32(user_dir: Path, tmp_path: Path) -> None:
    caches = {}
    for data in ("float64_items", "float32_items"):
        proc = build(user_dir, data, tmp_path / f"{data}.zarr")
        assert proc.returncode == 0, proc.stderr
        caches[data] = open_cache(str(tmp_path / f"{data}.zarr"))
    wide, narrow = caches["float64_items"], caches["float32_items"]
    assert wide.manifest.source.fingerprint == narrow.manifest.source.fingerprint
    assert np.array_equal(wide.train.soft_labels(view=None), narrow.train.soft_labels(view=None))


def test_tensor_datasets_are_materialized_as_they_are_and_agree_with_item_by_item() -> None:
    """A dataset holding its rows as tensors is given to training without a copy; the result is
    what reading it item by item gives (float64 cast to float32, labels -1 where there are none)."""
    import torch
    from torch.utils.data import TensorDataset

    from softcache.data import LabelledTensors, materialize

    x = torch.rand(50, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(50) % 7
    tensors = LabelledTensors(x.float(), y, None, {"rows": 50})
    fast_x, fast_y = materialize(tensors)
    assert fast_x.data_ptr() == tensors.inputs.data_ptr() and fast_y.data_ptr() == y.data_ptr()
    slow_x, slow_y = materialize(TensorDataset(x.float(), y), batch_size=16)  # item by item
    assert torch.equal(fast_x, slow_x) and torch.equal(fast_y, slow_y)
    as64, _ = materialize(LabelledTensors(x, y, None, {}))
    assert as64.dtype == torch.float32 and torch.equal(as64, x.float())

    class Unlabelled(torch.utils.data.Dataset):
        inputs = x.float()

        def __len__(self) -> int:
            return len(self.inputs)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.inputs[i]

    assert materialize(Unlabelled())[1].tolist() == [-1] * 50


@pytest.mark.parametrize("labelled", [True, False])
def test_batches_of_a_row_range_are_the_batches_of_its_indices(labelled: bool) -> None:
    """A tensor dataset's row range is cut in one call; the batches are those of the same rows
    given one by one: the same values, float64 inputs as float32, unknown labels as -1, the
    last batch short."""
    import torch

    from softcache.data import LabelledTensors, batches

    x = torch.randn(50, 3, dtype=torch.float64)
    data: object = LabelledTensors(x, torch.arange(50), None, {"rows": 50})
    if not labelled:
        class Unlabelled(torch.utils.data.Dataset):  # tensors without labels
            inputs, labels = x, None

            def __len__(self) -> int:
                return len(x)

        data = Unlabelled()
    ranged = list(batches(data, range(7, 30), 8))
    listed = list(batches(data, list(range(7, 30)), 8))
    assert [len(b[0]) for b in ranged] == [8, 8, 7]
    for (xr, yr), (xl, yl) in zip(ranged, listed, strict=True):
        assert xr.dtype == torch.float32 and torch.equal(xr, xl) and torch.equal(yr, yl)
    assert torch.equal(torch.cat([y for _, y in ranged]), torch.arange(7, 30) if labelled else torch.full((23,), -1))
    assert list(batches(data, range(0), 8)) == [] and list(batches(data, range(30, 7), 8)) == []


def test_batches_of_a_range_past_the_labels_keep_every_input_row() -> None:
    """Labels shorter than the range (a dataset whose two tensors disagree): every input batch is
    still given, with the labels there are, as batch by batch."""
    import torch

    from softcache.data import LabelledTensors, batches

    data = LabelledTensors(torch.randn(20, 3), torch.arange(20), None, {"rows": 20})
    data.labels = torch.arange(12)
    got = list(batches(data, range(0, 20), 8))
    assert [len(x) for x, _ in got] == [8, 8, 4] and [len(y) for _, y in got] == [8, 4, 0]
