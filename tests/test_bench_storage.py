"""The storage-mode comparison (``softcache bench --storage-modes``) at toy sizes: its figures
checked against independent computations; its targets are printed, never asserted here."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("tokenizers")

import softcache.demo_lm as demo_lm  # noqa: E402
import softcache.text as text  # noqa: E402
from softcache._bench.angles import angle_deg, gradients, row_angles_deg  # noqa: E402
from softcache._bench.storage import SCRATCH, format_storage  # noqa: E402
from softcache._bench.workload import StorageSettings  # noqa: E402
from softcache._cli.main import main  # noqa: E402
from softcache.student._batch import Batch, TopK  # noqa: E402

VOCAB = 300
LENGTH = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The CLI's ``--quick`` run on a toy language-model demo (a few standard library files, a
    300-token vocabulary, a one-layer teacher) and on digits."""
    files = text.stdlib_files(max_bytes=150_000)
    root = text.stdlib_root().resolve()
    work = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text, "stdlib_files", lambda split=None, **_: [
            f for f in files if split is None or text.split_of(f.relative_to(root)) == split])
        mp.setattr(demo_lm, "VOCAB", VOCAB)
        mp.setattr(demo_lm, "LENGTH", LENGTH)
        gpt = f"softcache.models:gpt,vocab_size={VOCAB},length={LENGTH},layers=1,heads=2"
        mp.setattr(demo_lm, "TEACHER", f"{gpt},width=32")
        mp.setattr(demo_lm, "STUDENT", f"{gpt},width=16")
        mp.setattr(demo_lm, "TEACHER_STEPS", 30)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--quiet", "bench", "--storage-modes", "--quick", "--workdir", str(work), "--json"])
    assert code == 0
    return json.loads(out.getvalue()), work


def modes(result: dict, name: str) -> dict:
    return result[name]["modes"]


def test_the_quick_run_is_the_tiny_preset_and_the_full_run_the_stated_modes(run):
    result, _ = run
    assert result["settings"] == json.loads(json.dumps(StorageSettings.tiny().__dict__))
    full = StorageSettings.preset(False)
    assert full.lm_modes == ("full", "topk:16", "topk:64", "sample:50", "sample:12") and full.seeds == (0, 1, 2)
    assert full.digits_modes == ("full", "topk:3", "topk:5", "sample:12", "sample:50") and full.lm_rows is None
    assert list(modes(result, "lm")) == list(full.lm_modes) and list(modes(result, "digits")) == list(full.digits_modes)
    assert result["lm"]["vocab"] == VOCAB and result["lm"]["rows"] == StorageSettings.tiny().lm_rows


def nominal(mode: str, classes: int) -> int:
    """The soft-label bytes one position stores under a mode, from the format's definition."""
    kind, _, k = mode.partition(":")
    if kind == "full":
        return 2 * classes  # float16 per class
    if kind == "topk":
        return int(k) * (2 + 2) + 4  # float16 log-probability and uint16 id per kept class, float32 leftover
    return 3 * min(int(k), classes)  # uint8 count and uint16 id per slot


def chunk_bytes(cache: Path, unit_count: int) -> float:
    """The soft arrays' stored chunks, counted from their metadata: chunk shape x item size plus
    the 4-byte checksum, times the chunk files present."""
    total = 0
    for name in ("soft_labels", "soft_ids", "soft_rest"):
        if not (cache / name).is_dir():
            continue
        meta = json.loads((cache / name / "zarr.json").read_text())
        item = np.dtype(meta["data_type"]).itemsize
        shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        files = [f for f in (cache / name / "c").rglob("*") if f.is_file()]
        total += len(files) * (math.prod(shape) * item + 4)
    return total / unit_count


