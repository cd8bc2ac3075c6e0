"""A list of image URLs, with optional captions and extra columns, in Parquet, CSV, TSV or JSON Lines.

Each input row becomes one `pair` sample whose image is still to be fetched. The
file is streamed (Parquet by record batches, CSV/TSV with Arrow's streaming
reader, JSON Lines line by line), so memory stays bounded whatever its size.
The file may be local or in a store (`s3://bucket/urls.parquet`, see curate/storage.py).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.csv as pacsv

from curate import storage
from curate.schema import from_rows, sample_key
from curate.sources.base import Source
from curate.stage import Params, RecipeError, with_drops

MISSING_URL = "missing_url"
BAD_INPUT_ROW = "bad_input_row"

# Extension (before an optional `.gz`) -> format.
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_GZIP_OK = {"csv", "tsv", "jsonl"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}
_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")
_CSV_BLOCK_BYTES = 16 << 20  # a CSV row (a long caption) must fit in one block
_JSONL_HEADER_LINES = 100  # preflight looks this far for a first readable JSON object


class UrlListParams(Params):
    """Where the URL list is and which of its columns mean what."""

    path: str  # relative paths resolve against the recipe's directory; s3://... and other store URLs as given
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str | None = "caption"  # None: the list has no captions
    extra_columns: list[str] | Literal["all"] = "all"  # carried into `meta` as a JSON object
    dataset: str | None = None  # recorded in source.dataset; default: the file name without extensions
    license_column: str | None = None


@dataclass
class _Row:
    """One input row: its record, or why it could not be read."""

    index: int
    record: dict[str, Any] | None
    error: str | None = None


def detect_format(path: str) -> str | None:
    """The format named by `path`'s extension (`.gz` allowed after csv/tsv/jsonl/json), or None."""
    name = path.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[: -len(".gz")]
    fmt = _EXTENSIONS.get(os.path.splitext(name)[1])
    if fmt is None or (gzipped and fmt not in _GZIP_OK):
        return None
    return fmt


def _stem(path: str) -> str:
    """The file name without its format extension and `.gz`."""
    name = os.path.basename(path)
    if name.lower().endswith(".gz"):
        name = name[: -len(".gz")]
    root, ext = os.path.splitext(name)
    return root if ext.lower() in _EXTENSIONS else name


