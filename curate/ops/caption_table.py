"""A key -> caption table read from an external Parquet or JSON Lines file, for `caption_join`.

The file's two columns (join key, caption text) are read once, rows without a key or text are
left out, keys are sorted (a key listed twice keeps its first caption) and the result is saved as
an uncompressed Arrow IPC file in the run's work area. Each worker memory-maps that file, so the
table's pages are shared between the workers of a machine through the page cache instead of
being copied into every process; a lookup is a binary search (about log2(rows) key reads).

Memory: building needs the key and text bytes of the whole file in one process (about the size of
the two columns, e.g. ~1.5 GB for 10 million URLs with 100-character captions) plus the sort's
indices (8 bytes a row); workers then map the saved file. A file too large for one process must be
cut to the corpus's keys first (or split over several runs).
"""

from __future__ import annotations

import bisect
import fcntl
import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.files import atomic_path
from curate.stage import RecipeError

Format = Literal["auto", "parquet", "jsonl"]
TABLE_SCHEMA = pa.schema([("key", pa.large_string()), ("text", pa.large_string())])
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")
CHUNK_ROWS = 65_536


def join_files(path: Path, fmt: Format) -> tuple[list[Path], str]:
    """The files to read (a file, or a folder's files of the format, sorted) and their format."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if fmt == "auto":
            fmt = "parquet" if any(p.suffix == ".parquet" for p in files) else "jsonl"
        wanted = (".parquet",) if fmt == "parquet" else JSONL_SUFFIXES
        files = [p for p in files if p.name.endswith(wanted)]
    else:
        files = [path]
        if fmt == "auto":
            if path.name.endswith(".parquet"):
                fmt = "parquet"
            elif path.name.endswith(JSONL_SUFFIXES):
                fmt = "jsonl"
            else:
                raise RecipeError(f"cannot tell the format of {path.name}; set `format: parquet` or `format: jsonl`")
    if not files:
        raise RecipeError(f"no {fmt} files in {path}")
    return files, fmt


def check_columns(files: list[Path], fmt: str, key_column: str, text_column: str) -> None:
    """Raise RecipeError unless the first file has both columns (Parquet schema, or the first JSON line)."""
    if fmt == "parquet":
        try:
            names = set(pq.read_schema(files[0]).names)
        except (OSError, pa.ArrowException) as error:
            raise RecipeError(f"{files[0]} is not a readable Parquet file ({error})") from None
        where = "columns"
    else:
        record = next(_json_records(files[:1], strict=True), None)
        if record is None:
            raise RecipeError(f"{files[0]} holds no JSON object")
        names = set(record)
        where = "keys of its first line"
    missing = [c for c in (key_column, text_column) if c not in names]
    if missing:
        raise RecipeError(f"{files[0]} has no {' / '.join(missing)} (its {where}: {', '.join(sorted(names))})")


def identity(files: list[Path], fmt: str, key_column: str, text_column: str, lowercase: bool) -> str:
    """A name for the built table: the files (path, size, mtime) and how they are read."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    digest.update(f"{fmt}\0{key_column}\0{text_column}\0{lowercase}".encode())
    return digest.hexdigest()[:24]


def read_pairs(files: list[Path], fmt: str, key_column: str, text_column: str, lowercase: bool = False
               ) -> tuple[pa.Table, int]:
    """(key, text) rows of `files` with a key and non-blank text, and the count of JSON lines skipped as unreadable."""
    chunks: list[pa.Table] = []
    skipped = 0
    if fmt == "parquet":
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=CHUNK_ROWS, columns=[key_column, text_column]):
                chunks.append(_clean(batch.column(0), batch.column(1), lowercase))
    else:
        counter = [0]
        keys: list = []
        texts: list = []
        for record in _json_records(files, strict=False, skipped=counter):
            keys.append(record.get(key_column))
            texts.append(record.get(text_column))
            if len(keys) >= CHUNK_ROWS:
                chunks.append(_clean(_strings(keys), _strings(texts), lowercase))
                keys, texts = [], []
        chunks.append(_clean(_strings(keys), _strings(texts), lowercase))
        skipped = counter[0]
    return (pa.concat_tables(chunks) if chunks else TABLE_SCHEMA.empty_table()), skipped