@pytest.mark.parametrize("name,classes,unit", [("lm", VOCAB, "token"), ("digits", 10, "sample")])
def test_bytes_per_token_are_the_layout_s_and_the_chunk_files(run, name, classes, unit):
    result, work = run
    sec = result[name]
    units = sec["rows"] * (sec["length"] if name == "lm" else 1)
    for mode, m in modes(result, name).items():
        assert m[f"bytes_per_{unit}"] == nominal(mode, classes), mode
        path = work / SCRATCH / name / f"{mode.replace(':', '-')}.zarr"
        assert m[f"bytes_per_{unit}_on_disk"] == pytest.approx(chunk_bytes(path, units)), mode
        assert m[f"bytes_per_{unit}_on_disk"] >= m[f"bytes_per_{unit}"]
        assert m["bytes_vs_full"] == pytest.approx(nominal(mode, classes) / (2 * classes))
        if mode.startswith("sample:"):
            counts = zarr.open_array(str(path / "soft_labels"), mode="r")[:]
            draws = int(mode.split(":")[1])
            assert (counts.astype(np.int64).sum(-1) == draws).all()
            assert m[f"distinct_ids_per_{unit}"] == pytest.approx(float((counts > 0).sum(-1).mean()))
            assert 1 <= m[f"distinct_ids_per_{unit}"] <= min(draws, classes)
        else:
            assert f"distinct_ids_per_{unit}" not in m


@pytest.mark.parametrize("name", ["lm", "digits"])
def test_angles_are_degrees_and_full_storage_is_the_live_teacher_to_float16(run, name):
    result, _ = run
    for mode, m in modes(result, name).items():
        for key in ("param_angle_deg", "logit_angle_deg", "param_angle_deg_at_alpha"):
            assert 0.0 <= m[key] <= 180.0, (mode, key)
        assert m["param_angle_deg_std"] >= 0
    full = modes(result, name)["full"]
    assert full["param_angle_deg"] < 0.5 and full["logit_angle_deg"] < 0.5 and full["param_angle_deg_at_alpha"] < 0.5
    # a compact target differs from the teacher's distribution: its gradient points elsewhere
    assert all(m["logit_angle_deg"] > full["logit_angle_deg"] for mode, m in modes(result, name).items()
               if mode != "full")


def test_the_gradient_angles_are_those_of_the_closed_form_gradients():
    """Soft term alone at T = 1 for a linear student z = W x: the gradient w.r.t. the logits is
    (softmax(z) - p) / n, and w.r.t. W its outer product with x; the angles follow by hand."""
    gen = torch.Generator().manual_seed(0)
    n, features, classes = 6, 5, 7
    x = torch.randn(n, features, generator=gen)
    layer = torch.nn.Linear(features, classes, bias=False)
    logits = layer(x)
    teacher = torch.randn(n, classes, generator=gen)
    kept = teacher.topk(3, dim=-1)
    logp = teacher.log_softmax(-1)
    top = TopK(kept.indices, logp.gather(-1, kept.indices), 1 - logp.gather(-1, kept.indices).exp().sum(-1))
    batch = Batch(rows=torch.arange(n), inputs=x, soft=None, labels=torch.full((n,), -1))
    params = [layer.weight]
    full_param, full_logit = gradients(logits, teacher, batch, params, 1.0, 1.0, "bucket")
    param, by_logit = gradients(logits, top, batch, params, 1.0, 1.0, "renormalize")

    q = torch.softmax(logits.detach().double(), -1)
    p_full = torch.softmax(teacher.double(), -1)
    p_top = torch.zeros_like(p_full).scatter_(-1, kept.indices, torch.softmax(kept.values.double(), -1))
    expected = [(q - p) / n for p in (p_full, p_top)]
    assert torch.allclose(full_logit.double(), expected[0], atol=1e-6)
    assert torch.allclose(by_logit.double(), expected[1], atol=1e-6)
    assert torch.allclose(full_param.double(), (expected[0].T @ x.double()).reshape(-1), atol=1e-6)
    by_hand = torch.nn.functional.cosine_similarity(expected[0], expected[1], dim=-1).arccos().rad2deg()
    assert torch.allclose(row_angles_deg(by_logit, full_logit), by_hand, atol=1e-3)
    a, b = (expected[0].T @ x.double()).reshape(-1), (expected[1].T @ x.double()).reshape(-1)
    assert angle_deg(param, full_param) == pytest.approx(math.degrees(math.acos(float(a @ b / (a.norm() * b.norm())))),
                                                         abs=1e-3)
    assert angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(45.0)
    assert angle_deg(full_param, full_param) == pytest.approx(0.0, abs=1e-4)


