"""JSON Schemas generated from the Pydantic models, checked in under ``schemas/``.

Other teams validate manifests and pipeline files with any JSON Schema validator; a test
regenerates these and fails when the checked-in files drift from the models.
Run ``python -m softcache.schemas [DIR]`` to rewrite them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from softcache.config import StudentConfig, TrainConfig
from softcache.cache.manifest import Manifest
from softcache.pipeline.config import PipelineConfig


def schema_models() -> dict[str, type[BaseModel]]:
    """File name (without ``.schema.json``) -> model."""
    return {"manifest": Manifest, "student": StudentConfig, "train": TrainConfig, "pipeline": PipelineConfig}


def render(model: type[BaseModel]) -> str:
    schema: dict[str, Any] = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"softcache/{model.__name__}"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in schema_models().items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(model))
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "schemas"
    for p in write(target):
        print(p)
