"""The manifest JSON Schema, the example manifest shipped beside it, and verify's checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from curate.manifest.validate import ManifestInvalid, validate_manifest

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@pytest.fixture(scope="module")
def example() -> dict:
    return json.loads((MANIFESTS / "example-demo.manifest.json").read_text())


def test_the_example_manifest_is_valid_and_reconciles(example):
    validate_manifest(example)
    totals = example["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == totals["output_rows"] + totals["dropped_rows"]
    assert sum(example["drop_log"]["by_reason"].values()) == totals["dropped_rows"]


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("recipe", "sha256"), "not-a-hash", "recipe/sha256"),
        (("outputs", "shards", 0, "rows"), -1, "outputs/shards/0/rows"),
        (("reconciliation", "ok"), "yes", "reconciliation/ok"),
        (("device", "accelerator"), "tpu", "device/accelerator"),
    ],
)
def test_a_broken_field_is_named(example, path, value, field):
    broken = copy.deepcopy(example)
    node = broken
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ManifestInvalid, match=field):
        validate_manifest(broken)


def test_a_missing_section_is_refused(example):
    broken = copy.deepcopy(example)
    del broken["drop_log"]
    with pytest.raises(ManifestInvalid, match="drop_log"):
        validate_manifest(broken)
