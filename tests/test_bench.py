"""The benchmark's machinery and output contract (its timing targets are checked by the
benchmark itself, never here)."""

from __future__ import annotations

import json

import pytest

from softcache._bench import TARGETS, BenchSettings, alternate, format_report, ratio, run_bench
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


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    settings = BenchSettings(rows=512, chunk_rows=128, batch_size=64, epochs=1, repeats=1, students=2,
                             sample_rows=256, wide_rows=512, build_batch_size=128, isolate_memory=False)
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


def test_cli_bench_rejects_unknown_flags(capsys):
    assert main(["bench", "--quickly"]) == 2
    assert "softcache: error:" in capsys.readouterr().err
