"""The benchmark's machinery and output contract (its timing targets are checked by the
benchmark itself, never here)."""

from __future__ import annotations

import json

import pytest

from softcache._bench import TARGETS, BenchSettings, alternate, ratio, run_bench
from softcache._bench.workload import LMSettings, WideSettings
from softcache.config import StudentConfig
from softcache._cli.format import format_report
from softcache._cli.main import main

KEYS = ["store_vs_memory_epoch", "streaming_vs_memory_epoch", "online_vs_cached_epoch", "online_vs_cached_ideal",
        "group_vs_separate_speedup", "write_overhead"]


def test_alternate_interleaves_and_reverses_the_order_each_round():
    calls: list[str] = []

    def timed(name: str, value: float):
        def go() -> float:
            calls.append(name)
            return value
        return go

    times = alternate({"a": timed("a", 2.0), "b": timed("b", 1.0)}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert times == {"a": [2.0, 2.0, 2.0], "b": [1.0, 1.0, 1.0]}
    assert ratio({"a": [2.0, 9.0, 3.0], "b": [1.0, 3.0, 3.0]}, "a", "b") == 2.0  # median of per-round ratios


def test_balanced_rounds_mirror_the_order_and_cancel_a_linear_drift():
    calls: list[str] = []
    clock = [0.0]

    def drifting(name: str, work: float):
        def go() -> float:  # the machine slows down by 10% per run: later runs take longer
            calls.append(name)
            clock[0] += 1
            return work * (1 + 0.1 * clock[0])
        return go

    times = alternate({"a": drifting("a", 2.0), "b": drifting("b", 1.0)}, repeats=2, warmup=0, balanced=True)
    assert calls == ["a", "b", "b", "a", "b", "a", "a", "b"]
    assert ratio(times, "a", "b") == pytest.approx(2.0)  # both runs of a round sit at its middle on average
    plain = alternate({"a": drifting("a", 2.0), "b": drifting("b", 1.0)}, repeats=2, warmup=0)
    assert ratio(plain, "a", "b") != pytest.approx(2.0)  # adjacent single runs see the drift


TOY_LM = LMSettings(rows=32, steps=2, stream_rows=(16, 48), repeats=1, vocab=64, length=8, teacher_layers=1,
                    teacher_width=16, student_layers=1, student_width=8, k=4, batch_size=16, stream_chunk_rows=8)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    wide = WideSettings(rows=512, build_rows=512, repeats=1, build_repeats=1, students=2, epochs=1, teacher_hidden=32,
                        student_hidden=16)
    settings = BenchSettings(rows=512, chunk_rows=128, batch_size=64, epochs=1, repeats=1, students=2,
                             sample_rows=256, wide_rows=512, build_batch_size=128, isolate_memory=False, wide=wide,
                             lm=TOY_LM)
    return run_bench(workdir=tmp_path_factory.mktemp("bench"), settings=settings, command="test")


def test_a_tiny_run_reports_every_figure_as_a_number(tiny_result):
    result = json.loads(json.dumps(tiny_result))  # the object is JSON as it stands
    for key in KEYS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["targets"]) == set(TARGETS)
    assert {"tensor_indexing", "memory", "stream", "stream_2_workers", "zarr_oindex_random_rows"} <= set(
        result["loader_samples_per_s"])
    mem = result["stage2_peak_memory"]
    assert mem["memory"]["arrays_peak_mb"] > 0 and mem["stream"]["arrays_peak_mb"] > 0
    assert result["threads"]["student_step_ms_1_thread"] > 0
    report = format_report(result)
    for text in ("epoch from store (in-RAM mode)", "online KD epoch", "stage 1 with writing", "loader samples/s"):
        assert text in report


