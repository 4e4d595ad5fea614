"""Local Hugging Face checkpoints as softcache teachers and students, and local tokenizers.

``softcache.hf:causal_lm,path=DIR`` is a SPEC for a causal language model saved with
``save_pretrained``: a module mapping ``(batch, length)`` token ids to ``(batch, length, vocab)``
logits, what a sequence cache's teacher is and what a causal-LM student trains as. The target is
on the recorded allowlist (:mod:`softcache.cache.trust`), so a SPEC read from a cache or a weights
file may rebuild it; that is safe only because loading here never runs code from the checkpoint
and never reaches the network: ``local_files_only`` and ``trust_remote_code=False`` always, a
config with ``auto_map`` (custom modelling code) is refused before transformers sees it, and
weights come only from safetensors (no unpickling).

``transformers`` and ``tokenizers`` are imported inside the functions that need them, so
softcache imports without them (``pip install softcache[hf]`` installs both).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softcache.cache.location import file_digest
from softcache.errors import CacheError, UsageError

INSTALL_HINT = "pip install softcache[hf]"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keywords that would change how a checkpoint is loaded rather than what the model is: an
# override may only set a field the checkpoint's config already has.
_REFUSED_OVERRIDES = frozenset({"auto_map", "trust_remote_code", "code_revision"})


class CausalLM(nn.Module):
    """A transformers causal LM whose forward returns the logits tensor, not an output object.

    Its state dict is the wrapped model's under ``model.``, minus the second name of every tied
    parameter (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): safetensors refuses
    tensors that share memory, and :func:`softcache.weights.save_model` writes the state dict as
    it is. Loading puts the tied name back from its source, so strict loading still holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self._tied = _tied_names(model)
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_restore_tied)
        self.train(model.training)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def causal_lm(path: str, dtype: str = "float32", pretrained: bool = True, **overrides: Any) -> CausalLM:
    """The checkpoint in directory ``path`` as a :class:`CausalLM` in eval mode.

    ``overrides`` set fields of the checkpoint's config (``resid_pdrop=0.0`` for GPT-2); a field the config
    does not have is refused rather than silently ignored. ``pretrained=False`` builds the
    architecture from the config alone with fresh random weights (a student trained from
    scratch); then the directory needs no weights. Under ``torch.device("meta")`` only the
    skeleton is built, reading no weights, so :mod:`softcache.weights` can check a file's tensor
    shapes against the architecture before allocating anything."""
    transformers = _import("transformers")
    directory = _checkpoint_dir(path)
    torch_dtype = _dtype(dtype)
    if pretrained and not _has_safetensors(directory):
        raise _no_safetensors(directory)
    with _quiet(transformers):
        config = _config(transformers, directory, overrides)
        if pretrained and torch.get_default_device().type != "meta":
            model = _from_pretrained(transformers, directory, config, torch_dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config).to(torch_dtype)
    wrapped = CausalLM(model)
    wrapped.eval()
    return wrapped


