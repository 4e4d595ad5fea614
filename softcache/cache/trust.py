"""Which SPECs recorded in a cache or a weights file may run, decided from their text alone.

A SPEC the user types runs as typed. A SPEC read from a cache or from a weights file is data:
it runs only when it is one of :data:`RECORDED_TARGETS` (exact targets, checked as text before
anything is imported) or the user trusts it (:class:`Trust`); see :func:`spec_problems`. Nothing
here imports the code a SPEC names, nor torch, so ``validate`` can judge a cache it must not run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softcache.cache.manifest import DatasetSource, Manifest, Spec
from softcache.errors import CacheError, UsageError


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



RECORDED_TARGETS = frozenset({
    "softcache.digits:load",
    "softcache.models:teacher_cnn",
    "softcache.models:mlp",
    "softcache.models:tiny_cnn",
    "softcache.models:gpt",
    "softcache.hf:causal_lm",
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
    would run, so they must pass the same checks as there; a sequence cache's data SPECs never
    run (train reads its token rows from the cache), so they count as the teacher's does.
    ``trust`` defaults to the user's (``Trust.from_user``)."""
    trust = Trust.from_user() if trust is None else trust
    problems = []
    never_run = {"teacher"} | ({"source", "eval source"} if manifest.kind == "sequence" else set())
    for where, spec in recorded_specs(manifest):
        if where in never_run and spec.is_file():
            continue
        found, fixable = spec_problems(spec, trust)
        if where in never_run and fixable:
            continue
        problems += [f"{where} SPEC: {p}" for p in found]
    return problems
