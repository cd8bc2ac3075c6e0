"""export.json: what an export holds, where it came from, and what it left out and why.

No timestamps, so the same output exported with the same arguments gives the same bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from curate.export.base import Exporter, ExportOptions
from curate.export.common import ExportPolicy, SourceOutput
from curate.export.shards import FileEntry
from curate.manifest.build import package_versions

EXPORT_VERSION = 1
MANIFEST_FILE = "export.json"
EXAMPLES_PER_REASON = 5
VERSIONED = ("curate", "pyarrow", "pillow", "datasets")


@dataclass
class Tally:
    """Counts of one export run: rows read, outside the role, exported, skipped by reason (with examples)."""

    read: int = 0
    not_in_role: int = 0
    exported: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def skip(self, key: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"key": key, "detail": detail})

    @property
    def ok(self) -> bool:
        return self.read == self.not_in_role + self.exported + sum(self.skipped.values())


def build_manifest(fmt: str, policy: ExportPolicy, options: ExportOptions, source: SourceOutput, exporter: Exporter,
                   tally: Tally, files: list[FileEntry]) -> dict[str, Any]:
    """The export.json document."""
    return {
        "export_version": EXPORT_VERSION,
        "format": fmt,
        "role": policy.role,
        "rows": tally.exported,
        "images": exporter.images_written,
        "source": source.describe(),
        "caption_policy": policy.captions.describe(),
        "resolution": policy.resolution.describe() if policy.resolution else None,
        "options": options.describe(),
        "layout": exporter.describe(),
        "skipped": {
            "rows": sum(tally.skipped.values()),
            "by_reason": dict(sorted(tally.skipped.items())),
            "examples": {reason: tally.examples[reason] for reason in sorted(tally.examples)},
        },
        "reconciliation": {
            "read": tally.read,
            "not_in_role": tally.not_in_role,
            "exported": tally.exported,
            "skipped": sum(tally.skipped.values()),
            "ok": tally.ok,
        },
        "files": [entry.describe() for entry in files],
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries whose output bytes the export depends on."""
    return package_versions(VERSIONED)