def tokenizer(path: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` in ``path``: a ``tokenizer.json`` file, or a checkpoint
    directory holding one. Only the JSON is read: a tokenizer runs no code from its files."""
    tokenizers = _import("tokenizers")
    file = _tokenizer_file(path)
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own (Rust) exception types
        raise UsageError(f"{file}: not a readable tokenizers tokenizer.json ({_first_line(exc)})") from None


def tokenizer_info(path: str | Path) -> dict[str, Any]:
    """What a cache manifest records about the tokenizer its token ids come from
    (:class:`softcache.cache.manifest.TokenizerInfo`): a receiver can tell whether the
    tokenizer it holds is the same file (``digest``) and decode the rows with it.

    ``name`` is the checkpoint directory's name for a ``tokenizer.json``, otherwise the file's
    stem; ``special_ids`` maps each special token's text to its id."""
    file = _tokenizer_file(path)
    tok = tokenizer(file)
    specials = {added.content: int(i) for i, added in tok.get_added_tokens_decoder().items() if added.special}
    return {
        "name": file.parent.resolve().name if file.name == TOKENIZER_FILE else file.stem,
        "digest": file_digest(file),
        "vocab_size": int(tok.get_vocab_size(with_added_tokens=True)),
        "special_ids": dict(sorted(specials.items(), key=lambda item: item[1])),
    }


# --- checkpoint checks -------------------------------------------------------------------------


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(f"{name} is not installed; Hugging Face checkpoints and tokenizers need it: "
                         f"{INSTALL_HINT}") from None


def _checkpoint_dir(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise UsageError(f"causal_lm needs path=DIR, a local checkpoint directory, not {path!r}")
    if "://" in str(path):
        raise UsageError(f"{path}: Hugging Face checkpoints are read from a local directory only (nothing downloads)")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UsageError(f"{path}: no such checkpoint directory (a local directory written by save_pretrained; "
                         f"nothing downloads)")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    return directory


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _config(transformers: Any, directory: Path, overrides: Mapping[str, Any]) -> Any:
    """The checkpoint's config, refused when it asks for custom code, with ``overrides`` set."""
    raw = _read_json(directory / "config.json")
    if "auto_map" in raw:
        raise UsageError(f"{directory}: config.json has 'auto_map' (custom modelling code); softcache never runs "
                         f"code from a checkpoint: use a model type transformers ships")
    if not isinstance(raw.get("model_type"), str):
        raise UsageError(f"{directory}: config.json names no model_type")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{directory}: cannot read its config: {_first_line(exc)}") from None
    for key, value in overrides.items():
        if key in _REFUSED_OVERRIDES or key.startswith("_") or not hasattr(config, key):
            raise UsageError(f"causal_lm: {key!r} is not a field of {directory}'s config ({type(config).__name__})")
        setattr(config, key, value)
    return config


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{file}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file}: expected a JSON object")
    return data


def _has_safetensors(directory: Path) -> bool:
    return any((directory / name).is_file() for name in SAFETENSORS_FILES)


def _no_safetensors(directory: Path) -> UsageError:
    return UsageError(f"{directory}: no safetensors weights ({' or '.join(SAFETENSORS_FILES)}); softcache does not "
                      f"unpickle .bin checkpoints: re-save with save_pretrained(dir, safe_serialization=True)")


def _from_pretrained(transformers: Any, directory: Path, config: Any, torch_dtype: torch.dtype) -> nn.Module:
    """Load the weights, refusing a checkpoint that leaves any of the model's weights unset
    (missing, or of another shape than the config asks): transformers would fill them at random
    and only log it, a silently broken teacher."""
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            output_loading_info=True, ignore_mismatched_sizes=True, **{_dtype_keyword(transformers): torch_dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CacheError(f"{directory}: cannot load the checkpoint: {_first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if missing or mismatched:
        first = f"{missing[0]!r} is missing" if missing else _mismatch(mismatched[0])
        raise CacheError(f"{directory}: the weights do not cover the model ({len(missing)} missing, "
                         f"{len(mismatched)} of another shape; {first})")
    return model


def _dtype_keyword(transformers: Any) -> str:
    """``dtype`` from transformers 4.56; older releases take ``torch_dtype`` and would pass an
    unknown ``dtype`` on to the config, loading in float32 without a word."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _mismatch(entry: Any) -> str:
    """transformers reports a size mismatch as (name, checkpoint shape, model shape)."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        name, stored, wanted = entry
        return f"{name!r} is {list(stored)} in the checkpoint, {list(wanted)} in the model"
    return f"{entry!r} is of another shape"


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No transformers progress bar or load report while loading: softcache reports its own
    progress, and a checkpoint it refuses is one line (:func:`_from_pretrained`), not a table."""
    logging = transformers.utils.logging
    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _tokenizer_file(path: str | Path) -> Path:
    target = Path(path).expanduser()
    file = target / TOKENIZER_FILE if target.is_dir() else target
    if not file.is_file():
        where = f"{target} has no {TOKENIZER_FILE}" if target.is_dir() else f"{target}: no such tokenizer file"
        raise UsageError(where)
    return file


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- tied parameters ---------------------------------------------------------------------------


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name beyond the first that refers to the same tensor -> that first name."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(param), name)
        if source != name:
            tied[f"model.{name}"] = f"model.{source}"
    return tied


def _drop_tied(module: CausalLM, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in module._tied:
        state_dict.pop(prefix + name, None)


def _restore_tied(module: CausalLM, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                  missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    for name, source in module._tied.items():
        if prefix + source in state_dict and prefix + name not in state_dict:
            state_dict[prefix + name] = state_dict[prefix + source]
