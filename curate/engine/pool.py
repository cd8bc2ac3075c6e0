"""The pool: the input split plus every per-sample stage's annotation table, one work shard at a time.

An annotation table has one row per row of its work shard, in the same order, so tables join by
position: `key`, the columns the stage provides (as they were after the stage), and

- `_annotated`: the stage computed this row (false when an earlier stage dropped it, or a gate
  before the stage did not let it through);
- `_reason`, `_detail`: the stage's hard drop (nothing left to annotate: a 404, not an image, a
  stage error, or any drop of a stage that has one step only);
- `_gate`: for a stage used as a gate, whether the row passed its criteria.

The view of a row at a step is the input row with each column taken from the latest stage before
the step that provides it and annotated the row. Image bytes are in the pool once: in the input
shard, or in the table of the latest stage that provides `images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema, storage

ANNOTATED, REASON, DETAIL, GATE = "_annotated", "_reason", "_detail", "_gate"
STATUS_FIELDS = [pa.field(ANNOTATED, pa.bool_()), pa.field(REASON, pa.string()), pa.field(DETAIL, pa.string()),
                 pa.field(GATE, pa.bool_())]


@dataclass(frozen=True)
class Provider:
    """An annotation table of one work shard: the stage's name, the columns it provides, and its file."""

    stage: str
    provides: tuple[str, ...]
    file: str


def annotation_schema(provides: tuple[str, ...]) -> pa.Schema:
    """The schema of a stage's annotation table."""
    columns = [schema.SAMPLE_SCHEMA.field("key")]
    columns += [schema.SAMPLE_SCHEMA.field(name) for name in schema.SAMPLE_SCHEMA.names if name in provides]
    return pa.schema(columns + STATUS_FIELDS)


def image_provider(providers: list[Provider]) -> Provider | None:
    """The table holding the pool's image bytes for this shard (None: the input shard holds them)."""
    return next((p for p in reversed(providers) if "images" in p.provides), None)


def without_image_bytes(table: pa.Table) -> pa.Table:
    """`table` with one placeholder per image (bytes and path null), so selection never holds image bytes."""
    counts = pc.fill_null(pc.list_value_length(table.column("image_meta")), 0)
    offsets = pa.array([0, *pc.cumulative_sum(counts).to_pylist()], pa.int32())
    element = schema.SAMPLE_SCHEMA.field("images").type.value_type
    count = offsets[-1].as_py()
    values = pa.StructArray.from_arrays([pa.nulls(count, f.type) for f in element], fields=list(element))
    images = pa.ListArray.from_arrays(offsets, values, type=schema.SAMPLE_SCHEMA.field("images").type)
    return table.set_column(table.schema.get_field_index("images"), "images", images)


class ShardView:
    """The rows of one work shard as seen after a list of annotation tables, read batch by batch.

    `with_images` reads the image bytes from where the pool holds them; without, every image is a
    placeholder (selection, which must not read bytes).
    """

    def __init__(self, input_file: str, providers: list[Provider], with_images: bool):
        self.input_file = input_file
        self.providers = providers
        self.with_images = with_images

    def _columns(self, provider: Provider | None) -> list[str] | None:
        names = schema.SAMPLE_SCHEMA.names if provider is None else ["key", *provider.provides, ANNOTATED,
                                                                    REASON, DETAIL, GATE]
        if self.with_images:
            return list(names)
        return [n for n in names if n != "images"]

    def batches(self, batch_rows: int) -> Iterator[tuple[pa.Table, pa.Array, dict[str, pa.Table]]]:
        """Yield (view batch, alive mask, stage -> annotation batch) per `batch_rows` rows of the shard.

        A row is alive when every earlier table that annotated it has no hard drop and it passed every gate.
        """
        readers = [fixed_batches(self.input_file, batch_rows, self._columns(None))]
        readers += [fixed_batches(p.file, batch_rows, self._columns(p)) for p in self.providers]
        for record_batches in zip(*readers):
            base = record_batches[0]
            if not self.with_images:
                base = base.append_column(schema.SAMPLE_SCHEMA.field("images"),
                                          pa.nulls(base.num_rows, schema.SAMPLE_SCHEMA.field("images").type))
            base = schema.conform(base)
            alive = pa.array([True] * base.num_rows, pa.bool_())
            tables: dict[str, pa.Table] = {}
            for provider, table in zip(self.providers, record_batches[1:]):
                if table.num_rows != base.num_rows:
                    raise RuntimeError(f"annotation table {provider.file} does not match its work shard")
                tables[provider.stage] = table
                base = overlay(base, table, provider.provides, self.with_images)
                alive = pc.and_(alive, table_alive(table))
            if not self.with_images:
                base = without_image_bytes(base)
            yield base, alive, tables