def build_table(pairs: pa.Table) -> pa.Table:
    """Sort by key and keep each key's first row: the table `CaptionTable` searches."""
    if pairs.num_rows == 0:
        return TABLE_SCHEMA.empty_table()
    order = pc.sort_indices(pairs.column("key"))  # stable: equal keys keep their file order
    ordered = pairs.take(order).combine_chunks()
    keys = ordered.column("key").chunk(0)
    differs = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    keep = pa.concat_arrays([pa.array([True]), differs])
    return ordered.filter(keep).combine_chunks()


def save_table(table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """Write `table` as one uncompressed Arrow IPC record batch (mappable without copying)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        with pa.OSFile(str(temporary), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema.with_metadata(metadata)) as writer:
                writer.write_table(table, max_chunksize=max(1, table.num_rows))


def load_table(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """Memory-map a saved table; return it and its metadata."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    table = reader.read_all()
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table, metadata


def built_table(files: list[Path], fmt: str, key_column: str, text_column: str, lowercase: bool,
                folder: Path | None) -> tuple[pa.Table, dict[str, str]]:
    """The sorted table for these files: mapped from `folder` (built there once, under a lock), or in memory."""
    if folder is None:
        pairs, skipped = read_pairs(files, fmt, key_column, text_column, lowercase)
        return build_table(pairs), _metadata(files, pairs.num_rows, skipped)
    path = folder / f"{identity(files, fmt, key_column, text_column, lowercase)}.arrow"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{path.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker builds; the others wait, then map its file
            if not path.exists():
                pairs, skipped = read_pairs(files, fmt, key_column, text_column, lowercase)
                table = build_table(pairs)
                save_table(table, path, _metadata(files, pairs.num_rows, skipped))
                del pairs, table
    return load_table(path)


def _metadata(files: list[Path], rows_read: int, skipped: int) -> dict[str, str]:
    digest = hashlib.sha256()
    for file in files:
        digest.update(_sha256_file(file).encode())
    return {"sha256": _sha256_file(files[0]) if len(files) == 1 else digest.hexdigest(),
            "files": str(len(files)), "rows_read": str(rows_read), "skipped_lines": str(skipped)}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class CaptionTable:
    """Look captions up by key in a sorted, de-duplicated (key, text) table."""

    def __init__(self, table: pa.Table):
        table = table.combine_chunks() if table.num_rows else TABLE_SCHEMA.empty_table()
        self.rows = table.num_rows
        self._keys = table.column("key").chunk(0) if self.rows else pa.array([], pa.large_string())
        self._texts = table.column("text").chunk(0) if self.rows else pa.array([], pa.large_string())

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> str:  # the sequence bisect searches
        return self._keys[index].as_py()

    def get(self, key: str | None) -> str | None:
        """The caption of `key`, or None."""
        if key is None or self.rows == 0:
            return None
        index = bisect.bisect_left(self, key)
        if index < self.rows and self[index] == key:
            return self._texts[index].as_py()
        return None


def _strings(values: list) -> pa.Array:
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list))
                     else str(v) for v in values], pa.large_string())


def _clean(keys: pa.Array, texts: pa.Array, lowercase: bool) -> pa.Table:
    keys = pc.cast(keys, pa.large_string())
    texts = pc.utf8_trim_whitespace(pc.cast(texts, pa.large_string()))
    if lowercase:
        keys = pc.utf8_lower(keys)
    keep = pc.and_(pc.and_(pc.is_valid(keys), pc.is_valid(texts)), pc.greater(pc.utf8_length(texts), 0))
    return pa.table({"key": keys.filter(keep), "text": texts.filter(keep)}, schema=TABLE_SCHEMA)


def _json_records(files: list[Path], strict: bool, skipped: list[int] | None = None) -> Iterator[dict]:
    """JSON objects of JSON Lines files (gzip by suffix); a line that is not one is skipped and counted."""
    for file in files:
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    if strict:
                        raise RecipeError(f"{file} line {number} is not a JSON object")
                    if skipped is not None:
                        skipped[0] += 1
                    continue
                yield record
