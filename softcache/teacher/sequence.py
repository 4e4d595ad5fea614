"""Stage 1 for token rows: what a language-model cache's build decides before the teacher runs.

The build itself (shards, writer, resume, finalize) is the same for every row kind
(``teacher.build.run_build``); this module turns a sequence dataset and a causal-LM teacher into
its plan: the rows as :class:`~softcache.sequences.TokenRows`, the checks a bad corpus or teacher
fails with one line, the manifest's ``sequence`` section, and blocks of rows for the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softcache.cache import layout
from softcache.cache.manifest import SequenceInfo, TokenizerInfo
from softcache.errors import CacheError, UsageError
from softcache.sequences import TokenRows, as_token_rows, check_ids
from softcache.teacher.label import RowBlock
from softcache.weights import output_logits

CHUNK_BYTES = 16 << 20
"""Bytes of soft labels (and statistics) one chunk of token rows aims at: a row of full fp16
logits at an 8k vocabulary and 64 positions is 1 MiB, so 4096-row chunks would be 4 GiB."""
LOGIT_BYTES = 64 << 20
"""Bytes of float32 teacher logits one teacher call may produce: caps the rows per call."""


def token_rows(dataset: Dataset, eval_set: Dataset | None) -> tuple[TokenRows, TokenRows | None]:
    """The training and held-out rows, the held-out ones at the training rows' length."""
    rows = as_token_rows(dataset)
    if eval_set is not None and len(eval_set) == 0:  # type: ignore[arg-type]
        raise CacheError("the held-out corpus is empty: no token sequences to cache")
    held_out = as_token_rows(eval_set, rows.length, "held-out sequence") if eval_set is not None else None
    return rows, held_out


@torch.no_grad()
def probe_vocab(teacher: nn.Module, rows: TokenRows, device: torch.device) -> int:
    """The teacher's vocabulary, from its output on two rows, which must be ``(batch, length, vocab)``.

    The probe rows are all id 0, which every vocabulary has: an id of the data outside the
    vocabulary is then reported as bad data (:func:`sequence_info`) rather than as a teacher that
    fails on its input."""
    sample = torch.zeros_like(rows.tokens[:2]).to(device)
    try:
        out = output_logits(teacher.eval()(sample))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"teacher failed on token rows of shape {tuple(sample.shape)}: {first}") from None
    if out.ndim != 3 or tuple(out.shape[:2]) != tuple(sample.shape):
        raise UsageError(f"teacher output has shape {tuple(out.shape)} for token rows {tuple(sample.shape)}; "
                         "a language-model teacher returns (batch, length, vocab) logits")
    return int(out.shape[-1])


def sequence_info(rows: TokenRows, vocab: int, held_out: TokenRows | None) -> SequenceInfo:
    """The manifest's ``sequence`` section, after checking ids and tokenizer against the teacher."""
    tok = TokenizerInfo.model_validate(rows.tokenizer) if rows.tokenizer else None
    if tok is not None and tok.vocab_size != vocab:
        raise UsageError(f"the teacher's vocabulary has {vocab} entries but the tokenizer {tok.name!r} has "
                         f"{tok.vocab_size}: they do not belong together")
    check_ids(rows.tokens, vocab, "training token ids")
    if held_out is not None:
        check_ids(held_out.tokens, vocab, "held-out token ids")
    return SequenceInfo(length=rows.length, vocab_size=vocab, tokenizer=tok, packing=rows.packing or {})


def check_plain(views: int, augment: object) -> None:
    if views != 1 or augment is not None:
        raise UsageError("views and augment apply to classified samples; a token-row cache has one soft label "
                         "per position instead")


def chunk_rows(requested: int, manifest_row_bytes: int) -> int:
    """Rows per chunk: as requested, but no more than :data:`CHUNK_BYTES` of soft labels."""
    return max(1, min(requested, CHUNK_BYTES // max(1, manifest_row_bytes)))


def teacher_batch(requested: int, length: int, vocab: int) -> int:
    return max(1, min(requested, LOGIT_BYTES // (4 * length * vocab)))


def sequence_blocks(rows: TokenRows, batch_size: int) -> Callable[[range], Iterator[RowBlock]]:
    """``row range -> RowBlocks`` of ``batch_size`` token rows, sliced (no per-row loop)."""
    def blocks(span: range) -> Iterator[RowBlock]:
        for start in range(span.start, span.stop, batch_size):
            stop = min(start + batch_size, span.stop)
            tokens = rows.tokens[start:stop]
            yield RowBlock(inputs=tokens, labels=None, sample_index=np.arange(start, stop, dtype=np.int64),
                           extra={layout.TOKENS: tokens.numpy().astype(np.int32),
                                  layout.LOSS_MASK: rows.loss_mask[start:stop].numpy()}, sequence=True)
    return blocks