def fixed_batches(file: str, rows: int, columns: list[str] | None) -> Iterator[pa.Table]:
    """The rows of a Parquet file in tables of exactly `rows` rows (the last may be shorter), whatever its
    row groups, so that tables of the same work shard line up batch by batch."""
    pending: list[pa.RecordBatch] = []
    held = 0
    parquet = storage.parquet_file(file)
    for record_batch in parquet.iter_batches(batch_size=rows, columns=columns):
        pending.append(record_batch)
        held += record_batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def table_alive(table: pa.Table) -> pa.Array:
    """Rows an annotation table lets through to later stages: annotated, no hard drop, not stopped by a gate."""
    annotated = pc.fill_null(table.column(ANNOTATED), False)
    no_drop = pc.is_null(table.column(REASON))
    gate = pc.fill_null(table.column(GATE), True)
    return pc.and_(pc.and_(annotated, no_drop), gate).combine_chunks()


def overlay(base: pa.Table, table: pa.Table, provides: tuple[str, ...], with_images: bool = True) -> pa.Table:
    """`base` with each provided column taken from `table` where `table` annotated the row."""
    annotated = pc.fill_null(table.column(ANNOTATED), False)
    everyone = pc.all(annotated).as_py() is not False
    for name in provides:
        if name == "images" and not with_images:
            continue
        index = base.schema.get_field_index(name)
        # every row annotated: the table's column as it is, without copying (image bytes above all)
        merged = table.column(name) if everyone else pc.if_else(annotated, table.column(name), base.column(name))
        base = base.set_column(index, base.schema.field(index), merged)
    return base


def scatter(full_rows: int, positions: list[int], values: pa.Table, columns: list[str]) -> dict[str, pa.Array]:
    """Columns of `full_rows` rows holding `values`' rows at `positions` and nulls elsewhere."""
    take = [len(positions)] * full_rows
    for index, position in enumerate(positions):
        take[position] = index
    indices = pa.array(take, pa.int64())
    out = {}
    for name in columns:
        column = values.column(name).combine_chunks() if name in values.column_names else pa.nulls(
            len(positions), schema.SAMPLE_SCHEMA.field(name).type)
        padded = pa.concat_arrays([column, pa.nulls(1, column.type)])
        out[name] = padded.take(indices)
    return out


FORGOTTEN_IMAGE_FIELDS = ("url", "sha256", "pixel_sha256", "phash")


def forget_rows(table: pa.Table, keys: set[str]) -> pa.Table:
    """`table` (an input shard or annotation table) with what identifies the rows of `keys` blanked: image
    bytes, image URLs and hashes, the source's URL and id, captions and text. Keys and measurements stay."""
    positions = [i for i, key in enumerate(table.column("key").to_pylist()) if key in keys]
    if not positions:
        return table
    blank = set(positions)

    def rewrite(name: str, change) -> None:
        nonlocal table
        if name not in table.column_names:
            return
        index = table.schema.get_field_index(name)
        values = table.column(name).to_pylist()
        values = [change(v) if i in blank and v is not None else v for i, v in enumerate(values)]
        table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))

    rewrite("images", lambda images: None)
    rewrite("image_meta", lambda metas: [{**m, **dict.fromkeys(FORGOTTEN_IMAGE_FIELDS)} if m else m for m in metas])
    rewrite("source", lambda source: {**source, "url": None, "id": None})
    rewrite("captions", lambda captions: None)
    rewrite("segments", lambda segments: [{**s, "text": None} if s else s for s in segments])
    return table


def forget_in_pool(files: list[str], keys: set[str]) -> int:
    """Blank the rows of `keys` in every pool file of one work shard (rewritten atomically); return files changed."""
    from curate.files import write_table

    changed = 0
    for file in files:
        location = storage.location(file)
        if not location.exists():
            continue
        table = storage.read_table(file)
        forgotten = forget_rows(table, keys)
        if forgotten is not table:
            write_table(location, forgotten)
            changed += 1
    return changed
