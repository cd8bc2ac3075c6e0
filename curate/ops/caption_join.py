"""Join captions from an external file into a named caption variant (`caption_join`, phase prepare).

Recaptioned corpora (LAION-COCO, CapsFusion, PixelProse, ...) ship as Parquet or JSON Lines files
of (identifier, caption). This stage looks each sample up in such a file and writes the caption as
variant `name` (e.g. `dense`):

```yaml
caption_join:
  path: laion_coco.parquet   # a file or a folder of files; relative to the recipe
  on: url                    # key | url | sha256 | id
  column: URL                # the file's join column (default: the value of `on`)
  text_column: top_caption
  name: dense
```

`on` picks the sample's identifier: `key` (the sample key), `url` (image 0's URL as listed, else
source.url), `sha256` (of image 0's original bytes, `image_meta[0].sha256`; compared in lower
case) or `id` (`source.id`). Matching is exact. A sample without a match is kept without the
variant; the manifest's `captions` counts the output samples that have each variant. The table
is built once per run and memory-mapped by every worker (curate/ops/caption_table.py, which
states the memory cost); the file's sha256 and row counts are recorded in the manifest's
`models` (role `caption_table`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.ops import caption_table
from curate.ops.caption_variants import OnExisting, with_caption_variant
from curate.stage import Params, RecipeError, Stage

WORK_FOLDER = "caption_join"


class CaptionJoinParams(Params):
    """Which file to join, on what, and which caption variant to write."""

    path: str
    format: caption_table.Format = "auto"
    on: Literal["key", "url", "sha256", "id"] = "key"
    column: str | None = None  # the file's join column; default: the value of `on`
    text_column: str = "caption"
    name: str = Field("dense", min_length=1)  # the caption variant written
    on_existing: OnExisting = "replace"  # a sample that already has variant `name`: replace it or keep it


class CaptionJoin(Stage):
    """Writes caption variant `name` from an external (identifier, caption) file."""

    name = "caption_join"
    Params = CaptionJoinParams
    phase = "prepare"
    reads = frozenset({"source", "image_meta", "captions"})
    provides = frozenset({"captions"})
    reads_images = False
    annotation_params = frozenset(CaptionJoinParams.model_fields)
    selection_params = frozenset()

    @property
    def join_column(self) -> str:
        return self.params.column or self.params.on

    def _files(self) -> tuple[list[Path], str]:
        path = Path(os.path.expanduser(self.params.path))
        if not path.is_absolute():
            path = Path(self.context.recipe_dir) / path
        if not path.exists():
            raise RecipeError(f"no such file or folder: {path}", path=f"stages.{self.name}.path")
        try:
            return caption_table.join_files(path, self.params.format)
        except RecipeError as error:
            error.path = error.path or f"stages.{self.name}.path"
            raise

    def preflight(self) -> None:
        """Check the file exists and has the join and text columns (reading only its schema or first line)."""
        files, fmt = self._files()
        try:
            caption_table.check_columns(files, fmt, self.join_column, self.params.text_column)
        except RecipeError as error:
            error.path = error.path or f"stages.{self.name}.column"
            raise

    def setup(self) -> None:
        """Build (once per run) or map the sorted caption table."""
        files, fmt = self._files()
        folder = Path(self.context.work_dir) / WORK_FOLDER if self.context.work_dir else None
        table, self._table_info = caption_table.built_table(files, fmt, self.join_column, self.params.text_column,
                                                            self.params.on == "sha256", folder)
        self.table = caption_table.CaptionTable(table)

    def process(self, batch: pa.Table) -> pa.Table:
        if not hasattr(self, "table"):
            self.setup()
        texts = [self.table.get(key) for key in self._identifiers(batch)]
        self.count("matched", sum(text is not None for text in texts))
        self.count("unmatched", sum(text is None for text in texts))
        return with_caption_variant(batch, self.params.name, texts, self.params.on_existing)

    def _identifiers(self, batch: pa.Table) -> list[str | None]:
        on = self.params.on
        if on == "key":
            return batch.column("key").to_pylist()
        sources = batch.column("source").to_pylist()
        if on == "id":
            return [(s or {}).get("id") for s in sources]
        metas = batch.column("image_meta").to_pylist()
        first = [(m[0] if m else None) or {} for m in metas]
        if on == "sha256":
            return [m.get("sha256").lower() if m.get("sha256") else None for m in first]
        return [m.get("url") or (s or {}).get("url") for m, s in zip(first, sources)]

    def model_info(self) -> list[dict]:
        """The joined file as loaded (sha256, rows read, rows kept, unreadable lines), once a worker built it."""
        info = getattr(self, "_table_info", None)
        if info is None:
            return []
        return [{"stage": self.name, "role": "caption_table", "name": self.params.path, "sha256": info["sha256"],
                 "files": int(info["files"]), "rows_read": int(info["rows_read"]), "keys": self.table.rows,
                 "skipped_lines": int(info["skipped_lines"])}]
