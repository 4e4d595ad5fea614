"""validate catches what a reader must not trust; SoftLabelDataset pairs rows only after checking."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from softcache.digits import load
from softcache.errors import CacheError
from softcache.student.loaders import SoftLabelDataset
from softcache.cache.manifest import SCHEMA_VERSION
from softcache.cache.store import Cache, open_cache
from softcache.cache.check import validate


@pytest.fixture()
def copy(cache: Cache, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(cache.url, target)
    return target


def test_clean_cache_is_valid(copy: Path) -> None:
    result = validate(str(copy), deep=True)
    assert result["valid"], result["errors"]


def test_nan_in_soft_labels_is_reported_with_rows(copy: Path) -> None:
    arr = zarr.open_array(str(copy / "soft_labels"), mode="r+")
    block = arr[256:512]
    block[3, 0, 2] = np.nan
    arr[256:512] = block
    result = validate(str(copy))
    assert not result["valid"]
    assert any("NaN/Inf" in e and "259" in e for e in result["errors"]), result["errors"]


def test_newer_schema_and_broken_manifest_are_invalid(copy: Path) -> None:
    group = zarr.open_group(str(copy), mode="r+")
    manifest = dict(group.attrs["softcache"])
    group.attrs["softcache"] = manifest | {"schema_version": SCHEMA_VERSION + 1}
    assert "newer" in validate(str(copy))["errors"][0]
    group.attrs["softcache"] = manifest | {"temperature": "hot"}
    assert "temperature" in validate(str(copy))["errors"][0]


def test_missing_shard_flag_and_wrong_shape(copy: Path) -> None:
    zarr.open_array(str(copy / "shard_done"), mode="r+")[2] = 0
    group = zarr.open_group(str(copy), mode="r+")
    group.create_array("labels", shape=(5,), dtype="int64", overwrite=True)
    errors = validate(str(copy))["errors"]
    assert any("shards not done: [2]" in e for e in errors)
    assert any("'labels' has shape (5,)" in e for e in errors)


def test_soft_label_dataset_pairs_rows_through_a_dataloader(cache: Cache) -> None:
    ds = SoftLabelDataset(cache.train, load("train"))
    x, soft, y = next(iter(DataLoader(ds, batch_size=32, shuffle=False)))
    assert x.shape == (32, 1, 8, 8) and soft.shape == (32, 10)
    torch.testing.assert_close(soft, torch.from_numpy(cache.train.soft_labels(slice(0, 32))))
    torch.testing.assert_close(y, load("train").labels[:32])
    with pytest.raises(CacheError, match="samples"):
        SoftLabelDataset(cache.train, load("test"))
    with pytest.raises(CacheError, match="fingerprint"):
        SoftLabelDataset(cache.train, load("train", seed=1))


def test_cache_opened_read_only_is_not_modified(cache: Cache) -> None:
    before = {p: p.stat().st_mtime_ns for p in Path(cache.url).rglob("*") if p.is_file()}
    opened = open_cache(cache.url)
    opened.train.soft_labels()
    validate(cache.url, deep=True)
    after = {p: p.stat().st_mtime_ns for p in Path(cache.url).rglob("*") if p.is_file()}
    assert before == after


def test_unfinished_eval_shard_is_reported(copy: Path) -> None:
    zarr.open_array(str(copy / "eval" / "shard_done"), mode="r+")[0] = 0
    assert any(e.startswith("eval/shards not done: [0]") for e in validate(str(copy))["errors"])


def test_an_ordinary_cache_validates_quietly_and_inspect_says_one_fixed_view(cache: Cache) -> None:
    from softcache.cache.summary import summarize

    assert validate(cache.url)["warnings"] == []
    info = summarize(cache)
    assert info["views"] == 1 and info["fixed_view"] is True


def test_inspect_reports_the_teachers_held_out_accuracy_from_the_eval_split(cache: Cache) -> None:
    from softcache.cache.summary import summarize

    assert cache.eval is not None
    expected = float((cache.eval.predictions() == cache.eval.labels()).mean())  # stored predictions vs labels
    info = summarize(cache)
    assert info["teacher_eval_accuracy"] == pytest.approx(expected)
    assert 0.5 < info["teacher_eval_accuracy"] <= 1.0 and info["teacher_train_accuracy"] is not None
