"""The fast paths store and serve exactly what the straightforward ones did.

Stage 1 labels a block in the writer thread, beside the teacher's next call: the cache must be
bit for bit the one the labelling-in-the-teacher's-loop build wrote (the reference loop below).
Stage 2's memory loader holds the stored float16 values and widens each batch: its batches must
be the float32 rows of the cache, in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from softcache.cache import layout, store
from softcache.cache.manifest import StorageInfo
from softcache.cache.store import Cache, open_cache
from softcache.data import LabelledTensors
from softcache.errors import CacheError
from softcache.student.loaders import MemoryLoader, open_loader
from softcache.teacher import build as stage1
from softcache.teacher import label

ROWS, FEATURES, CLASSES = 300, 12, 37


def _data() -> LabelledTensors:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, FEATURES, generator=gen) * 3
    y = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    return LabelledTensors(x, y, None, {"name": "speed-paths", "rows": ROWS})


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES)).eval()


def _reference_write_split(group, teacher, blocks, rows, manifest, device, progress, writer=None,  # type: ignore[no-untyped-def]
                           on_done=None, clock=None, store_inputs=None, check=None) -> None:
    """The labelling loop as it was before it moved into the writer thread: every block labelled
    in the teacher's own loop, then handed over as finished arrays."""
    own = writer is None
    if writer is None:
        writer = stage1.split_writer(lambda: group, manifest)
    writer.begin(rows, on_done)
    row = rows.start
    inputs = layout.INPUTS in group if store_inputs is None else store_inputs
    for block in blocks:
        arrays = _reference_label_block(teacher, block, row, manifest.temperature, manifest.storage.dtype)
        if check is not None:
            check()
        if inputs:
            arrays[layout.INPUTS] = block.inputs.to(torch.float32).numpy()
        writer.append(arrays)
        row += len(block.inputs)
        progress.update(len(block.inputs))
    if own:
        writer.close()


@torch.no_grad()
def _reference_label_block(teacher: nn.Module, block: label.RowBlock, first_row: int, temperature: float,
                           dtype: str) -> dict[str, np.ndarray]:
    views = block.views if block.views is not None else block.inputs.unsqueeze(1)
    n, v = views.shape[:2]
    logits = teacher(views.reshape(n * v, *views.shape[2:])).float().cpu()
    label.check_finite(logits.reshape(n, -1), first_row)
    # the statistics through the library's one function for them (checked against a plain
    # log-softmax in tests/test_sequence_cache.py): here only where the labelling runs is tested
    stats = label.row_arrays(logits, temperature, StorageInfo(dtype=dtype))  # type: ignore[arg-type]
    logits = logits.reshape(n, v, -1)
    out = {
        layout.SOFT: (logits / temperature).numpy().astype(dtype),
        layout.INDEX: block.sample_index.astype(np.int64),
        layout.LABELS: block.labels.to(torch.int64).numpy(),
        **{name: values.reshape(n, v) for name, values in stats.items()},
    }
    if block.view_params is not None:
        out[layout.VIEW_PARAMS] = block.view_params.astype(np.float32)
    out.update(block.extra)
    return out


def _build(out: Path, **options: object) -> Cache:
    return stage1.build(_teacher(), _data(), str(out), progress=False, device="cpu", chunk_rows=64, batch_size=48,
                        temperature=3.0, **options)


def _arrays(cache: Cache) -> dict[str, np.ndarray]:
    group = store.open_group(cache.url, "r")
    names = layout.split_arrays(cache.manifest, cache.manifest.layout.rows, store_inputs=cache.train.has_inputs)
    return {name: np.asarray(group[name][...]) for name in names}


@pytest.mark.parametrize("options", [{}, {"store_inputs": True}, {"dtype": "float32"}])
def test_cache_is_bit_identical_to_labelling_in_the_teacher_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 options: dict[str, object]) -> None:
    fast = _build(tmp_path / "fast.zarr", **options)
    monkeypatch.setattr(stage1, "write_split", _reference_write_split)
    reference = _build(tmp_path / "reference.zarr", **options)
    assert fast.complete and reference.complete
    assert fast.manifest.cache_key == reference.manifest.cache_key
    got, want = _arrays(fast), _arrays(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].tobytes() == want[name].tobytes(), name  # bit for bit, NaN-safe
    assert fast.manifest.integrity.content_digest == reference.manifest.integrity.content_digest  # type: ignore[union-attr]


