"""Validate a manifest against manifests/manifest.schema.json."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

# curate/_bundled/manifests links to the project's manifests/ folder (copied into wheels).
SCHEMA_LOCATIONS = (Path(__file__).resolve().parent.parent / "_bundled" / "manifests" / "manifest.schema.json",)


class ManifestInvalid(ValueError):
    """A manifest does not match the manifest JSON Schema."""


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The manifest JSON Schema."""
    for location in SCHEMA_LOCATIONS:
        if location.is_file():
            return json.loads(location.read_text())
    raise FileNotFoundError(f"manifest schema not found in {[str(p) for p in SCHEMA_LOCATIONS]}")


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise ManifestInvalid naming the first offending field if `manifest` breaks the schema."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = next(iter(sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestInvalid(f"manifest field {where}: {error.message}")
