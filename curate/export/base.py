"""The exporter contract: turn samples of one role into the files of one trainer format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from curate.export.common import ExportPolicy
from curate.export.shards import FileEntry

DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class ExportOptions:
    """How an export is cut and worded (the role's policy comes from the output's recipe)."""

    shard_rows: int = 10_000  # samples per Parquet file / tar
    row_group_rows: int = 1_000  # rows per Parquet row group (also capped at 64 MiB in memory)
    pairs_as_documents: bool = False  # obelics: export pairs as two-element documents (image, caption)
    prompt: str = DEFAULT_PROMPT  # llava: the human turn after "<image>\n"
    workers: int = 2  # threads decoding, resizing and encoding images

    def __post_init__(self) -> None:
        for name in ("shard_rows", "row_group_rows", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def describe(self) -> dict[str, Any]:
        return {"shard_rows": self.shard_rows, "row_group_rows": self.row_group_rows,
                "pairs_as_documents": self.pairs_as_documents, "prompt": self.prompt}


@dataclass(frozen=True)
class ExportContext:
    """Where an exporter writes and what it applies."""

    root: Path  # the folder being written (renamed to `final` when the export succeeds)
    final: Path  # the export folder's final, absolute path
    policy: ExportPolicy
    options: ExportOptions


class Exporter:
    """Writes samples in one trainer format.

    `prepare` does the per-sample work (images, captions) and may run on several threads at once;
    it raises Skip for a sample the format cannot take. `write` receives the prepared samples in
    input order on one thread. `finish` closes the files and returns their entries.
    """

    name: ClassVar[str]

    def __init__(self, context: ExportContext):
        self.context = context
        self.policy = context.policy
        self.options = context.options
        self.images_written = 0

    def prepare(self, row: dict[str, Any]) -> Any:
        raise NotImplementedError

    def write(self, prepared: Any) -> None:
        raise NotImplementedError

    def finish(self) -> list[FileEntry]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for export.json (layout, how to read it)."""
        return {}
