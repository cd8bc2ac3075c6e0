"""The drop log (OUT/drops.parquet): every dropped sample, and every image removed from a kept document.

Rows (curate.schema.DROP_SCHEMA) are of two levels:

- **sample rows** (`image` null): a whole input row left out, by the stage and for the reason given.
  Only these count in "input rows = output rows + dropped rows" (`reconciliation.dropped_rows`,
  `drop_log.rows`, `drop_log.by_reason`).
- **image rows** (`image` set): an image removed from a document that was kept (fetch with
  `on_image_failure: drop_image`, the `documents` size rules, `image_text_assignment`). `key` is the
  document's, `url` the image's, `image` the position the image had in the document as the source
  built it. They are read from the kept documents' `meta.removed_images` when the log is assembled
  (`drop_log.image_rows`, `drop_log.images_by_reason`). Images removed from a document that a later
  stage dropped whole are not listed: the document's sample row stands for them (the stages' funnel
  counters `images_removed.<reason>` count every removal as it happened).

`url` of a sample row is the most specific locator of the input row (`input_locators`): a document's
page URL, else the first image URL, else `source.id` (an image folder's file path relative to the
folder, a shard's member, a dataset's row id). The blocklist stages' `redact_urls` blanks `source.id`
of the samples they drop too, so their rows keep only the key.

A drop log written before image rows existed has no `image` column: every row is a sample row. Every
reader goes through `sample_mask` / `iter_drops` / `conform_drops`, which treat it so.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema, storage
from curate.extract.document import IMAGES_REMOVED, load_meta, removed_counter
from curate.extract.document import KIND as DOCUMENT_KIND
from curate.files import RunLayout, atomic_path
from curate.redact import redact_drop_table

IMAGE = "image"  # DROP_SCHEMA column: the removed image's index in its document; null for a sample row
UNKNOWN = "unknown"  # stage / reason of a removed_images entry that does not name them
__all__ = ["IMAGE", "IMAGES_REMOVED", "removed_counter", "images_removed", "input_locators", "original_indices",
           "removed_image_rows", "conform_drops", "sample_mask", "sample_drops", "image_drops", "iter_drops",
           "read_drops", "count_rows", "write_drop_log"]


def images_removed(stage: dict[str, Any]) -> dict[str, int]:
    """reason -> images removed from documents, from a manifest `stages[]` entry's counters."""
    prefix = IMAGES_REMOVED + "."
    return {name[len(prefix):]: count for name, count in sorted((stage.get("counters") or {}).items())
            if name.startswith(prefix) and count}


# --------------------------------------------------------------------------- sample rows


def input_locators(table: pa.Table) -> list[str | None]:
    """The most specific locator of each row's input, the drop log's `url` of a dropped sample.

    An interleaved document: its page (`source.url`), else its first image URL. Any other sample: its
    first image URL, else `source.url`. Without any URL: `source.id` (for `image_folder` the path of the
    file relative to the folder; for stored images the shard member or row id).
    """
    kinds = table.column("kind").to_pylist() if "kind" in table.column_names else [None] * table.num_rows
    metas = table.column("image_meta").to_pylist()
    sources = table.column("source").to_pylist()
    locators = []
    for kind, meta, source in zip(kinds, metas, sources):
        source = source or {}
        image_url = next((m.get("url") for m in meta or [] if m and m.get("url")), None)
        if kind == DOCUMENT_KIND:
            url = source.get("url") or image_url
        else:
            url = ((meta[0] or {}).get("url") if meta else None) or source.get("url")
        locators.append(url or source.get("id"))
    return locators


# --------------------------------------------------------------------------- image rows


def original_indices(removed: list[dict[str, Any]]) -> list[int | None]:
    """The index each `meta.removed_images` entry's image had in the document as the source built it.

    Each stage records indices into the document as it found it, after earlier stages' removals; a
    stage's entries are consecutive and index the same document (a stage handles a document once).
    """
    gone: list[int] = []  # original indices removed by earlier stages, ascending
    result: list[int | None] = []
    start = 0
    while start < len(removed):
        end = start
        while end < len(removed) and _stage(removed[end]) == _stage(removed[start]):
            end += 1
        mapped = [_original(entry.get("index"), gone) for entry in removed[start:end]]
        result += mapped
        gone = sorted({*gone, *(index for index in mapped if index is not None)})
        start = end
    return result


def _stage(entry: Any) -> Any:
    return entry.get("stage") if isinstance(entry, dict) else None


