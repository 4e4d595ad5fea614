"""Models and their weights: build a model from a SPEC, save and load safetensors files.

Weights are only ever read from safetensors, so loading a teacher never unpickles anything. A
weights file is itself a SPEC: its metadata names the architecture (``softcache.arch``) that
rebuilds the model, and :func:`save_model` writes that name so the file alone is enough in a new
process. That recorded architecture is data, checked by :mod:`softcache.cache.trust` before it runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from softcache.cache.location import Location, redact
from softcache.cache.manifest import Spec
from softcache.cache.trust import Trust, spec_problems
from softcache.errors import CacheError, SoftcacheError, UsageError
from softcache.spec import call_spec

ARCH_KEY = "softcache.arch"


def is_weights_file(target: str) -> bool:
    """A ``.safetensors`` path or URL (a presigned URL's query string does not hide the suffix)."""
    return (urlsplit(target).path if "://" in target else target).endswith(".safetensors")


def load_model(spec: Spec | str, *, trust: Trust | bool | None = None, arch: Spec | str | None = None) -> nn.Module:
    """Build a model from a SPEC; a ``.safetensors`` SPEC rebuilds its recorded architecture
    and loads the weights strictly.

    The architecture a weights file records is data: it runs only when it passes
    :func:`spec_problems` under ``trust`` (default: the user's, ``Trust.from_user``), unless the
    user names the architecture (``arch``, the CLI's ``--teacher-arch``)."""
    spec = Spec.parse(spec)
    if is_weights_file(spec.target):
        model = _load_safetensors_model(spec.target, Trust.from_user() if trust is None else trust, arch)
    else:
        model = call_spec(spec)
    if not isinstance(model, nn.Module):
        raise UsageError(f"spec {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@torch.no_grad()
def output_logits(output: object) -> torch.Tensor:
    """A model's logits: the tensor it returns, or the ``.logits`` of an output object (the
    Hugging Face convention)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise UsageError(f"the model returned {type(output).__name__}, not a tensor or an object with .logits")
    return logits


def probe_model(model: nn.Module, inputs: torch.Tensor, device: torch.device, what: str = "teacher") -> torch.Tensor:
    """The model's output on a couple of inputs; a model that cannot take them (wrong input
    shape or dtype for this data) is a one-line mismatch error, not a traceback."""
    try:
        out = model(inputs.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CacheError(f"{what} cannot run on inputs of shape {tuple(inputs.shape[1:])}: {first}") from None
    if not isinstance(getattr(out, "logits", out), torch.Tensor):
        raise UsageError(f"{what} returned {type(out).__name__}, expected a tensor of logits (batch, classes)")
    return output_logits(out)


def _load_safetensors_model(path: str, trust: Trust | bool, arch: Spec | str | None) -> nn.Module:
    from safetensors.torch import load as load_bytes

    where = redact(path)
    data = _read_bytes(path)
    try:
        tensors = load_bytes(data)
        metadata = _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"{where}: not a readable safetensors file ({exc})") from None
    if arch is not None:
        chosen = Spec.parse(arch)
    else:
        recorded = metadata.get(ARCH_KEY)
        if not recorded:
            raise UsageError(f"{where}: safetensors metadata has no {ARCH_KEY!r} entry naming the architecture")
        try:
            chosen = Spec.parse(recorded)
        except UsageError:
            raise UsageError(f"{where}: {ARCH_KEY} {recorded!r} is not a SPEC") from None
        problems, fixable = spec_problems(chosen, trust)
        if problems or chosen.is_file():
            module = chosen.target.partition(":")[0]
            remedy = (f"name the architecture yourself (--teacher-arch SPEC) or, if {module} is your own code, "
                      f"trust it (--trust-module {module})"
                      if fixable and not chosen.is_file() else "name the architecture yourself (--teacher-arch SPEC)")
            raise UsageError(f"{where}: refusing its {ARCH_KEY} {_one_line(recorded)!r}: a weights file does not choose "
                             f"code to run outside softcache's allowlist; {remedy}")
        _check_fits(chosen, tensors, where)
    model = load_model(chosen, trust=trust)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{where}: weights do not fit architecture {chosen}: {first}") from None
    return model


def _check_fits(arch: Spec, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Build the recorded architecture on the meta device (no memory) and compare its state
    with the file's tensors before building it for real, so an architecture recorded with huge
    sizes is refused instead of allocated."""
    try:
        with torch.device("meta"):
            skeleton = call_spec(arch)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    except SoftcacheError:
        raise
    except Exception:  # noqa: BLE001 - a trusted architecture that cannot be built on meta is built for real
        return
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        raise UsageError(f"{where}: weights do not fit architecture {arch}: first difference at {diff[0]!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header is 8 bytes of little-endian length then JSON; metadata sits in it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def _read_bytes(path: str) -> bytes:
    where = Location.of(path)
    if where.remote:
        with where.errors():  # one GET: a size probe first would turn a timeout into "not found"
            try:
                return bytes(where.fs.cat_file(where.path))
            except FileNotFoundError:
                raise UsageError(f"{where.redacted}: no such file") from None
    local = where.local_path
    if local is None or not local.is_file():
        raise UsageError(f"{where.redacted}: no such file")
    return local.read_bytes()


def save_model(model: nn.Module, path: str | Path, arch: Spec | str | None) -> Path:
    """Write weights as safetensors with the architecture SPEC in the metadata, so the file
    alone is a SPEC that rebuilds the model in a new process: after ``save_model(net,
    "teacher.safetensors", "mymodule:cnn,width=32")``, ``--teacher teacher.safetensors`` and
    ``load_model("teacher.safetensors")`` rebuild ``net``. ``arch=None`` (a model built by a
    function with no SPEC) records none: ``load_model(path, arch=...)`` then names it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={ARCH_KEY: str(Spec.parse(arch))} if arch is not None else None)
    return path


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict, keys sorted: the teacher's identity in the cache key."""
    return state_digest(model.state_dict())


class LaterDigest:
    """:func:`weights_digest` of a model as it is when this is made, computed later (``__call__``)
    in another thread while the model runs: a build hashes its teacher (24 ms for 27 MB of
    weights) beside the teacher's first calls instead of before them.

    Hashing reads the tensors a forward reads, which is safe. A forward that writes them (a
    persistent buffer changed in place) would leave a digest of neither state, and a cache whose
    labels came from weights other than those its manifest names. So every tensor's version
    counter, which in-place writes advance, is taken now; :meth:`check` (run after hashing, and
    by the build after every teacher call) refuses a change with a one-line CacheError. Writes
    the counters do not see (through ``.data``, or a tensor replaced by another) are not caught."""

    def __init__(self, model: nn.Module):
        self._state = model.state_dict()  # detached views: they share the tensors' storage and version counters
        self._versions = {key: value._version for key, value in self._state.items()}

    def __call__(self) -> str:
        value = state_digest(self._state)
        self.check()
        return value

    def check(self) -> None:
        changed = [key for key, tensor in self._state.items() if tensor._version != self._versions[key]]
        if changed:
            raise CacheError(f"the teacher changed its state while it labelled ({', '.join(map(repr, changed[:3]))} "
                             "written in place): a cache records one fixed teacher, so its forward must leave its "
                             "parameters and buffers as they are in eval mode")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        tensor = value.detach().cpu().contiguous()
        digest.update(json.dumps([str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():  # the tensor's own bytes, hashed in place (a copy would cost as much as the hash)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
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


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024,
            device: torch.device | None = None) -> torch.Tensor:
    """The predicted class of every input, in eval mode and in batches (bounded memory). With
    ``device`` the batches move there and the predictions come back to the CPU; without, they stay
    on the device the inputs are on. One home for students (stage 2) and teachers (stage 1)."""
    model.eval()
    parts = []
    for i in range(0, len(inputs), batch_size):
        batch = inputs[i : i + batch_size]
        parts.append(model(batch.to(device)).argmax(-1).cpu() if device is not None else model(batch).argmax(-1))
    return torch.cat(parts)
