"""Turning SPECs into live objects: models, datasets, augmentations.

A SPEC is either ``package.module:callable`` plus keyword arguments, called to produce the
object, or a ``.safetensors`` file whose metadata names its architecture SPEC. Weights are only
ever read from safetensors, so loading a teacher never unpickles anything.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CacheError, UsageError
from .manifest import Spec

ARCH_KEY = "softcache.arch"


def call_spec(spec: Spec | str, **extra: Any) -> Any:
    """Import ``module:callable`` and call it with the spec's keyword arguments."""
    spec = Spec.parse(spec)
    if ":" not in spec.target:
        raise UsageError(f"spec {spec.target!r} is not 'package.module:callable' nor a .safetensors file")
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for spec {spec.target!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name!r} has no attribute {attr!r} (spec {spec.target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"spec {spec.target!r} does not name a callable")
    try:
        return obj(**spec.kwargs, **extra)
    except TypeError as exc:
        raise UsageError(f"spec {spec}: {exc}") from None


RECORDED_SAFE_MODULES = ("softcache.digits", "softcache.models", "softcache.augment")
"""Modules whose callables a cache may name and have run without the user naming them too:
they only build data, models and augmentations. Anything else recorded in a cache runs only
when the user passes it explicitly or trusts the cache, since a cache is someone else's file."""


def check_recorded(spec: Spec, what: str, how: str, trust: bool) -> Spec:
    """Allow a SPEC read from a cache to run only if it is one of softcache's own or trusted."""
    module = spec.target.partition(":")[0]
    if trust or module in RECORDED_SAFE_MODULES:
        return spec
    raise UsageError(f"the cache records {what} {spec}, code outside softcache: a cache never runs code it names "
                     f"unless you do; {how}, or pass --trust-cache-specs")


def load_model(spec: Spec | str) -> nn.Module:
    """Build a model from a SPEC; a ``.safetensors`` SPEC rebuilds its recorded architecture
    and loads the weights strictly."""
    spec = Spec.parse(spec)
    if spec.target.endswith(".safetensors"):
        model = _load_safetensors_model(spec.target)
    else:
        model = call_spec(spec)
    if not isinstance(model, nn.Module):
        raise UsageError(f"spec {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@torch.no_grad()
def probe_model(model: nn.Module, inputs: torch.Tensor, device: torch.device, what: str = "teacher") -> torch.Tensor:
    """The model's output on a couple of inputs; a model that cannot take them (wrong input
    shape or dtype for this data) is a one-line mismatch error, not a traceback."""
    try:
        out = model(inputs.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CacheError(f"{what} cannot run on inputs of shape {tuple(inputs.shape[1:])}: {first}") from None
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"{what} returned {type(out).__name__}, expected a tensor of logits (batch, classes)")
    return out


def _load_safetensors_model(path: str) -> nn.Module:
    from safetensors.torch import load as load_bytes

    data = _read_bytes(path)
    try:
        tensors = load_bytes(data)
        metadata = _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    arch = metadata.get(ARCH_KEY)
    if not arch:
        raise UsageError(f"{path}: safetensors metadata has no {ARCH_KEY!r} entry naming the architecture")
    model = load_model(arch)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path}: weights do not fit architecture {arch}: {first}") from None
    return model


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header is 8 bytes of little-endian length then JSON; metadata sits in it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def _read_bytes(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return handle.read()
    local = Path(path.removeprefix("file://"))
    if not local.is_file():
        raise UsageError(f"{path}: no such file")
    return local.read_bytes()


def save_model(model: nn.Module, path: str | Path, arch: Spec | str) -> Path:
    """Write weights as safetensors with the architecture SPEC in the metadata, so the file
    alone is a SPEC that rebuilds the model in a new process."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={ARCH_KEY: str(Spec.parse(arch))})
    return path


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        tensor = value.detach().cpu().contiguous()
        digest.update(json.dumps([str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str | None) -> torch.device:
    """CUDA when present unless told otherwise; an unknown or absent device is a usage error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available")
    return dev