def _original(index: Any, gone: list[int]) -> int | None:
    """The `index`-th image (from 0) that is not among `gone`."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return None
    for removed in gone:
        if removed > index:
            break
        index += 1
    return index


def removed_image_rows(table: pa.Table) -> pa.Table:
    """Image rows (DROP_SCHEMA) for the `meta.removed_images` of the kept samples in `table` (key, meta)."""
    metas = table.column("meta")
    candidates = table.filter(pc.fill_null(pc.match_substring(metas, '"removed_images"'), False))
    rows = []
    for key, meta in zip(candidates.column("key").to_pylist(), candidates.column("meta").to_pylist()):
        removed = load_meta(meta).get("removed_images")
        if not isinstance(removed, list):
            continue
        removed = [entry for entry in removed if isinstance(entry, dict)]
        for entry, index in zip(removed, original_indices(removed)):
            rows.append({"key": key, "url": _text(entry.get("url")), "stage": _text(entry.get("stage")) or UNKNOWN,
                         "reason": _text(entry.get("reason")) or UNKNOWN, "detail": _text(entry.get("detail")),
                         IMAGE: index if index is None or index < 2**31 else None})
    return pa.Table.from_pylist(rows, schema=schema.DROP_SCHEMA)


def _text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


# --------------------------------------------------------------------------- reading


def conform_drops(table: pa.Table) -> pa.Table:
    """`table` in DROP_SCHEMA; a drop log of before image rows (no `image` column) gets null (sample rows)."""
    if IMAGE not in table.column_names:
        table = table.append_column(IMAGE, pa.nulls(table.num_rows, pa.int32()))
    return table.select(schema.DROP_SCHEMA.names).cast(schema.DROP_SCHEMA)


def sample_mask(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """True for the rows of a drop log table that drop a whole sample (`image` null or absent)."""
    if IMAGE not in table.column_names:
        return pa.array([True] * table.num_rows, pa.bool_())
    return pc.is_null(table.column(IMAGE))


def sample_drops(table: pa.Table) -> pa.Table:
    """The sample rows of a drop log table."""
    return table.filter(sample_mask(table)) if IMAGE in table.column_names else table


def image_drops(table: pa.Table) -> pa.Table:
    """The image rows of a drop log table (none in a log of before image rows)."""
    if IMAGE not in table.column_names:
        return table.slice(0, 0)
    return table.filter(pc.is_valid(table.column(IMAGE)))


def iter_drops(file: Any, columns: list[str] | None = None, batch_size: int = 65_536) -> Iterator[pa.Table]:
    """The drop log `file` a record batch at a time, as tables of `columns` (all of DROP_SCHEMA by default).

    `image` is null-filled when the file has no such column (every row a sample row).
    """
    columns = list(columns or schema.DROP_SCHEMA.names)
    parquet = storage.parquet_file(file)
    present = set(parquet.schema_arrow.names)
    wanted = [name for name in columns if name in present]
    for batch in parquet.iter_batches(batch_size=batch_size, columns=wanted):
        table = pa.Table.from_batches([batch])
        if IMAGE in columns and IMAGE not in present:
            table = table.append_column(IMAGE, pa.nulls(table.num_rows, pa.int32()))
        yield table.select(columns)


def read_drops(file: Any) -> pa.Table:
    """The whole drop log `file` in DROP_SCHEMA (sample rows only, `image` null, for an old log)."""
    return conform_drops(storage.read_table(file))


def count_rows(file: Any) -> tuple[int, int]:
    """(sample rows, image rows) of the drop log `file`."""
    parquet = storage.parquet_file(file)
    if IMAGE not in parquet.schema_arrow.names:
        return parquet.metadata.num_rows, 0
    images = 0
    for batch in parquet.iter_batches(batch_size=65_536, columns=[IMAGE]):
        images += len(batch) - batch.column(0).null_count
    return parquet.metadata.num_rows - images, images


# --------------------------------------------------------------------------- writing


def write_drop_log(layout: RunLayout, phases: list[str], shards: int,
                   drops_file: Callable[[str, int], Any] | None = None) -> int:
    """Write OUT/drops.parquet; return its sample rows (the rows `reconciliation.dropped_rows` counts).

    Per work shard: its drops of every phase in order (`phases`: `input`, then the run's phases), then
    one image row per image removed from the shard's kept documents (read from the last phase's shard).
    `drops_file(phase, shard)` finds a step's drops (default: in `layout`).
    """
    drops_file = drops_file or layout.drops_file
    rows = 0
    with atomic_path(layout.drops) as temporary:
        with pq.ParquetWriter(temporary, schema.DROP_SCHEMA, compression="zstd") as writer:
            written = 0
            for shard in range(shards):
                for phase in phases:
                    table = conform_drops(storage.read_table(drops_file(phase, shard)))
                    table = redact_drop_table(table)  # no URL password, token or credential in the drop log
                    if table.num_rows:
                        writer.write_table(table)
                        rows += table.num_rows
                        written += table.num_rows
                kept = storage.parquet_file(layout.shard_file(phases[-1], shard))
                for batch in kept.iter_batches(batch_size=8192, columns=["key", "meta"]):
                    images = redact_drop_table(removed_image_rows(pa.Table.from_batches([batch])))
                    if images.num_rows:
                        writer.write_table(images)
                        written += images.num_rows
            if written == 0:
                writer.write_table(schema.empty_table(schema.DROP_SCHEMA))
    return rows
