"""Tiny local Hugging Face checkpoints and tokenizers, made in seconds on the CPU.

``make_checkpoint`` writes a randomly initialised two-layer causal LM with ``save_pretrained``
(safetensors) plus a ``tokenizer.json`` whose ids all fit the model's vocabulary, so a test can
load the directory as ``softcache.hf:causal_lm,path=DIR`` and tokenize text for it. Import the
fixtures (``from hf_fixtures import gpt2_checkpoint``) after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 512  # the model's vocabulary; the tokenizer's is smaller, so every id it makes fits
TOKENIZER_VOCAB = 400
SPECIALS = ("<pad>", "<eos>")  # ids 0 and 1
CORPUS = [
    "the teacher writes soft labels once and the student reads them many times",
    "a cache of logits is cheaper than running the teacher again",
    "students learn from the distribution over the next token, not only the token",
    "temperature softens the distribution so small probabilities still teach",
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
    "language models predict the next word from the words before it",
]


def make_tokenizer(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A byte-level BPE trained on :data:`CORPUS`, saved as ``path`` (a ``.json`` file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_checkpoint(directory: Path, kind: str = "gpt2", vocab_size: int = VOCAB, seed: int = 0) -> Path:
    """A two-layer ``kind`` ("gpt2": tied embeddings, or "llama": untied) causal LM with hidden
    size 32, saved with safetensors into ``directory`` with a tokenizer beside it."""
    import transformers

    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **common)
    elif kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                          tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    make_tokenizer(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama", "llama")
