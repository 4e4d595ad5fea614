"""Reference architectures: for 8x8 single-channel images (the embedded digits data) and a small
causal language model for token rows (:func:`gpt`, for :mod:`softcache.text`'s corpus).

Each factory is a SPEC target (``softcache.models:mlp,hidden=32``). Students carry no
BatchNorm so that many copies can be stacked and trained as one vectorised model; the language
model has no buffers either and, at ``dropout=0``, no random layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from softcache.errors import UsageError


def teacher_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """BatchNorm CNN, about 29k parameters at width 32: the digits teacher."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


def mlp(hidden: int = 32, num_classes: int = 10, in_features: int = 64, depth: int = 1) -> nn.Module:
    """The 64-32-10 MLP student (``depth`` hidden layers of ``hidden`` units)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def tiny_cnn(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """About 1.9k parameters at 8 channels: a conv student without BatchNorm. It keeps the 2x2
    spatial map (no global pooling): on 8x8 digits, where a stroke is matters."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 4, num_classes),
    )


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, w)))
        return h + self.drop(self.down(F.gelu(self.up(self.ln2(h)))))


class GPT(nn.Module):
    """Token and learned position embeddings, pre-LN blocks, a final LayerNorm and an output
    layer tied to the token embedding (GPT-2's choice: at width 128 and 8192 tokens an untied
    head would double the parameters for nothing a small model can use)."""

    def __init__(self, vocab_size: int, length: int, layers: int, width: int, heads: int, dropout: float):
        super().__init__()
        self.length = length
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(length, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                # GPT-2's initialisation: residual outputs shrink with depth so the sum stays O(1)
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[-1]
        if n > self.length:
            raise ValueError(f"rows of {n} tokens are longer than the model's {self.length} positions")
        h = self.drop(self.tokens(tokens) + self.positions.weight[:n])
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln(h), self.tokens.weight)


def gpt(vocab_size: int = 8192, length: int = 64, layers: int = 2, width: int = 128, heads: int = 4,
        dropout: float = 0.0) -> nn.Module:
    """A small causal LM: ``(B, L)`` int64 token ids (``L <= length``) to ``(B, L, vocab_size)``
    float32 logits, position ``t`` seeing tokens ``0..t`` only. 1.45M parameters at the defaults,
    1.05M of them the token embedding (vocabulary x width), which is also the output layer."""
    if min(vocab_size, length, layers, width, heads) < 1 or width % heads:
        raise UsageError(f"gpt needs positive sizes and width divisible by heads, not vocab_size={vocab_size} "
                         f"length={length} layers={layers} width={width} heads={heads}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"gpt dropout must be in [0, 1), not {dropout}")
    return GPT(vocab_size, length, layers, width, heads, dropout)
