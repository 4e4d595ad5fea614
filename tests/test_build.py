from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from softcache.cache import store
from softcache.teacher.build import build
from softcache.config import StudentConfig, TrainConfig
from softcache.demo import DATA_SPEC
from softcache.digits import load
from softcache.errors import CacheError, UsageError
from softcache.weights import load_model
from softcache.cache.store import Cache, open_cache
from softcache.student.train import train
from softcache.cache.check import validate


def test_layout_shapes_and_dtypes(cache: Cache) -> None:
    soft = cache.train.array(store.SOFT)
    assert soft.shape == (1200, 1, 10) and str(soft.dtype) == "float16"
    assert soft.chunks == (256, 1, 10)
    assert cache.eval is not None and cache.eval.rows == 597
    assert cache.manifest.layout.num_shards == 5  # 1200 rows / 256-row shards
    np.testing.assert_array_equal(cache.train.sample_index(), np.arange(1200))
    np.testing.assert_array_equal(cache.train.labels(), load("train").labels.numpy())


def test_soft_labels_are_teacher_logits_over_t(cache: Cache, teacher_path: Path) -> None:
    teacher = load_model(str(teacher_path)).eval()
    with torch.no_grad():
        logits = teacher(load("train").inputs).numpy()
    stored = cache.train.soft_labels()
    np.testing.assert_allclose(stored, logits / 4.0, rtol=2e-3, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(cache.train.predictions(), logits.argmax(1))
    stats = cache.train.stats()
    assert set(stats.columns) >= {"row", "view", "sample", "label", "max_prob", "entropy", "margin", "prediction"}
    assert ((stats["max_prob"] > 0) & (stats["max_prob"] <= 1)).all()


def test_float32_storage_is_exact(teacher_path: Path, tmp_path: Path) -> None:
    small = "softcache.digits:load,split=test"
    c = build(str(teacher_path), small, str(tmp_path / "c.zarr"), dtype="float32", temperature=2.0, progress=False)
    teacher = load_model(str(teacher_path)).eval()
    with torch.no_grad():
        expected = (teacher(load("test").inputs) / 2.0).numpy()
    np.testing.assert_allclose(c.train.soft_labels(), expected, rtol=0, atol=1e-6)


class NaNTeacher(nn.Module):
    """Emits NaN for inputs whose first pixel is bright: a broken teacher."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        return torch.where(x.flatten(1)[:, 9:10] > 0.9, torch.full_like(out, float("nan")), out)


def test_nan_teacher_names_rows_and_never_completes(tmp_path: Path) -> None:
    out = tmp_path / "nan.zarr"
    with pytest.raises(CacheError, match=r"NaN/Inf logits for rows \[\d+"):
        build(NaNTeacher(), DATA_SPEC, str(out), progress=False)
    with pytest.raises(CacheError, match="still being built"):
        open_cache(str(out))
    assert not validate(str(out))["valid"]


def test_existing_cache_is_not_overwritten_unless_asked(cache: Cache, teacher_path: Path) -> None:
    before = cache.manifest.cache_key
    with pytest.raises(UsageError, match="--overwrite"):
        build(str(teacher_path), DATA_SPEC, cache.url, progress=False)
    assert validate(cache.url)["valid"] and open_cache(cache.url).manifest.cache_key == before


def test_overwrite_never_deletes_a_directory_that_is_not_a_cache(teacher_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "project"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(CacheError, match="not a softcache cache"):
        build(str(teacher_path), DATA_SPEC, str(target), progress=False)
    with pytest.raises(UsageError, match="not a cache"):
        build(str(teacher_path), DATA_SPEC, str(target), overwrite=True, progress=False)
    assert (target / "notes.txt").read_text() == "keep me"


def test_not_a_cache_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a softcache cache"):
        open_cache(str(tmp_path / "empty"))


def test_student_with_wrong_class_count_is_refused(cache: Cache) -> None:
    with pytest.raises(CacheError, match="10 classes"):
        train(cache, ["softcache.models:mlp,num_classes=5"], config=TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize("data, message", [
    ("softcache.digits:load,split=test", "has 597 samples"),
    ("softcache.digits:load,split=train,seed=1", "fingerprint"),
])
def test_dataset_must_match_the_cache(cache: Cache, data: str, message: str) -> None:
    with pytest.raises(CacheError, match=message):
        train(cache, ["softcache.models:mlp"], data=data, config=TrainConfig(epochs=1), progress=False)


def test_reading_and_training_never_unpickle(cache: Cache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("unpickling while reading a cache")

    for target, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    metadata = " ".join(p.read_text() for p in Path(cache.url).rglob("zarr.json"))
    assert "pickle" not in metadata.lower() and '"object"' not in metadata
    opened = open_cache(cache.url)
    board = train(opened, [StudentConfig(spec="softcache.models:mlp")], out_dir=tmp_path,
                  config=TrainConfig(epochs=1), progress=False).leaderboard
    assert board.height == 1 and Path(board["weights"][0]).suffix == ".safetensors"
    # the saved student is itself a SPEC that rebuilds the model in a fresh object
    assert isinstance(load_model(board["weights"][0]), nn.Module)


def test_device_defaults_to_cpu_without_cuda_and_refuses_missing_cuda() -> None:
    from softcache.weights import resolve_device

    if torch.cuda.is_available():
        assert resolve_device(None).type == "cuda"
    else:
        assert resolve_device(None).type == "cpu"
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu9")


def test_specs_recorded_in_a_cache_never_run_unless_named(cache: Cache, tmp_path: Path) -> None:
    """A cache is someone else's file: a SPEC it records outside softcache's own modules is not run."""
    import shutil

    import zarr

    copy = tmp_path / "hostile.zarr"
    shutil.copytree(cache.url, copy)
    marker = tmp_path / "ran"
    group = zarr.open_group(str(copy), mode="r+", use_consolidated=False)
    manifest = dict(group.attrs["softcache"])
    manifest["source"] = dict(manifest["source"], spec={"target": "os:system", "kwargs": {"command": f"touch {marker}"}})
    group.attrs["softcache"] = manifest
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        zarr.consolidate_metadata(str(copy))
    with pytest.raises(UsageError, match="--trust-cache-specs"):
        train(str(copy), ["softcache.models:mlp"], config=TrainConfig(epochs=1), progress=False)
    assert not marker.exists()
    board = train(str(copy), ["softcache.models:mlp"], data=DATA_SPEC, config=TrainConfig(epochs=1), progress=False).leaderboard
    assert board.height == 1


class _SlowTeacher(nn.Module):
    """A linear teacher that takes at least ``pause`` seconds a call."""

    def __init__(self, pause: float):
        super().__init__()
        self.linear, self.pause = nn.Linear(64, 10), pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.pause)
        return self.linear(x.flatten(1))


def test_the_build_report_says_how_long_the_teacher_took(tmp_path: Path) -> None:
    """``teacher_seconds`` is the teacher's calls (4 batches of a teacher that sleeps 0.05 s a
    call: at least 0.2 s) and a part of the build's own ``seconds``, the rest being the build's."""
    from softcache.data import LabelledTensors

    data = LabelledTensors(torch.rand(256, 1, 8, 8), torch.arange(256) % 10, None, {"rows": 256})
    teacher = _SlowTeacher(0.05)
    cache = build(teacher, data, str(tmp_path / "c.zarr"), batch_size=64, progress=False)
    report = cache.build_report
    assert report is not None
    assert 0.2 <= report["teacher_seconds"] < report["seconds"]
    again = build(teacher, data, str(tmp_path / "c.zarr"), batch_size=64, progress=False, resume=True)
    assert again.build_report is not None and again.build_report["teacher_seconds"] == 0.0  # nothing left to label


def test_shards_do_not_look_up_the_store_between_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a split stores inputs is decided once per split, not at every shard: between two
    shards a lookup waited behind the previous shard's chunk writes in zarr's event loop (3-7
    ms a shard at 1,000 classes). A store the build creates is not asked at all (it holds the
    planned arrays); a store a shard worker joins is asked once."""
    import zarr

    from softcache.cache import layout
    from softcache.data import LabelledTensors

    lookups: list[str] = []
    contains = zarr.Group.__contains__

    def counted(self: zarr.Group, key: str) -> bool:
        if key == layout.INPUTS:
            lookups.append(key)
        return contains(self, key)

    monkeypatch.setattr(zarr.Group, "__contains__", counted)
    data = LabelledTensors(torch.rand(512, 1, 8, 8), torch.arange(512) % 10, None, {"rows": 512})
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    counts: dict[str, list[int]] = {"new": [], "joined": []}
    for kind, shard in (("new", None), ("joined", "0/1")):
        for chunk_rows in (256, 32):  # 2 shards, then 16
            lookups.clear()
            cache = build(teacher, data, str(tmp_path / f"{kind}{chunk_rows}.zarr"), batch_size=32, chunk_rows=chunk_rows,
                          progress=False, shard=shard)
            assert cache.complete and len(cache.train) == 512
            counts[kind].append(len(lookups))
    assert counts["new"] == [0, 0]
    assert counts["joined"][0] == counts["joined"][1] >= 1