def check_students(st: dict, full: dict, metric: str, seeds: int) -> None:
    values = st[metric]
    assert len(values) == st["seeds"] == seeds
    assert st["mean"] == pytest.approx(float(np.mean(values)))
    assert st["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert st["vs_full"] == pytest.approx(st["mean"] / full["mean"])
    noise = 2 * math.sqrt((st["std"] ** 2 + full["std"] ** 2) / seeds)
    assert st["seed_noise"] == pytest.approx(noise)
    worse = st["mean"] - full["mean"] if metric == "bits_per_token" else full["mean"] - st["mean"]
    assert st["within_seed_noise"] == (worse <= noise + 1e-12)


def test_students_are_scored_over_the_seeds_beside_full_storage(run):
    result, _ = run
    seeds = len(StorageSettings.tiny().seeds)
    lm = result["lm"]
    assert 0 < lm["teacher_bits_per_token"] < math.log2(VOCAB) + 4 and not lm["teacher_reused"]
    full = modes(result, "lm")["full"]["students"]["gpt"]
    for mode, m in modes(result, "lm").items():
        st = m["students"]["gpt"]
        assert all(0 < v < math.log2(VOCAB) + 4 for v in st["bits_per_token"])
        check_students(st, full, "bits_per_token", seeds)
    ce = lm["cross_entropy"]["gpt"]
    assert len(ce["bits_per_token"]) == seeds and ce["bits_per_token"] != full["bits_per_token"]
    digits = result["digits"]
    assert 0 <= digits["teacher_accuracy"] <= 1 and set(digits["cross_entropy"]) == {"mlp", "tiny_cnn"}
    full = modes(result, "digits")["full"]["students"]
    for mode, m in modes(result, "digits").items():
        assert set(m["students"]) == {"mlp", "tiny_cnn"}
        for k, st in m["students"].items():
            assert all(0 <= v <= 1 for v in st["accuracy"])
            check_students(st, full[k], "accuracy", seeds)


def test_steps_are_timed_against_a_cross_entropy_step_and_the_targets_follow_the_figures(run):
    result, _ = run
    for name in ("lm", "digits"):
        for mode, m in modes(result, name).items():
            assert m["step_vs_ce"] > 0 and m["step_ms"] > 0 and m["ce_step_ms"] > 0
    targets = result["targets"]
    sample = modes(result, "lm")["sample:12"]
    (key,) = [k for k in targets if k.startswith("lm sample mode at <= 40 bytes per token")]
    assert "(sample:12)" in key  # sample:50 stores 150 bytes per token: not a candidate
    bits, st = targets[key], sample["students"]["gpt"]
    assert bits["value"] == st["vs_full"] and bits["met"] == (st["vs_full"] <= 1.01 or st["within_seed_noise"])
    topk = targets["lm topk:64 bytes / full float16 bytes"]
    assert topk["value"] == pytest.approx(260 / 600) and topk["met"] is False  # a 300-token vocabulary: 600 bytes
    assert not any(key.startswith("digits") for key in targets)  # the digits table is reported, not targeted
    for name in ("lm", "digits"):
        for mode, m in modes(result, name).items():
            t = targets.get(f"{name} {mode} step / cross-entropy step")
            assert (t is None) == (mode == "full" or name == "digits")
            if t is not None:
                assert t["value"] == m["step_vs_ce"] and t["met"] == (m["step_vs_ce"] <= 1.15)


def test_the_report_prints_a_row_per_mode_and_the_targets(run):
    result, _ = run
    report = format_storage(result)
    for name in ("lm", "digits"):
        for mode in modes(result, name):
            assert f"  {mode} " in report
    assert "targets:" in report and "lm sample mode at <= 40 bytes per token (sample:12)" in report
    assert "language model: V=300" in report and "digits: teacher test accuracy" in report


def test_seeds_and_workload_choose_what_the_comparison_runs(tmp_path: Path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--quiet", "bench", "--storage-modes", "--quick", "--workload", "digits", "--seeds", "3",
                     "--workdir", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(out.getvalue())
    assert "lm" not in result and result["settings"]["seeds"] == [0, 1, 2]
    assert result["command"].endswith("--seeds 3 --workload digits --storage-modes")
    for mode in result["digits"]["modes"].values():
        assert all(st["seeds"] == 3 for st in mode["students"].values())


@pytest.mark.parametrize("argv, message", [
    (["bench", "--seeds", "5"], "add --storage-modes"),
    (["bench", "--workload", "lm"], "add --storage-modes"),
    (["bench", "--storage-modes", "--seeds", "1"], "at least 2 seeds"),
])
def test_storage_mode_options_alone_or_too_few_seeds_are_one_line(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