WIDE_KEYS = ["train_memory_vs_hand_written", "train_stream_vs_hand_written", "train_memory_vs_hand_written_fused",
             "train_stream_vs_hand_written_fused", "group_vs_separate_speedup",
             "build_vs_teacher", "online_vs_cached_train", "online_vs_cached_ideal", "online_fraction_of_ideal",
             "train_loop_vs_hand_written", "build_fixed_seconds", "build_vs_own_teacher_calls",
             "teacher_calls_in_build_vs_alone"]


def test_the_1000_class_section_reports_its_ratios_beside_the_digits_figures(tiny_result):
    wide = json.loads(json.dumps(tiny_result))["wide"]
    for key in WIDE_KEYS:
        assert isinstance(wide[key], float) and wide[key] > 0, key
    assert wide["settings"]["classes"] == 1000 and wide["settings"]["threads"] == 1
    assert {"memory", "stream", "hand", "grouped", "separate", "stage1_build", "stage1_teacher"} <= set(wide["seconds"])
    assert isinstance(wide["build_vs_teacher_beyond_fixed"], float)  # the build's cost once its fixed part is paid
    report = format_report(tiny_result)
    for text in ("[1000 classes, 512 rows] train() 1 epochs, memory loader / hand-written loop",
                 "hand-written runs / one grouped train()", "build() / teacher forward alone", "online KD (hand-written)"):
        assert text in report
    assert "epoch from store (in-RAM mode)" in report  # the digits figures are still there


def test_the_presets_run_the_1000_class_section_at_the_size_users_run():
    for quick in (True, False):
        wide = BenchSettings.preset(quick).wide
        assert wide is not None and (wide.classes, wide.features, wide.batch_size) == (1000, 256, 256)
        assert (wide.teacher_hidden, wide.student_hidden, wide.students, wide.epochs) == (2048, 256, 8, 2)
    full = BenchSettings.preset(False).wide
    assert (full.rows, full.build_rows) == (65536, 65536)  # type: ignore[union-attr]


def test_the_hand_written_loop_trains_with_the_same_loss_as_softcache(tmp_path):
    """The reference loop is only fair if it optimises softcache's loss on the same cached logits."""
    import torch

    from softcache._bench.wide import hand_written, kd_loss, make_wide
    from softcache.student.loss import distillation_loss, rescale

    s = WideSettings(rows=64, build_rows=64, teacher_hidden=8, student_hidden=8, classes=20, features=12)
    w = make_wide(s, tmp_path)
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    for t, a in [(3.0, 0.7), (4.0, 1.0), (2.0, 0.0)]:
        ref = distillation_loss(logits, rescale(w.soft16.float(), w.cache.temperature, t), w.dataset.labels,
                                temperature=t, alpha=a)
        mine = kd_loss(logits, w.soft16.float() * (w.cache.temperature / t), w.dataset.labels, t, a)
        assert float(mine) == pytest.approx(float(ref), rel=1e-5), (t, a)
    assert hand_written(w, StudentConfig(spec=s.student_spec()), 1) > 0


LM_KEYS = ["lm_write_overhead", "lm_kd_vs_ce_step", "ce_step_vs_hand_written", "capture_tokens_per_s",
           "teacher_tokens_per_s", "train_tokens_per_s", "teacher_ms_per_batch", "label_ms_per_batch"]