class _TimedTeacher(nn.Module):
    """Records when each call starts; sleeps ``pause`` seconds per call; raises once it has been
    called more than ``fail_after`` times."""

    def __init__(self, pause: float = 0.0, fail_after: int | None = None):
        super().__init__()
        self.lin, self.pause, self.fail_after = nn.Linear(64, 10), pause, fail_after
        self.calls: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.calls.append(time.perf_counter())
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("the teacher broke")
        time.sleep(self.pause)
        return self.lin(x.flatten(1))


def _slowed(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, seconds: float) -> dict[str, Any]:
    """Make ``owner.name`` take ``seconds`` longer; returns when its call ended ("at"), and in
    which thread ("thread")."""
    import threading
    import time

    ended: dict[str, Any] = {}
    real = getattr(owner, name)

    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        try:
            return real(*args, **kwargs)
        finally:
            ended["at"], ended["thread"] = time.perf_counter(), threading.current_thread().name

    monkeypatch.setattr(owner, name, slow)
    return ended


def _slow_opening(monkeypatch: pytest.MonkeyPatch, seconds: float) -> dict[str, Any]:
    """Make opening the target store take ``seconds`` longer."""
    from softcache.teacher import build as stage1

    return _slowed(monkeypatch, stage1.distributed, "open_target", seconds)