def _text(value: Any) -> str | None:
    """A cell value as text (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class UrlListSource(Source):
    """Streams a URL list file as `pair` samples, one per input row, in file order."""

    name = "url_list"
    Params = UrlListParams
    params: UrlListParams
    needs_fetch = True  # yields URLs only: a recipe must run the fetch stage

    @property
    def path(self) -> str:
        """The list's absolute path (`params.path` resolved against the recipe directory), or its store URL."""
        if storage.is_remote(self.params.path):
            return str(storage.location(self.params.path))
        path = os.path.expanduser(self.params.path)
        return os.path.abspath(os.path.join(self.recipe_dir, path))

    @property
    def format(self) -> str:
        """The list's format: `params.format`, or the one its extension names."""
        if self.params.format != "auto":
            return self.params.format
        fmt = detect_format(self.params.path)
        if fmt is None:
            raise RecipeError(
                f"cannot tell the format of {self.path} from its extension "
                "(.parquet, .csv, .tsv, .jsonl, .json, optionally .gz for text formats); set source.format",
                path="source.format",
            )
        return fmt

    @property
    def dataset(self) -> str:
        """The dataset name recorded in `source.dataset` and used as the key's source id."""
        return self.params.dataset or _stem(self.params.path)

    def preflight(self) -> None:
        """Check the file exists and has the configured columns, reading only its header."""
        fmt = self.format
        try:
            found = storage.is_file(self.path)
        except OSError as error:  # a store that cannot be reached or refuses access
            raise RecipeError(f"cannot reach the URL list {self.path}: {error}", path="source.path") from None
        if not found:
            raise RecipeError(f"URL list not found: {self.path}", path="source.path")
        names = self._column_names(fmt)
        p = self.params
        wanted = [("source.url_column", p.url_column), ("source.caption_column", p.caption_column)]
        wanted.append(("source.license_column", p.license_column))
        if isinstance(p.extra_columns, list):
            wanted += [("source.extra_columns", c) for c in p.extra_columns]
        for key_path, column in wanted:
            if column is not None and column not in names:
                raise RecipeError(
                    f"column {column!r} not in {self.path}; available columns: {', '.join(names)}",
                    path=key_path,
                )

    def count_rows(self) -> int | None:
        """The number of input rows when known from metadata (Parquet), else None."""
        if self.format != "parquet":
            return None
        with storage.parquet_file(self.path) as parquet:
            return parquet.metadata.num_rows

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` rows, with drop_reason/drop_detail columns."""
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.preflight()
        chunk: list[_Row] = []
        for row in self._rows(batch_rows):
            chunk.append(row)
            if len(chunk) == batch_rows:
                yield self._samples(chunk)
                chunk = []
        if chunk:
            yield self._samples(chunk)

    def describe(self) -> dict[str, Any]:
        """Type, resolved path, format, dataset name, columns used and file size in bytes."""
        p = self.params
        return {
            "type": self.name,
            "path": self.path,
            "format": self.format,
            "dataset": self.dataset,
            "columns": {
                "url": p.url_column,
                "caption": p.caption_column,
                "license": p.license_column,
                "extra": p.extra_columns,
            },
            "size_bytes": storage.file_size(self.path) if storage.is_file(self.path) else None,
        }

    # -- reading -------------------------------------------------------------

    def _column_names(self, fmt: str) -> list[str]:
        """The file's column names, from the Parquet schema, the CSV header or the first JSON object."""
        try:
            if fmt == "parquet":
                with storage.parquet_file(self.path) as parquet:
                    return parquet.schema_arrow.names
            if fmt == "jsonl":
                return self._first_json_keys()
            with self._open_csv(fmt, column_types=None, columns=None) as reader:
                return reader.schema.names
        except (pa.ArrowInvalid, OSError, EOFError) as error:
            raise RecipeError(f"cannot read {self.path} as {fmt}: {error}", path="source.path") from error

    def _first_json_keys(self) -> list[str]:
        with self._open_text() as lines:
            seen = 0
            for line in lines:
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    return list(record)
                if seen >= _JSONL_HEADER_LINES:
                    break
        raise RecipeError(f"no JSON object in the first lines of {self.path}", path="source.path")

    def _open_text(self):
        """Open the JSON Lines file for reading bytes line by line, decompressing `.gz`."""
        if storage.is_remote(self.path):
            return storage.open_stream(self.path, decompress=True)
        if self.path.lower().endswith(".gz"):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    def _open_csv(self, fmt: str, column_types: dict[str, pa.DataType] | None, columns: list[str] | None):
        remote = storage.is_remote(self.path)
        return pacsv.open_csv(
            storage.open_stream(self.path, decompress=True) if remote else self.path,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=_DELIMITERS[fmt], newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=column_types or {}, include_columns=columns or []),
        )

    def _wanted_columns(self) -> list[str] | None:
        """The columns to read, or None for all of them (extra_columns = "all")."""
        p = self.params
        if p.extra_columns == "all":
            return None
        names = [p.url_column, p.caption_column, p.license_column, *p.extra_columns]
        return list(dict.fromkeys(n for n in names if n is not None))

    def _rows(self, batch_rows: int) -> Iterator[_Row]:
        fmt = self.format
        if fmt == "jsonl":
            yield from self._json_rows()
            return
        index = 0
        for batch in self._arrow_batches(fmt, batch_rows):
            for record in batch.to_pylist():
                if fmt != "parquet":  # CSV/TSV cells are read as bytes; invalid UTF-8 becomes U+FFFD
                    record = {name: _text(value) for name, value in record.items()}
                yield _Row(index, record)
                index += 1

    def _arrow_batches(self, fmt: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
        columns = self._wanted_columns()
        if fmt == "parquet":
            with storage.parquet_file(self.path) as parquet:
                yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)
            return
        names = self._column_names(fmt)
        as_bytes = {name: pa.binary() for name in names}  # decoded by _rows: text that is not UTF-8 is not fatal
        with self._open_csv(fmt, column_types=as_bytes, columns=columns) as reader:
            read = 0
            try:
                for batch in reader:
                    yield batch
                    read += batch.num_rows
            except pa.ArrowInvalid as error:
                raise RecipeError(f"cannot read {self.path} as {fmt} after row {read}: {error} (a row longer than "
                                  f"{_CSV_BLOCK_BYTES >> 20} MiB cannot be read; JSON Lines has no such limit)",
                                  path="source.path") from None

    def _json_rows(self) -> Iterator[_Row]:
        index = 0
        with self._open_text() as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    error = None if isinstance(record, dict) else f"not a JSON object but {type(record).__name__}"
                except ValueError as exc:
                    error = str(exc)
                if error is None:
                    yield _Row(index, record)
                else:
                    yield _Row(index, None, f"line {line_number}: {error}")
                index += 1

    # -- building samples ----------------------------------------------------

    def _extras_of(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A function giving a record's extra columns (those carried into `meta`)."""
        p = self.params
        if p.extra_columns != "all":
            names = list(p.extra_columns)
            return lambda record: {name: record.get(name) for name in names}
        used = {p.url_column, p.caption_column, p.license_column}
        return lambda record: {k: v for k, v in record.items() if k not in used and not _PANDAS_INDEX.match(k)}

    def _samples(self, rows: list[_Row]) -> pa.Table:
        samples, reasons, details = [], [], []
        dataset, extras_of = self.dataset, self._extras_of()
        for row in rows:
            sample, reason, detail = self._sample(row, dataset, extras_of)
            samples.append(sample)
            reasons.append(reason)
            details.append(detail)
        return with_drops(from_rows(samples), reasons, details)

    def _sample(self, row: _Row, dataset: str,
                extras_of: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[dict[str, Any], str | None, str | None]:
        """One row as a sample dict, plus its drop reason and detail (None when kept)."""
        p = self.params
        record = row.record or {}
        raw_url = _text(record.get(p.url_column))
        url = raw_url.strip() if raw_url is not None else None
        url = url or None
        caption = _text(record.get(p.caption_column)) if p.caption_column else None
        extras = extras_of(record)
        segments = [{"image": 0, "text": None}]
        if caption is not None:
            segments.append({"text": caption, "image": None})
        sample = {
            "key": sample_key(dataset, row.index, url),
            "kind": "pair",
            "images": [{"bytes": None, "path": None}],
            "image_meta": [{"url": url}],
            "segments": segments,
            "captions": [{"name": "alt", "text": caption}] if caption is not None else [],
            "scores": None,
            "roles": [],
            "source": {
                "dataset": dataset,
                "id": str(row.index),
                "url": url,
                "license": _text(record.get(p.license_column)) if p.license_column else None,
            },
            "meta": json.dumps(extras, sort_keys=True, ensure_ascii=False, default=str) if extras else None,
        }
        if row.error is not None:
            return sample, BAD_INPUT_ROW, row.error
        if url is None:
            state = "null" if raw_url is None else "empty"
            return sample, MISSING_URL, f"row {row.index}: {p.url_column!r} is {state}"
        return sample, None, None
