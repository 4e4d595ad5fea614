"""Real text every machine has offline: the Python standard library's own source, as LM rows.

The corpus is the ``.py`` files of the running interpreter's standard library (code and English
docstrings), so a language-model cache can be built and checked without a download. The file
list is deterministic for a given Python build: test suites, generated tables and very large
files are left out, and the rest is capped at :data:`MAX_CORPUS_BYTES` by a fixed hash order of
the relative paths, so the sample spans the whole library rather than its first letters. A file
belongs to the held-out split by a hash of its relative path (:func:`split_of`), so no file
contributes rows to both splits, and the content digest of each split is recorded with its rows.

:func:`train_tokenizer` trains a byte-level BPE tokenizer (any text encodes, ``<|endoftext|>``
separates documents) on the training files only, and :func:`stdlib_rows` is the dataset SPEC
target (``softcache.text:stdlib_rows,tokenizer=runs/lm/tokenizer.json,length=64,split=eval``).
Encoded files are kept as ``.npz`` beside the tokenizer, keyed by both digests, so later calls
skip the encoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softcache.errors import UsageError
from softcache.sequences import TokenRows, pack_documents

CORPUS = "python-stdlib"
EOT = "<|endoftext|>"
SPLITS = ("train", "eval")
EVAL_EVERY = 10
"""One file in about 10 is held out: ``sha256(relpath) % 10 == 0`` (about 100k tokens)."""
MAX_CORPUS_BYTES = 4_000_000
MAX_FILE_BYTES = 200_000
"""Larger files are generated tables or one-off giants (``_pydecimal``, ``pydoc_data``)."""
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                          "encodings", "pydoc_data", "lib-dynload"})
"""Test suites would leak near-copies of library code across the split; codec tables and help
text are data, not code."""
_DIGEST_SUFFIX = ".corpus.json"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(rel: str | Path) -> str:
    """``"eval"`` or ``"train"`` for a path relative to the stdlib root; by file, never by row."""
    return "eval" if _hash_int(Path(rel).as_posix()) % EVAL_EVERY == 0 else "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def stdlib_files(split: str | None = None, root: Path | None = None,
                 max_bytes: int = MAX_CORPUS_BYTES) -> list[Path]:
    """The corpus's files, sorted by relative path (``split=None``: both splits)."""
    _check_split(split)
    root = (root or stdlib_root()).resolve()
    candidates = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("config-"))
        for name in names:
            path = Path(folder, name)
            rel = path.relative_to(root)
            if not name.endswith(".py") or name.startswith("_sysconfigdata") or not path.is_file():
                continue
            size = path.stat().st_size
            if 0 < size <= MAX_FILE_BYTES:
                candidates.append((rel.as_posix(), size, path))
    # the cap keeps files in a fixed pseudo-random order of their paths (a prefix of the sorted
    # list would be all asyncio and no xml); "cap:" keeps this order apart from the split's hash
    chosen, total = [], 0
    for rel, size, path in sorted(candidates, key=lambda c: (_hash_int("cap:" + c[0]), c[0])):
        if total + size > max_bytes:
            continue
        chosen.append((rel, path))
        total += size
    return [path for rel, path in sorted(chosen) if split is None or split_of(rel) == split]