def _rows(n: int = 512) -> object:
    from softcache.data import LabelledTensors

    return LabelledTensors(torch.rand(n, 1, 8, 8), torch.arange(n) % 10, None, {"rows": n})


def test_the_teacher_starts_while_a_new_store_is_being_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new cache's store is created in a thread beside the teacher's first calls; the writer
    waits for it, and the cache is the one a build that waited would write."""
    ended = _slow_opening(monkeypatch, 0.3)
    teacher, data = _TimedTeacher().eval(), _rows()
    cache = build(teacher, data, str(tmp_path / "c.zarr"), batch_size=32, chunk_rows=64, temperature=2.0, progress=False)
    assert len(teacher.calls) == 1 + 16  # build() probes the teacher once, then labels 16 blocks
    assert teacher.calls[1] < ended["at"]  # labelling began before the store existed
    assert cache.complete and validate(cache.url)["valid"]
    with torch.no_grad():
        expected = teacher.lin(data.inputs.flatten(1)).numpy() / 2.0  # type: ignore[attr-defined]
    np.testing.assert_allclose(cache.train.soft_labels(), expected, rtol=2e-3, atol=2e-3)
    assert cache.build_report is not None and cache.build_report["target"] == "created"


def _slow_digest(monkeypatch: pytest.MonkeyPatch, seconds: float) -> dict[str, Any]:
    """Make hashing a teacher's weights take ``seconds`` longer."""
    from softcache import weights

    return _slowed(monkeypatch, weights, "state_digest", seconds)