def test_the_language_model_section_reports_its_ratios_targets_and_streaming_bound(tiny_result):
    lm = json.loads(json.dumps(tiny_result))["lm"]
    for key in LM_KEYS:
        assert isinstance(lm[key], float) and lm[key] > 0, key
    for key in ("lm_write_overhead", "lm_kd_vs_ce_step"):
        assert tiny_result["targets"][key]["value"] == lm[key]
    assert (lm["settings"]["vocab"], lm["settings"]["storage"], lm["settings"]["threads"]) == (64, "topk:4", 1)
    stream = lm["stream"]
    assert [c["rows"] for c in stream["caches"]] == [16, 48]
    assert all(c["chunk_rows"] == 8 for c in stream["caches"])
    # the bound is the same for both caches (it does not grow with the rows) and larger with larger chunks
    assert stream["bound_independent_of_rows"] is True
    assert stream["bound_mb"] == stream["caches"][0]["bound_mb"] == stream["caches"][1]["bound_mb"] > 0
    assert stream["build_chunk_rows"] > 8 and stream["bound_mb_at_build_chunk_rows"] > stream["bound_mb"]
    memory = [c["memory_loader_mb"] for c in stream["caches"]]
    assert memory[1] == pytest.approx(3 * memory[0])  # while the in-RAM loader's bytes grow with them
    report = format_report(tiny_result)
    for text in ("[LM V=64 L=8 topk:4] build() / teacher forward alone (32 rows)", "student step distilling",
                 "tokens/s: capture", "stage 2 streaming memory bound"):
        assert text in report


def test_the_presets_run_the_language_model_section_at_the_size_users_run():
    for quick in (True, False):
        lm = BenchSettings.preset(quick).lm
        assert lm is not None and (lm.vocab, lm.length, lm.k, lm.batch_size) == (8192, 64, 64, 32)
        assert (lm.teacher_layers, lm.teacher_width, lm.student_layers, lm.student_width) == (4, 256, 2, 128)
        assert lm.stream_rows[0] != lm.stream_rows[1]


def test_the_hand_written_cross_entropy_step_has_the_library_loss(tmp_path):
    """The cross-entropy reference step is only fair if it optimises the library's alpha-0 loss."""
    import torch

    from softcache._bench.lm import hand_ce_loss, lm_build, make_lm, student_batches
    from softcache.sequences import TokenRows
    from softcache.student.loss import distillation_loss, flatten_positions

    w = make_lm(TOY_LM, tmp_path)
    mask = torch.ones_like(w.rows.tokens, dtype=torch.uint8)
    mask[::2, -3:] = 0  # padded row ends: positions that do not count
    rows = TokenRows(w.rows.tokens, mask, tokenizer=w.rows.tokenizer)
    cache = lm_build(w, w.teacher, rows, "toy.zarr")
    batch = student_batches(cache, TOY_LM)[0]
    assert not bool(batch.mask.all())
    logits = torch.randn(*batch.inputs.shape, TOY_LM.vocab, generator=torch.Generator().manual_seed(0))
    flat, _, labels = flatten_positions(logits, None, batch.labels, batch.mask)
    ref = distillation_loss(flat, None, labels, temperature=cache.temperature, alpha=0.0)
    assert float(hand_ce_loss(logits, batch)) == pytest.approx(float(ref), rel=1e-6)


def test_cli_bench_rejects_unknown_flags(capsys):
    assert main(["bench", "--quickly"]) == 2
    assert "softcache: error:" in capsys.readouterr().err


def test_peak_memory_is_measured_in_two_fresh_processes_at_once(tmp_path):
    """The bench's own path (``isolate_memory``): each loader mode in its own child, both running
    together, and a child that fails is reported in one line with none left running."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from softcache._bench.memory import child_report, measure_memory

    settings = BenchSettings(rows=256, chunk_rows=128, batch_size=64, epochs=1, repeats=1, students=1,
                             sample_rows=128, wide_rows=512, build_batch_size=128, isolate_memory=True)
    mem = measure_memory(SimpleNamespace(settings=settings, workdir=tmp_path))  # type: ignore[arg-type]
    assert mem["rows"] == 512 and mem["classes"] == 1000
    for mode in ("memory", "stream"):
        assert mem[mode]["peak_mb"] > 0 and mem[mode]["added_mb"] >= 0 and mem[mode]["arrays_peak_mb"] > 0
    assert mem["stream_bound_mb"] > 0  # only the streaming child reports a bound
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('no such cache')"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with pytest.raises(RuntimeError, match="peak-memory child failed: .*no such cache"):
        child_report(failing)
    assert failing.poll() is not None
