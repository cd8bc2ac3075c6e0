"""Read existing dataset shards sample by sample: WebDataset tars and Parquet files with embedded images.

Tars are read member by member (plain tars seekable, `.tar.gz`/`.tgz`/`.tar.bz2`/`.tar.xz` as a
stream), holding one sample's members at a time. Members are grouped as in WebDataset: the key
is the member path up to the first dot of its file name, the extension the rest (lower-cased);
consecutive members with the same key form one sample.

A damaged tar never stops the reading. Past a broken header the reader looks for the next
valid one; a tar that ends early ends the reading. Bytes skipped this way (other than the
zero blocks of an archive end) are damage: the samples next to the damage (the one being read
and the one after it) come out with `damage` set, as they may be incomplete; a tar with no
readable sample at all gives one damaged group named after the file. Samples wholly inside a
damaged region cannot be seen and are not counted.

Parquet files are read one row group at a time in batches; a row group that cannot be read
gives one damaged record per row it holds (the count is in the file's footer).
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_ZERO_CHECK_CHUNK = 1 << 20


@dataclass
class TarSample:
    """The members of one sample: extension -> bytes (None for a member above the size limit).

    A tar without any readable sample gives one TarSample with an empty key and `damage` set.
    """

    key: str
    members: dict[str, bytes | None] = field(default_factory=dict)
    damage: str | None = None  # why the sample may be incomplete


@dataclass
class ParquetRecord:
    """One Parquet row (None when its row group could not be read) and its row number in the file."""

    row: int
    values: dict[str, Any] | None
    damage: str | None = None


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member name, or None for a name without an extension."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def tar_samples(path: str, max_member_bytes: int) -> Iterator[TarSample]:
    """The samples of the tar at `path`, in archive order (see the module docstring for damage)."""
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        compressed = raw.read(6).startswith(_COMPRESSED_MAGIC)
        raw.seek(0)
        reader = _TarReader(raw, size, compressed, max_member_bytes, os.path.basename(path))
        yield from reader.samples()


class _TarReader:
    """Walks one tar's members, tracking where each should start so that skipped bytes are seen."""

    def __init__(self, raw, size: int, compressed: bool, max_member_bytes: int, name: str):
        self.raw = raw
        self.size = size
        self.compressed = compressed
        self.max_member_bytes = max_member_bytes
        self.name = name
        self.expected = 0  # where the next header should start when nothing is skipped
        self.current: TarSample | None = None
        self.pending_damage: str | None = None  # damage that also concerns the next sample
        self.seen = 0

    def samples(self) -> Iterator[TarSample]:
        try:
            tar = tarfile.open(fileobj=self.raw, mode="r|*" if self.compressed else "r:", ignore_zeros=True)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            yield TarSample("", damage=f"{self.name}: not a readable tar: {_describe(error)}")
            return
        with tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                    yield from self._damage(f"{self.name}: unreadable after byte {self.expected}: {_describe(error)}",
                                            ends=True)
                    break
                tar.members = []  # tarfile keeps every member it read; keep memory bounded
                if info is None:
                    yield from self._check_end()
                    break
                if info.offset != self.expected and self._skipped_data(self.expected, info.offset):
                    yield from self._damage(f"{self.name}: bytes {self.expected}-{info.offset} are not a valid "
                                            "tar member", ends=False)
                self.expected = info.offset_data + -(-info.size // BLOCK) * BLOCK
                if not info.isfile():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if self.current is not None and self.current.key == key:
                    self.pending_damage = None  # damage inside the sample being read concerns only that sample
                if self.current is not None and self.current.key != key:
                    yield self._close()
                if self.current is None:
                    self.current = TarSample(key, damage=self.pending_damage)
                    self.pending_damage = None
                try:
                    self.current.members[ext] = self._read(tar, info)
                except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                    yield from self._damage(f"{self.name}: member {info.name} cannot be read: {_describe(error)}",
                                            ends=True)
                    break
        if self.current is not None:
            yield self._close()

    def _read(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
        if info.size > self.max_member_bytes:
            return None
        handle = tar.extractfile(info)
        return handle.read() if handle is not None else b""

    def _close(self) -> TarSample:
        sample, self.current = self.current, None
        self.seen += 1
        return sample

    def _damage(self, detail: str, ends: bool) -> Iterator[TarSample]:
        """Mark the sample being read, and (unless the tar ends here) the next one, as damaged."""
        if self.current is not None:
            self.current.damage = self.current.damage or detail
        if not ends:
            self.pending_damage = detail
        elif self.current is None and self.seen == 0:
            yield TarSample("", damage=detail)
            self.seen += 1

    def _check_end(self) -> Iterator[TarSample]:
        """At the archive's end: bytes after the last member other than zero blocks mean a cut or damaged tar."""
        if self.compressed:
            if self.pending_damage is not None:  # damage right before the end: nothing after it to mark
                yield from self._damage(self.pending_damage, ends=True)
            return
        if self.expected + BLOCK > self.size:
            yield from self._damage(f"{self.name}: cut off: no end-of-archive block after the last member "
                                    f"(which ends at byte {self.expected}, the file at {self.size})", ends=True)
        elif self._skipped_data(self.expected, self.size):
            yield from self._damage(f"{self.name}: bytes {self.expected}-{self.size} at the end are not "
                                    "a valid tar member (cut off or damaged)", ends=True)
        elif self.pending_damage is not None:
            yield from self._damage(self.pending_damage, ends=True)

    def _skipped_data(self, start: int, end: int) -> bool:
        """True when bytes start..end that the tar reader skipped hold data (not just zero blocks)."""
        if self.compressed:
            return True  # a compressed stream cannot be re-read; any skip is taken as damage
        if self._global_header_spans(start, end):
            return False
        position = start
        while position < end:
            chunk = os.pread(self.raw.fileno(), min(_ZERO_CHECK_CHUNK, end - position), position)
            if not chunk:
                return False
            if chunk.count(0) != len(chunk):
                return True
            position += len(chunk)
        return False

    def _global_header_spans(self, start: int, end: int) -> bool:
        """True when start..end is exactly a pax global header (tarfile reads it without making a member)."""
        try:
            header = tarfile.TarInfo.frombuf(os.pread(self.raw.fileno(), BLOCK, start), "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return False
        return header.type == tarfile.XGLTYPE and start + BLOCK + -(-header.size // BLOCK) * BLOCK == end


def parquet_records(path: str, columns: list[str] | None, batch_rows: int) -> Iterator[ParquetRecord]:
    """The rows of the Parquet file at `path`, one row group at a time (see the module docstring)."""
    name = os.path.basename(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        yield ParquetRecord(0, None, f"{name}: not a readable Parquet file: {_describe(error)}")
        return
    with parquet:
        row = 0
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            done = 0
            try:
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                    for values in batch.to_pylist():
                        yield ParquetRecord(row + done, values)
                        done += 1
            except (pa.ArrowException, OSError) as error:
                detail = f"{name}: row group {group} cannot be read: {_describe(error)}"
                for lost in range(done, group_rows):
                    yield ParquetRecord(row + lost, None, detail)
            row += group_rows


def parquet_columns(path: str) -> list[str]:
    """The column names of a Parquet file (raises pyarrow/OS errors for an unreadable one)."""
    with pq.ParquetFile(path) as parquet:
        return parquet.schema_arrow.names


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
