"""Turning SPECs into live objects: models, datasets, augmentations.

A SPEC is ``package.module:callable`` plus keyword arguments, called to produce the object (or a
``.safetensors`` file whose metadata names its architecture SPEC: see :mod:`softcache.weights`).
Whether a SPEC read from a cache may run at all is decided first, as text, by
:mod:`softcache.cache.trust`; this module only runs what has been allowed.
"""

from __future__ import annotations

import importlib
from typing import Any

from softcache.cache.manifest import Spec
from softcache.cache.trust import split_target
from softcache.errors import UsageError


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
