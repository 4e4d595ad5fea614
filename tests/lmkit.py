"""Token rows and tiny causal language models for tests, importable as SPECs (``lmkit:rows``).

The rows follow a noisy affine rule (the next token is ``(3 t + 7) mod V`` most of the time), so
a bigram teacher fitted in a few steps is far better than chance and a student can learn from it.
"""

from __future__ import annotations

import torch
from torch import nn

from softcache.sequences import TokenRows


def rows(n: int = 48, length: int = 16, vocab: int = 64, seed: int = 0, split: str = "train",
         tokenizer_vocab: int | None = None) -> TokenRows:
    gen = torch.Generator().manual_seed(seed + (1000 if split == "eval" else 0))
    tokens = torch.empty(n, length, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, length):
        noise = torch.randint(0, vocab, (n,), generator=gen)
        rule = (3 * tokens[:, t - 1] + 7) % vocab
        tokens[:, t] = torch.where(torch.rand(n, generator=gen) < 0.8, rule, noise)
    return TokenRows(tokens, info={"corpus": "lmkit", "split": split, "seed": seed},
                     tokenizer={"name": "lmkit", "vocab_size": tokenizer_vocab or vocab, "special_ids": {}},
                     packing={"method": "synthetic", "length": length})


class Bigram(nn.Module):
    """A causal LM at its simplest: the logits at position t depend on token t only."""

    def __init__(self, vocab: int = 64, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(tokens)))


def teacher(vocab: int = 64, width: int = 32, seed: int = 0, steps: int = 60) -> nn.Module:
    """A bigram teacher fitted to :func:`rows` with cross-entropy (deterministic: seeded)."""
    torch.manual_seed(seed)
    model = Bigram(vocab, width)
    data = rows(n=64, vocab=vocab, seed=seed + 7).tokens
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def student(vocab: int = 64, width: int = 8) -> nn.Module:
    return Bigram(vocab, width)


class NaNTeacher(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, 64)
        out[0, 1, 3] = float("nan")
        return out


def nan_teacher() -> nn.Module:
    return NaNTeacher()