def test_label_block_is_teacher_then_block_arrays() -> None:
    teacher, data = _teacher(), _data()
    block = next(stage1.dataset_blocks(data, range(40, 90), 50))
    whole = label.label_block(teacher, block, 40, 3.0, "float16", torch.device("cpu"))
    want = _reference_label_block(teacher, block, 40, 3.0, "float16")
    assert sorted(whole) == sorted(want)
    for name in want:
        assert whole[name].tobytes() == want[name].tobytes(), name


class _LateNaN(nn.Module):
    """Finite logits except for rows whose first feature is above a threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _teacher()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.where(x[:, :1] > 6.0, torch.full_like(out, float("nan")), out)


def test_nan_found_in_the_writer_thread_still_stops_the_build(tmp_path: Path) -> None:
    data = _data()
    bad = (data.inputs[:, 0] > 6.0).nonzero().flatten().tolist()
    assert bad, "the fixture needs at least one bad row"
    out = tmp_path / "nan.zarr"
    with pytest.raises(CacheError, match=rf"NaN/Inf logits for rows \[{bad[0]}"):
        stage1.build(_LateNaN(), data, str(out), progress=False, device="cpu", chunk_rows=64, batch_size=48)
    assert not open_cache(str(out), allow_incomplete=True).complete


def test_memory_loader_holds_stored_values_and_serves_the_same_float32_batches(tmp_path: Path) -> None:
    cache = _build(tmp_path / "c.zarr")
    data = _data()
    loader = open_loader(cache, inputs=data.inputs, batch_size=32, shuffle_seed=4, mode="memory", labels=data.labels)
    assert isinstance(loader, MemoryLoader) and loader.soft is not None
    assert loader.soft.dtype == torch.float16  # as stored: no float32 copy of the whole cache
    widened = torch.from_numpy(cache.train.soft_labels(view=None))
    before = MemoryLoader(data.inputs, widened, data.labels, batch_size=32, shuffle_seed=4)  # a float32 copy, as it was
    for epoch in range(2):
        got, want = list(loader.epoch(epoch)), list(before.epoch(epoch))
        assert len(got) == len(want) == -(-ROWS // 32)
        for a, b in zip(got, want):
            assert a.soft is not None and a.soft.dtype == torch.float32
            assert torch.equal(a.rows, b.rows) and torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.soft, b.soft) and torch.equal(a.soft, widened[a.rows, 0])


def test_memory_loader_widens_each_view_it_serves() -> None:
    gen = torch.Generator().manual_seed(2)
    soft = (torch.randn(90, 3, 7, generator=gen) * 4).half()
    inputs, labels = torch.randn(90, 5, generator=gen), torch.randint(0, 7, (90,), generator=gen)
    held = MemoryLoader(inputs, soft, labels, batch_size=16, shuffle_seed=1)
    wide = MemoryLoader(inputs, soft.float(), labels, batch_size=16, shuffle_seed=1)
    for epoch in range(3):
        for a, b in zip(held.epoch(epoch), wide.epoch(epoch), strict=True):
            assert a.soft is not None and a.soft.dtype == torch.float32
            assert torch.equal(a.rows, b.rows) and torch.equal(a.soft, b.soft)
            assert torch.equal(a.soft, soft.float()[a.rows, (a.rows + epoch) % 3])


def test_nonfinite_scan_of_float16_blocks() -> None:
    from softcache.student._checks import nonfinite_rows

    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.randn(50, 1, 9).half()
        values[7, 0, 3] = values[31, 0, 0] = bad
        found = nonfinite_rows([(100, values[:20]), (120, values[20:]), (140, values[:0])])
        assert found.count == 2 and found.first == [107, 131]
    assert nonfinite_rows([(0, torch.full((4, 1, 3), 65504.0).half())]).count == 0  # largest float16: finite


def test_train_reports_where_its_time_went(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from softcache._cli.main import main

    cache = _build(tmp_path / "c.zarr", store_inputs=True)
    code = main(["train", "--cache", cache.url, "--student", f"softcache.models:mlp,in_features={FEATURES},"
                 f"num_classes={CLASSES}", "--epochs", "1", "--out", str(tmp_path / "results"), "--json", "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"leaderboard", "out", "seconds"}
    assert set(out["seconds"]) == {"prepare", "train", "evaluate", "write"}
    assert all(isinstance(v, float) and v >= 0 for v in out["seconds"].values())
