"""Deterministic shard writers of the exporters: Parquet files cut into row groups, and WebDataset tars.

Both start a new file every `rows_per_file` rows, name files by number, and describe what they
wrote as FileEntry records (path relative to the export folder, rows, bytes, sha256, row groups).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.files import sha256_file
from curate.sinks.wds_side_files import write_sizes
from curate.sinks.webdataset import TAR_FORMAT, add_member

MiB = 1 << 20
ROW_GROUP_BYTES = 64 * MiB  # in-memory ceiling of one row group (readers load a row group at a time)


@dataclass
class FileEntry:
    """One file of an export."""

    path: str  # relative to the export folder, with forward slashes
    rows: int
    bytes: int = 0
    sha256: str = ""
    row_groups: int | None = None

    def describe(self) -> dict[str, Any]:
        described = {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}
        if self.row_groups is not None:
            described["row_groups"] = self.row_groups
        return described


def finish_entry(root: Path, entry: FileEntry) -> FileEntry:
    """Fill in the size and sha256 of a written file."""
    file = root / entry.path
    entry.bytes = file.stat().st_size
    entry.sha256 = sha256_file(file)
    return entry


class ParquetShards:
    """Rows of one Arrow schema into `<folder>/part-NNNNN.parquet`, row groups of at most
    `row_group_rows` rows and about ROW_GROUP_BYTES bytes, `rows_per_file` rows per file."""

    def __init__(self, root: Path, folder: str, schema: pa.Schema, rows_per_file: int, row_group_rows: int,
                 row_group_bytes: int = ROW_GROUP_BYTES):
        self.root, self.folder, self.schema = root, folder, schema
        self.rows_per_file, self.row_group_rows, self.row_group_bytes = rows_per_file, row_group_rows, row_group_bytes
        self.entries: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0

    def add(self, row: dict[str, Any], nbytes: int) -> None:
        """Add one row of about `nbytes` bytes."""
        if self._writer is None:
            self._open()
        self._pending.append(row)
        self._pending_bytes += nbytes
        self.entries[-1].rows += 1
        if len(self._pending) >= self.row_group_rows or self._pending_bytes >= self.row_group_bytes:
            self._flush()
        if self.entries[-1].rows >= self.rows_per_file:
            self._close_file()

    def close(self) -> list[FileEntry]:
        """Finish the last file; the entries of every file written, with sizes and sha256."""
        if self._writer is not None:
            self._close_file()
        return [finish_entry(self.root, entry) for entry in self.entries]

    def _open(self) -> None:
        path = f"{self.folder}/part-{len(self.entries):05d}.parquet"
        (self.root / self.folder).mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.root / path, self.schema, compression="zstd", write_page_index=True)
        self.entries.append(FileEntry(path, 0, row_groups=0))

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_pylist(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
            self.entries[-1].row_groups += 1
        self._pending, self._pending_bytes = [], 0

    def _close_file(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None


class TarShards:
    """Samples (lists of (suffix, bytes) members) into `<folder>/shard-NNNNNN.tar`, `rows_per_file` per tar,
    and `sizes.json` (tar name -> samples) beside them."""

    def __init__(self, root: Path, folder: str, rows_per_file: int):
        self.root, self.folder, self.rows_per_file = root, folder, rows_per_file
        self.entries: list[FileEntry] = []
        self._tar: tarfile.TarFile | None = None

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members, contiguously."""
        if self._tar is None:
            path = f"{self.folder}/shard-{len(self.entries):06d}.tar".lstrip("/")
            (self.root / path).parent.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self.root / path, "w", format=TAR_FORMAT)
            self.entries.append(FileEntry(path, 0))
        for suffix, data in members:
            add_member(self._tar, f"{key}.{suffix}", data)
        self.entries[-1].rows += 1
        if self.entries[-1].rows >= self.rows_per_file:
            self._tar.close()
            self._tar = None

    def close(self) -> list[FileEntry]:
        """Finish the last tar; the entries of every tar written."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self.entries:  # open_clip_train reads the sample count of each tar here
            write_sizes(self.root, [{"path": entry.path, "rows": entry.rows} for entry in self.entries])
        return [finish_entry(self.root, entry) for entry in self.entries]
