from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from softcache.cache.manifest import SCHEMA_VERSION, Manifest, Spec
from softcache.cache.store import Cache
from softcache.errors import CacheError, UsageError
from softcache.schemas import render, schema_models

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_spec_round_trip_and_typed_values() -> None:
    spec = Spec.parse("softcache.models:mlp,hidden=32,name=x,flag=true")
    assert spec.target == "softcache.models:mlp"
    assert spec.kwargs == {"hidden": 32, "name": "x", "flag": True}
    assert Spec.parse(str(spec)) == spec


def test_spec_rejects_bare_words() -> None:
    with pytest.raises(UsageError, match="key=value"):
        Spec.parse("softcache.models:mlp,32")


@pytest.mark.parametrize(("text", "key", "what"), [
    ("mymodule:mlp,hidden=", "'hidden'", "has no value"),
    ("mymodule:mlp,depth=2,hidden= ", "'hidden'", "has no value"),
    ("mymodule:mlp,=32", "'=32'", "has no name"),
])
def test_spec_with_an_empty_keyword_is_one_line_naming_spec_and_key(text: str, key: str, what: str) -> None:
    with pytest.raises(UsageError) as refused:
        Spec.parse(text)
    message = str(refused.value)
    assert "\n" not in message and repr(text) in message and key in message and what in message


def test_spec_keeps_an_explicitly_empty_string() -> None:
    assert Spec.parse('mymodule:mlp,name=""').kwargs == {"name": ""}


def test_checked_in_schemas_match_models() -> None:
    """Fails when a model changes without `python -m softcache.schemas` being rerun."""
    for name, model in schema_models().items():
        path = SCHEMAS / f"{name}.schema.json"
        assert path.exists(), f"missing {path}"
        assert path.read_text() == render(model), f"{path.name} drifted from {model.__name__}"


def test_manifest_validates_against_schema(cache: Cache) -> None:
    schema = json.loads((SCHEMAS / "manifest.schema.json").read_text())
    jsonschema.validate(cache.manifest.to_json(), schema)
    broken = cache.manifest.to_json() | {"temperature": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_newer_schema_version_is_refused(cache: Cache) -> None:
    data = cache.manifest.to_json() | {"schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(CacheError, match="newer"):
        Manifest.from_json(data)


def test_invalid_manifest_is_one_line(cache: Cache) -> None:
    data = cache.manifest.to_json()
    del data["teacher"]
    with pytest.raises(CacheError) as info:
        Manifest.from_json(data)
    assert "teacher" in str(info.value) and "\n" not in str(info.value)
