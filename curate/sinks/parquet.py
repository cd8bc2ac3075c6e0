"""Parquet shards of the unified sample schema, readable by `datasets` as Image features."""

from __future__ import annotations

from typing import ClassVar, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curate import schema
from curate.sinks.base import Sink
from curate.stage import Params

MiB = 1 << 20


class ParquetParams(Params):
    """How Parquet shards are compressed and cut into row groups."""

    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    compression_level: int | None = None
    # In-memory bytes per row group; readers and the Hub viewer want row groups
    # well under 100 MB, so the ceiling leaves room for a sample past the cut.
    row_group_bytes: int = Field(default=64 * MiB, gt=0, le=80 * MiB)

    @model_validator(mode="after")
    def _level_needs_a_leveled_codec(self) -> "ParquetParams":
        if self.compression_level is not None and self.compression in ("snappy", "none"):
            raise ValueError(f"compression_level does not apply to compression {self.compression!r}")
        return self


class ParquetSink(Sink):
    """Writes SAMPLE_SCHEMA tables to one Parquet file with a page index."""

    name: ClassVar[str] = "parquet"
    Params: ClassVar[type[Params]] = ParquetParams
    extension: ClassVar[str] = ".parquet"

    def write(self, tables: Iterable[pa.Table], path: str) -> int:
        """Stream `tables` into `path`, one row group per `row_group_bytes`; return the row count."""
        rows = 0
        with pq.ParquetWriter(
            path,
            schema.parquet_schema(),
            compression=self.params.compression,
            compression_level=self.params.compression_level,
            write_page_index=True,
        ) as writer:
            for group in row_groups(tables, self.params.row_group_bytes):
                writer.write_table(group, row_group_size=group.num_rows)
                rows += group.num_rows
        return rows

    def count_rows(self, path: str) -> int:
        """The row count recorded in the file footer."""
        return pq.ParquetFile(path).metadata.num_rows


def row_groups(tables: Iterable[pa.Table], limit: int) -> Iterator[pa.Table]:
    """Regroup `tables` into consecutive tables of at most `limit` in-memory bytes each.

    A single sample larger than `limit` forms a row group of its own. Only the
    rows of the group being filled are held back.
    """
    pending: list[pa.Table] = []
    pending_bytes = 0
    for table in tables:
        start = 0
        for row, size in enumerate(row_sizes(table)):
            if pending_bytes + size > limit and (pending or row > start):
                if row > start:
                    pending.append(table.slice(start, row - start))
                yield pa.concat_tables(pending)
                pending, pending_bytes, start = [], 0, row
            pending_bytes += int(size)
        if table.num_rows > start:
            pending.append(table.slice(start))
    if pending:
        yield pa.concat_tables(pending)


def row_sizes(table: pa.Table) -> np.ndarray:
    """Approximate in-memory bytes of each row: its image bytes plus an even share of the rest."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    images = table.column("images").combine_chunks()
    image_bytes = pc.binary_length(pc.struct_field(images.flatten(), "bytes")).fill_null(0)
    per_row = np.bincount(
        pc.list_parent_indices(images).to_numpy(),
        weights=image_bytes.to_numpy(),
        minlength=table.num_rows,
    ).astype(np.int64)
    rest = max(table.nbytes - int(per_row.sum()), 0)
    return per_row + rest // table.num_rows