def read_text(path: Path) -> str:
    """A file's text; the few stdlib files that are not UTF-8 are read as Latin-1, never skipped,
    so the list alone fixes the corpus."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def files_digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over ``"relpath sha256(content)"`` lines: names the exact text of a file list."""
    root = (root or stdlib_root()).resolve()
    digest = hashlib.sha256()
    for path in files:
        rel = path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else path.name
        digest.update(f"{rel} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _digest_file(tokenizer_path: Path) -> Path:
    return tokenizer_path.with_name(tokenizer_path.stem + _DIGEST_SUFFIX)


def train_tokenizer(out_path: str | Path, vocab_size: int = 8192, files: list[Path] | None = None) -> Path:
    """Train byte-level BPE on ``files`` (default: the training split) into ``out_path``.

    A tokenizer already there is reused when the JSON beside it records the same corpus digest
    and vocabulary size, so a rerun costs nothing; any other file there is replaced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UsageError(f"vocabulary size must be at least 257 (256 bytes and {EOT}), not {vocab_size}")
    out = Path(out_path)
    files = stdlib_files("train") if files is None else list(files)
    if not files:
        raise UsageError("no text files to train a tokenizer on")
    record = {"corpus": CORPUS, "files": len(files), "files_digest": files_digest(files), "vocab_size": vocab_size}
    meta = _digest_file(out)
    if out.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()) == record:
                return out
        except (OSError, ValueError):
            pass
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((read_text(p) for p in files), trainer=trainer, length=len(files))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, out)
    meta.write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_tokenizer(path: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` at ``path``; missing, unreadable or without ``<|endoftext|>``
    is a one-line usage error."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path}: not a readable tokenizer file ({first})") from None
    if tokenizer.token_to_id(EOT) is None:
        raise UsageError(f"{path}: the tokenizer has no {EOT} token to separate documents")
    return tokenizer


def _encoded(tokenizer: Any, tokenizer_path: Path, tokenizer_digest: str, files: list[Path], digest: str,
             split: str) -> list[np.ndarray]:
    """Each file's ids, read from the ``.npz`` beside the tokenizer when both digests match."""
    store = tokenizer_path.with_name(f"{tokenizer_path.stem}.{split}.{tokenizer_digest[:12]}.{digest[:12]}.npz")
    if store.is_file():
        try:
            with np.load(store) as saved:
                ids, lengths = saved["ids"], saved["lengths"]
            if len(lengths) == len(files) and int(lengths.sum()) == len(ids):
                return np.split(ids.astype(np.int64), np.cumsum(lengths)[:-1])
        except (OSError, ValueError, KeyError):
            pass
    docs = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch([read_text(p) for p in files])]
    lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    try:
        for stale in tokenizer_path.parent.glob(f"{tokenizer_path.stem}.{split}.*.npz"):
            stale.unlink()  # encodings by an earlier tokenizer or of another corpus
        tmp = store.with_name(store.name + ".tmp.npz")
        np.savez(tmp, ids=ids.astype(np.int32), lengths=lengths)
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only directory only costs the encoding next time
    return docs


def stdlib_rows(tokenizer: str | Path, length: int = 64, split: str = "train", max_rows: int | None = None) -> TokenRows:
    """The split's files encoded, joined with ``<|endoftext|>`` and cut into rows of ``length``.

    ``max_rows`` keeps that many rows evenly spaced over the whole split (every part of the
    library stays represented, and the choice needs no seed)."""
    _check_split(split)
    if length < 2:
        raise UsageError(f"sequence length must be at least 2, not {length}")
    if max_rows is not None and max_rows < 1:
        raise UsageError(f"max_rows must be at least 1, not {max_rows}")
    path = Path(tokenizer)
    tok = load_tokenizer(path)
    tokenizer_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    eot = int(tok.token_to_id(EOT))
    files = stdlib_files(split)
    digest = files_digest(files)
    docs = _encoded(tok, path, tokenizer_digest, files, digest, split)
    rows = pack_documents(docs, length, separator=eot)
    if max_rows is not None and max_rows < len(rows):
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    vocab = int(tok.get_vocab_size())
    info = {"corpus": CORPUS, "python": sys.version.split()[0], "split": split, "files": len(files),
            "files_digest": digest, "tokens": int(rows.size)}
    return TokenRows(torch.from_numpy(np.ascontiguousarray(rows)), info=info,
                     tokenizer={"name": f"byte-level-bpe-{vocab}", "digest": tokenizer_digest, "vocab_size": vocab,
                                "special_ids": {EOT: eot}},
                     packing={"method": "concat", "separator": eot, "documents": len(files), "length": length})
