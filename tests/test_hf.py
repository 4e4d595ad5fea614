"""Local Hugging Face checkpoints as SPECs: logits, weights round-trip, refusals, tokenizers."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_fixtures import SPECIALS, VOCAB, gpt2_checkpoint, llama_checkpoint, make_tokenizer  # noqa: E402,F401
from safetensors import safe_open  # noqa: E402

from softcache.cache.manifest import Spec, TokenizerInfo  # noqa: E402
from softcache.errors import CacheError, UsageError  # noqa: E402
from softcache.hf import causal_lm, tokenizer, tokenizer_info  # noqa: E402
from softcache.spec import call_spec  # noqa: E402
from softcache.weights import load_model, save_model  # noqa: E402


def spec_of(directory: Path, **extra: object) -> str:
    return ",".join([f"softcache.hf:causal_lm,path={directory}"] + [f"{k}={v}" for k, v in extra.items()])


def token_ids(rows: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def one_line_error(kind: type[Exception], fn, *args, **kwargs) -> str:  # noqa: ANN001
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_spec_returns_the_checkpoints_logits(kind: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(f"{kind}_checkpoint")
    model = call_spec(Spec.parse(spec_of(directory)))
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids)
        expected = direct(input_ids=ids).logits
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 12, VOCAB)
    assert model.vocab_size == VOCAB
    assert not model.training
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_weights_round_trip_through_safetensors(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    directory = request.getfixturevalue(f"{kind}_checkpoint")
    model = causal_lm(str(directory))
    with torch.no_grad():  # weights of its own, so loading cannot pass by returning the checkpoint's
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = save_model(model, tmp_path / "student.safetensors", spec_of(directory))
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    assert all(key.startswith("model.") for key in keys)
    assert ("model.lm_head.weight" in keys) == (kind == "llama")  # GPT-2's head is its tied embedding

    loaded = load_model(str(path))
    fresh = causal_lm(str(directory))
    ids = token_ids(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
        assert not torch.allclose(fresh(ids), model(ids))
    if kind == "gpt2":  # the tie survives loading: one tensor, not two copies
        assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_meta_device_builds_a_skeleton_without_weights(gpt2_checkpoint: Path) -> None:
    with torch.device("meta"):
        skeleton = causal_lm(str(gpt2_checkpoint))
    real = causal_lm(str(gpt2_checkpoint))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_overrides_and_dtype_apply_to_the_config(gpt2_checkpoint: Path) -> None:
    model = call_spec(spec_of(gpt2_checkpoint, resid_pdrop=0.0, dtype="bfloat16"))
    assert model.config.resid_pdrop == 0.0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "not a field" in one_line_error(UsageError, causal_lm, str(gpt2_checkpoint), n_wings=2)
    assert "not a field" in one_line_error(UsageError, causal_lm, str(gpt2_checkpoint), trust_remote_code=True)
    assert "float64" in one_line_error(UsageError, causal_lm, str(gpt2_checkpoint), dtype="float64")


def test_random_init_needs_only_the_config(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(gpt2_checkpoint / "config.json", config_only / "config.json")
    torch.manual_seed(0)
    model = causal_lm(str(config_only), pretrained=False)
    assert model(token_ids()).shape == (2, 12, VOCAB)
    assert "no safetensors" in one_line_error(UsageError, causal_lm, str(config_only))


def test_custom_code_is_refused_before_transformers_reads_it(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(gpt2_checkpoint, tmp_path / "remote-code")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text("raise SystemExit('checkpoint code ran')\n")
    message = one_line_error(UsageError, call_spec, spec_of(directory))
    assert "auto_map" in message and "never runs code" in message


def test_a_pickled_checkpoint_is_refused(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(gpt2_checkpoint, tmp_path / "pickled")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    message = one_line_error(UsageError, causal_lm, str(directory))
    assert "no safetensors weights" in message and "safe_serialization=True" in message


def test_missing_weights_are_refused_not_filled_at_random(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = copy_checkpoint(gpt2_checkpoint, tmp_path / "partial")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    message = one_line_error(CacheError, causal_lm, str(directory))
    assert "do not cover the model (1 missing" in message and "h.1.mlp.c_fc.weight" in message
    resized = one_line_error(CacheError, causal_lm, str(gpt2_checkpoint), n_embd=64)
    assert "of another shape" in resized and "c_attn.bias' is [96] in the checkpoint, [192] in the model" in resized


def test_missing_directory_or_config_is_a_usage_error(tmp_path: Path) -> None:
    assert "no such checkpoint directory" in one_line_error(UsageError, call_spec, spec_of(tmp_path / "absent"))
    assert "no config.json" in one_line_error(UsageError, causal_lm, str(tmp_path))
    assert "local directory only" in one_line_error(UsageError, causal_lm, "hf://gpt2")


def test_without_transformers_the_error_names_the_extra(gpt2_checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    message = one_line_error(UsageError, causal_lm, str(gpt2_checkpoint))
    assert "transformers is not installed" in message and "pip install softcache[hf]" in message


def test_tokenizer_info_records_what_a_manifest_needs(tmp_path: Path) -> None:
    path = make_tokenizer(tmp_path / "wordy-bpe.json", vocab_size=320)
    info = tokenizer_info(path)
    tok = tokenizer(path)
    assert info == {
        "name": "wordy-bpe",
        "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "special_ids": {name: i for i, name in enumerate(SPECIALS)},
    }
    assert 280 < info["vocab_size"] <= 320
    TokenizerInfo.model_validate(info)
    text = "the teacher writes soft labels"
    ids = tok.encode(text).ids
    assert len(ids) < len(text) and tok.decode(ids) == text  # merges learnt, bytes round-trip


def test_a_checkpoint_directory_names_its_tokenizer(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    info = tokenizer_info(gpt2_checkpoint)
    assert info["name"] == "tiny-gpt2"
    assert info["vocab_size"] <= VOCAB  # every id the tokenizer makes fits the model
    assert "has no tokenizer.json" in one_line_error(UsageError, tokenizer, tmp_path)
    (tmp_path / "broken.json").write_text("{\"model\": 3}")
    assert "not a readable tokenizers" in one_line_error(UsageError, tokenizer, tmp_path / "broken.json")


def test_a_local_checkpoint_is_teacher_and_student_end_to_end(gpt2_checkpoint: Path, llama_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    """Build a top-k sequence cache with a transformers teacher, train a transformers student from
    it: the SPEC is all either needs, and the cache records the teacher SPEC redacted of nothing
    secret (a local path)."""
    import softcache
    from softcache.config import StudentConfig, TrainConfig
    from softcache.sequences import TokenRows

    gen = torch.Generator().manual_seed(0)
    rows = TokenRows(torch.randint(2, 300, (24, 12), generator=gen))
    held_out = TokenRows(torch.randint(2, 300, (8, 12), generator=gen))
    teacher = f"softcache.hf:causal_lm,path={gpt2_checkpoint}"
    cache = softcache.build(teacher, rows, str(tmp_path / "c.zarr"), eval_data=held_out, storage="topk:16",
                            temperature=1.0, progress=False)
    assert cache.manifest.kind == "sequence" and cache.manifest.sequence.vocab_size == 512
    assert cache.manifest.teacher.spec.target == "softcache.hf:causal_lm"
    student = StudentConfig(spec=f"softcache.hf:causal_lm,path={llama_checkpoint},pretrained=false",
                            temperature=1.0, alpha=0.5, lr=1e-3)
    result = softcache.train(cache, student, config=TrainConfig(epochs=2, batch_size=8), out_dir=tmp_path / "out",
                             progress=False)
    row = result.leaderboard.row(0, named=True)
    assert row["bits_per_token"] > 0 and 0 <= row["teacher_agreement"] <= 1
    assert Path(row["weights"]).exists()
