"""Turning SPECs into live objects: models, datasets, augmentations.

A SPEC is either ``package.module:callable`` plus keyword arguments, called to produce the
object, or a ``.safetensors`` file whose metadata names its architecture SPEC. Weights are only
ever read from safetensors, so loading a teacher never unpickles anything.

A SPEC the user types runs as typed. A SPEC read from a cache or from a weights file is data:
it runs only when it is one of :data:`RECORDED_TARGETS` (exact targets, checked as text before
anything is imported) or the user trusts it (:class:`Trust`); see :func:`spec_problems`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from softcache.errors import CacheError, SoftcacheError, UsageError
from softcache.cache.location import Location, redact
from softcache.cache.manifest import DatasetSource, Manifest, Spec

ARCH_KEY = "softcache.arch"


def split_target(target: str) -> tuple[str, str]:
    """``package.module:function`` as (module, function), refusing anything else.

    The function is one name, looked up directly on the module: no attribute paths such as
    ``module:np.load``, so a SPEC reaches only what the module itself defines or imports under
    that exact name. This holds for every SPEC, typed or recorded; write a module-level
    function for anything deeper."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise UsageError(f"spec {target!r} is not 'package.module:callable' nor a .safetensors file")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise UsageError(f"spec {target!r}: {module_name!r} is not a module name")
    if not attr.isidentifier():
        raise UsageError(f"spec {target!r}: {attr!r} is not a plain function name (attribute paths are not followed)")
    return module_name, attr


def call_spec(spec: Spec | str, **extra: Any) -> Any:
    """Import ``module:callable`` and call it with the spec's keyword arguments."""
    spec = Spec.parse(spec)
    module_name, attr = split_target(spec.target)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for spec {spec.target!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UsageError(f"{module_name!r} has no attribute {attr!r} (spec {spec.target!r})")
    if not callable(obj):
        raise UsageError(f"spec {spec.target!r} does not name a callable")
    try:
        return obj(**spec.kwargs, **extra)
    except TypeError as exc:
        raise UsageError(f"spec {spec}: {exc}") from None


# --- what a cache or a weights file may name ------------------------------------------------

RECORDED_TARGETS = frozenset({
    "softcache.digits:load",
    "softcache.models:teacher_cnn",
    "softcache.models:mlp",
    "softcache.models:tiny_cnn",
    "softcache.augment:compose",
    "softcache.augment:random_resized_crop",
    "softcache.augment:hflip",
    "softcache.augment:shift",
    "softcache.augment:mixup",
    "softcache.augment:cutmix",
})
"""The exact ``module:function`` targets a SPEC recorded in a cache (dataset, augmentation) or
in a weights file (``softcache.arch``) may name and have run on its own say-so: they only build
the embedded data, the reference models and the replayable augmentations. Anything else runs
only when the user names it: the SPEC itself (``--data``, ``--eval-data``, ``--student``,
``--teacher-arch``), a module the user trusts (:class:`Trust`), or ``--trust-cache-specs``."""

TRUSTED_MODULES_ENV = "SOFTCACHE_TRUSTED_MODULES"
PYPROJECT_TABLE = ("tool", "softcache", "trusted-modules")

_SPEC_LIKE = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]|\.safetensors\b", re.IGNORECASE)
"""A keyword value that could itself be run as a SPEC (``os:system``, ``other.safetensors``)."""


@dataclass(frozen=True)
class TrustedModule:
    name: str
    source: str
    """Where the user named it: ``--trust-module``, ``$SOFTCACHE_TRUSTED_MODULES`` or a
    ``pyproject.toml`` path; never the cache."""