def test_the_teachers_weights_are_hashed_beside_its_first_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights digest (part of the cache key, so needed before the store is created) is
    computed beside the teacher's first calls; the manifest and key are those of a build that
    hashed first (a ``--shard 0/1`` build seals its manifest before it opens the store)."""
    from softcache import weights

    real = weights.state_digest
    teacher, data = _TimedTeacher().eval(), _rows()
    expected = real(teacher.state_dict())
    ended = _slow_digest(monkeypatch, 0.3)
    cache = build(teacher, data, str(tmp_path / "c.zarr"), batch_size=32, chunk_rows=64, progress=False)
    assert teacher.calls[1] < ended["at"]  # labelling began before the digest was done
    assert ended["thread"] == "softcache-open"
    manifest = cache.manifest
    assert manifest.teacher.weights_digest == expected and manifest.cache_key == manifest.key()
    first = build(teacher, data, str(tmp_path / "sealed-first.zarr"), batch_size=32, chunk_rows=64, progress=False,
                  shard="0/1")
    assert first.manifest.teacher == manifest.teacher and first.manifest.cache_key == manifest.cache_key
    assert validate(cache.url)["valid"]


class _Counting(nn.Module):
    """A teacher whose forward writes one of its own buffers in place from call ``writes_from``
    on (the probe is call 1), after sleeping ``pause`` seconds in the call before."""

    def __init__(self, writes_from: int = 1, pause: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.register_buffer("seen", torch.zeros(()))
        self.calls, self.writes_from, self.pause = 0, writes_from, pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.calls += 1
        if self.calls == self.writes_from - 1:
            time.sleep(self.pause)
        if self.calls >= self.writes_from:
            self.seen += len(x)
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("slow,writes_from,pause", [(0.3, 1, 0.0), (0.0, 6, 0.5)])
def test_a_teacher_that_writes_its_weights_while_labelling_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: float, writes_from: int, pause: float) -> None:
    """Its digest would name weights that did not make the labels. A write while the weights are
    hashed (a slow digest), or one long after the store exists (a pause first), stops the build
    with one line; the shard holding the first block labelled after the write is never flagged
    done, so the store can never be finalized into a cache that looks valid."""
    from softcache.cache.shards import finalize

    ended = _slow_digest(monkeypatch, slow)
    teacher = _Counting(writes_from, pause).eval()
    out = tmp_path / "c.zarr"
    with pytest.raises(CacheError, match=r"the teacher changed its state while it labelled \('seen'"):
        build(teacher, _rows(), str(out), batch_size=32, chunk_rows=64, progress=False)
    assert teacher.calls == max(writes_from, 2)  # stopped after the call that wrote
    if pause:
        assert "at" in ended and out.exists()  # hashed and created before the write
    if out.exists():
        with pytest.raises(CacheError, match="shards not done"):
            finalize(str(out))


def test_a_cpu_teachers_weights_are_hashed_in_the_opening_thread_a_gpu_teachers_at_once() -> None:
    """Only a CPU teacher's digest is left to the opening thread: copying a GPU teacher's weights
    to the host from another thread while it runs could break a CUDA graph capture of its own."""
    from softcache.teacher.plan import PENDING_DIGEST, teacher_digest
    from softcache.weights import weights_digest

    model = nn.Linear(4, 3)
    info, later = teacher_digest(model, None, torch.device("cpu"))
    assert info.weights_digest == PENDING_DIGEST and later is not None and later() == weights_digest(model)
    info, later = teacher_digest(model, None, torch.device("cuda"))  # decides only; nothing is moved
    assert later is None and info.weights_digest == weights_digest(model)


def test_a_refused_target_stops_the_build_at_once_and_keeps_the_cache(tmp_path: Path) -> None:
    """The opening's error (a cache is already there) stops the teacher's loop after the call
    it lands in, not at the end of the data, and the cache there is left as it was."""
    out = str(tmp_path / "c.zarr")
    first = build(_TimedTeacher().eval(), _rows(), out, batch_size=32, chunk_rows=64, progress=False)
    teacher = _TimedTeacher(pause=0.1).eval()
    with pytest.raises(UsageError, match="pass --overwrite"):  # another teacher's cache is there
        build(teacher, _rows(), out, batch_size=32, chunk_rows=64, progress=False)
    assert 2 <= len(teacher.calls) < 1 + 16  # the probe, then fewer blocks than the data has
    again = open_cache(out)
    assert again.manifest.cache_key == first.manifest.cache_key and validate(out)["valid"]


def test_a_teacher_failing_while_the_store_is_created_leaves_no_thread_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher's own error is raised, after the opening thread has ended; a later build
    with ``overwrite`` replaces what the failed one left."""
    import threading

    _slow_opening(monkeypatch, 0.3)
    out = str(tmp_path / "c.zarr")
    with pytest.raises(RuntimeError, match="the teacher broke"):
        build(_TimedTeacher(fail_after=1).eval(), _rows(), out, batch_size=32, chunk_rows=64, progress=False)
    assert not [t for t in threading.enumerate() if t.name in ("softcache-open", "softcache-writer")]
    with pytest.raises(CacheError, match="still being built"):
        open_cache(out)
    cache = build(_TimedTeacher().eval(), _rows(), out, batch_size=32, chunk_rows=64, overwrite=True, progress=False)
    assert cache.complete and validate(out)["valid"]


def test_a_refused_target_is_reported_before_what_the_teacher_got_wrong(
        cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is opened beside the first teacher calls, so a teacher error can arrive first
    (here it does: the opening is slowed down); the refusal of the target is still the error
    raised, and the cache there is untouched."""
    class AllNaN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * float("nan")

    before = open_cache(cache.url).manifest
    _slow_opening(monkeypatch, 0.5)
    with pytest.raises(UsageError, match="--overwrite"):
        build(AllNaN(), DATA_SPEC, cache.url, progress=False)
    assert validate(cache.url)["valid"] and open_cache(cache.url).manifest == before


def test_a_target_refused_after_the_last_teacher_call_is_still_the_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the teacher is done before the opening fails, the refusal reaches the build through
    its writer (waiting for the store) and is raised as the opening's own one-line error."""
    out = str(tmp_path / "c.zarr")
    first = build(_TimedTeacher().eval(), _rows(), out, batch_size=32, chunk_rows=64, progress=False)
    ended = _slow_opening(monkeypatch, 0.5)
    teacher = _TimedTeacher().eval()
    with pytest.raises(UsageError, match="pass --overwrite"):  # one 512-row chunk: the writer queues every block
        build(teacher, _rows(), out, batch_size=32, chunk_rows=512, progress=False)
    assert len(teacher.calls) == 1 + 16 and teacher.calls[-1] < ended["at"]  # every block labelled first
    assert open_cache(out).manifest.cache_key == first.manifest.cache_key and validate(out)["valid"]