@dataclass(frozen=True)
class Trust:
    """What the user, never the cache, allows recorded SPECs to run beyond :data:`RECORDED_TARGETS`.

    ``modules``: functions of these exact modules (not their submodules) may be named by a cache
    or weights file, e.g. the user's own data and model code. ``specs``: exact SPECs the user
    named elsewhere (a pipeline's own augmentation). ``cache_specs``: ``--trust-cache-specs``,
    run whatever a cache records, as if typed."""

    modules: tuple[TrustedModule, ...] = ()
    specs: tuple[str, ...] = ()
    cache_specs: bool = False

    @classmethod
    def from_user(cls, modules: Iterable[str] = (), *, cache_specs: bool = False, specs: Iterable[Spec | str] = (),
                  env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Trust:
        """The trust in effect: ``modules`` (``--trust-module``), then ``$SOFTCACHE_TRUSTED_MODULES``
        (comma-separated, per user), then ``[tool.softcache] trusted-modules`` in the working
        directory's ``pyproject.toml`` (per project)."""
        env = os.environ if env is None else env
        named = [TrustedModule(m, "--trust-module") for m in modules]
        named += [TrustedModule(m, f"${TRUSTED_MODULES_ENV}") for m in re.split(r"[,\s]+", env.get(TRUSTED_MODULES_ENV, ""))]
        named += _pyproject_modules(Path.cwd() if cwd is None else Path(cwd))
        kept: dict[str, TrustedModule] = {}
        for module in named:
            if not module.name:
                continue
            if not all(part.isidentifier() for part in module.name.split(".")):
                raise UsageError(f"trusted module {module.name!r} (from {module.source}) is not a module name")
            kept.setdefault(module.name, module)
        return cls(tuple(kept.values()), tuple(str(Spec.parse(s)) for s in specs), cache_specs)

    def with_cache_specs(self, on: bool) -> Trust:
        return Trust(self.modules, self.specs, self.cache_specs or on)

    def with_specs(self, specs: Iterable[Spec | str]) -> Trust:
        return Trust(self.modules, self.specs + tuple(str(Spec.parse(s)) for s in specs), self.cache_specs)

    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows: the allowlist is fixed; these are the user's additions."""
        return {"modules": [{"module": m.name, "from": m.source} for m in self.modules],
                "trust_cache_specs": self.cache_specs}


def _pyproject_modules(cwd: Path) -> list[TrustedModule]:
    path = cwd / "pyproject.toml"
    if not path.is_file():
        return []
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        table: Any = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it for {'.'.join(PYPROJECT_TABLE)}: {exc}") from None
    for key in PYPROJECT_TABLE:
        table = table.get(key) if isinstance(table, dict) else None
    if table is None:
        return []
    if not isinstance(table, list) or not all(isinstance(m, str) for m in table):
        raise UsageError(f"{path}: {'.'.join(PYPROJECT_TABLE)} must be a list of module names")
    return [TrustedModule(m.strip(), str(path)) for m in table]


def spec_problems(spec: Spec | Any, trust: Trust | bool = False) -> tuple[list[str], bool]:
    """Why a SPEC read from a cache or a weights file may not run: ``(problems, fixable)``.

    Pure string checks, nothing is imported. ``fixable`` is False when the SPEC is malformed or
    hostile whatever the user trusts (an attribute path, a keyword that is itself a SPEC), True
    when it is well formed but names code outside the allowlist and the user's trust."""
    trust = Trust(cache_specs=trust) if isinstance(trust, bool) else trust
    if not isinstance(spec, Spec):
        try:
            spec = Spec.model_validate(spec)
        except ValueError:
            return [f"{spec!r} is not a SPEC"], False
    try:
        module, _ = split_target(spec.target)
    except UsageError as exc:
        return [str(exc)], False
    if trust.cache_specs:
        return [], True
    bad = [f"keyword {k!r}: {why}" for k, v in spec.kwargs.items() for why in _kwarg_problems(k, v)]
    if bad:
        return [f"{spec.target}: " + "; ".join(bad)], False
    allowed = spec.target in RECORDED_TARGETS or str(spec) in trust.specs or \
        (module in trust.module_names() and not spec.target.partition(":")[2].startswith("_"))
    return ([] if allowed else [f"{spec} is code outside softcache's allowlist and the modules you trust"]), True


def _kwarg_problems(key: str, value: Any) -> list[str]:
    """Recorded keyword arguments are data for a known function: JSON scalars or flat lists of
    them, and no string that names code (which a function taking a SPEC would run)."""
    problems = [] if key.isidentifier() and not key.startswith("_") else ["not a plain keyword name"]
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in values) or isinstance(value, dict):
        problems.append("only numbers, strings, booleans, null or flat lists of them are accepted")
    elif any(isinstance(v, str) and _SPEC_LIKE.search(v) for v in values):
        problems.append(f"{value!r} names code (a SPEC or weights file) in a keyword argument")
    return problems


def check_recorded(spec: Spec, what: str, how: str, trust: Trust | bool) -> Spec:
    """Allow a SPEC read from a cache to run only if it is on the allowlist or the user trusts it;
    ``how`` says what the user can pass instead (e.g. ``pass --data SPEC``)."""
    require_trusted([(what, spec, how)], trust)
    return spec


def require_trusted(runs: Sequence[tuple[str, Spec, str]], trust: Trust | bool) -> None:
    """Refuse, in one line naming every remedy, the recorded SPECs of ``runs`` (what, SPEC, how
    to replace it) that may not run: a user learns everything to pass from a single error."""
    refused: list[tuple[str, Spec, str]] = []
    for what, spec, how in runs:
        problems, fixable = spec_problems(spec, trust)
        if problems and not fixable:
            raise CacheError(f"the cache records {what} {spec.target!r} that softcache refuses to run: {problems[0]}")
        if problems:
            refused.append((what, spec, how))
    if not refused:
        return
    named = ", ".join(f"{what} {spec}" + (f" ({how})" if how else "") for what, spec, how in refused)
    modules = " ".join(sorted({f"--trust-module {spec.target.partition(':')[0]}" for _, spec, _ in refused}))
    raise UsageError(f"the cache records code outside softcache's allowlist: {named}; a cache never runs code it "
                     f"names unless you do: pass that yourself, trust the module if it is your own code ({modules}), "
                     "or pass --trust-cache-specs")


def recorded_specs(manifest: Manifest) -> list[tuple[str, Spec]]:
    """Every SPEC a manifest records, with where: teacher, source, eval source, view augmentation."""
    found = [("teacher", manifest.teacher.spec)]
    if isinstance(manifest.source, DatasetSource):
        found.append(("source", manifest.source.spec))
    if manifest.eval is not None:
        found.append(("eval source", manifest.eval.source.spec))
    found.append(("view augmentation", manifest.views.augment))
    return [(where, spec) for where, spec in found if spec is not None]


def recorded_spec_problems(manifest: Manifest, trust: Trust | None = None) -> list[str]:
    """What ``validate`` reports about the code a cache names, without importing anything.

    The teacher SPEC never runs from a cache: only a user rebuilding the cache runs it, naming it
    themselves. So a weights file or a well-formed SPEC of the user's own there is fine, and only
    a malformed or hostile one is reported. The data and augmentation SPECs are what ``train``
    would run, so they must pass the same checks as there. ``trust`` defaults to the user's
    (``Trust.from_user``)."""
    trust = Trust.from_user() if trust is None else trust
    problems = []
    for where, spec in recorded_specs(manifest):
        if where == "teacher" and spec.is_file():
            continue
        found, fixable = spec_problems(spec, trust)
        if where == "teacher" and fixable:
            continue
        problems += [f"{where} SPEC: {p}" for p in found]
    return problems


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
