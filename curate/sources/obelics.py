"""Documents in the OBELICS layout (Parquet) as interleaved samples.

A row has two parallel lists of equal length, `images` and `texts`: at each position exactly
one is non-null, and the positions give the reading order. `images` holds URLs (strings) or,
in copies that embed them, Hugging Face Image structs {bytes, path}. `metadata` is a JSON
string: a list aligned with the positions (for images: src, alt_text, sizes, ...), and
`general_metadata` a JSON string about the page (url, Common Crawl WARC location, ...).

Per-image metadata goes to meta.images (with each image's url), `general_metadata` to
meta.general_metadata (its `url` is the document's source URL), non-null text metadata to
meta.text_metadata. A row whose lists differ in length, that has both an image and a text at
one position, or whose metadata is not valid JSON is dropped as `bad_input_row`; positions
with neither are skipped and counted in meta.empty_positions.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.extract.document import DocumentImage, document_sample
from curate.extract.inputs import input_files
from curate.schema import sample_key
from curate.sources.base import LocalPathSource, SampleResult, batched_samples
from curate.stage import Params, RecipeError

BAD_INPUT_ROW = "bad_input_row"
SUFFIXES = (".parquet", ".pq")


class ObelicsParams(Params):
    """Where the Parquet files are and what their columns are called."""

    path: str  # file, folder or glob; relative paths resolve against the recipe's directory
    dataset: str | None = None  # recorded in source.dataset and used in keys; default: the file/folder name
    images_column: str = "images"
    texts_column: str = "texts"
    metadata_column: str | None = "metadata"  # None: the files have no per-position metadata
    general_metadata_column: str | None = "general_metadata"


class _BadRow(ValueError):
    """A row that cannot be a document."""


class ObelicsSource(LocalPathSource):
    """Streams OBELICS-layout Parquet rows as `interleaved` samples, in file and row order."""

    fallback_dataset = "documents"

    name = "obelics"
    Params = ObelicsParams
    params: ObelicsParams
    needs_fetch = True  # images are usually URLs: a recipe must run the fetch stage

    def _columns(self) -> list[str]:
        p = self.params
        names = [p.images_column, p.texts_column, p.metadata_column, p.general_metadata_column]
        return [name for name in names if name is not None]

    def preflight(self) -> None:
        """Check that the files exist and have the configured columns, reading only their schemas."""
        wanted = {"source.images_column": self.params.images_column, "source.texts_column": self.params.texts_column,
                  "source.metadata_column": self.params.metadata_column,
                  "source.general_metadata_column": self.params.general_metadata_column}
        for path in input_files(self.path, SUFFIXES, "Parquet files"):
            try:
                names = pq.read_schema(path).names
            except (pa.ArrowInvalid, OSError) as error:
                raise RecipeError(f"cannot read {path} as Parquet: {error}", path="source.path") from error
            for key_path, column in wanted.items():
                if column is not None and column not in names:
                    raise RecipeError(f"column {column!r} not in {path}; available columns: {', '.join(names)}",
                                      path=key_path)

    def describe(self) -> dict[str, Any]:
        files = input_files(self.path, SUFFIXES, "Parquet files")
        return {"type": self.name, "path": self.path, "dataset": self.dataset, "files": len(files),
                "columns": self._columns()}

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` documents, with drop_reason/drop_detail."""
        self.preflight()
        yield from batched_samples(self._results(batch_rows), batch_rows)

    def _results(self, batch_rows: int) -> Iterator[SampleResult]:
        """(sample, reason, detail) of every row of every file, the detail naming the file and row."""
        index = 0
        for path in input_files(self.path, SUFFIXES, "Parquet files"):
            with pq.ParquetFile(path) as parquet:
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=self._columns()):
                    for number, record in enumerate(batch.to_pylist()):
                        sample, reason, detail = self._sample(index, record)
                        yield sample, reason, detail and f"{path} row {number}: {detail}"
                        index += 1

    def _sample(self, index: int, record: dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
        p = self.params
        try:
            general = _json(record.get(p.general_metadata_column) if p.general_metadata_column else None, "general")
            url = general.get("url") if isinstance(general, dict) and isinstance(general.get("url"), str) else None
        except _BadRow as error:
            key = sample_key(self.dataset, index, None)
            return document_sample(key, self.dataset, str(index), None, []), BAD_INPUT_ROW, str(error)
        key = sample_key(self.dataset, index, url)
        try:
            items, meta = self._items(record)
        except _BadRow as error:
            return document_sample(key, self.dataset, str(index), url, []), BAD_INPUT_ROW, str(error)
        if general is not None:
            meta["general_metadata"] = general
        return document_sample(key, self.dataset, str(index), url, items, meta), None, None

    def _items(self, record: dict[str, Any]) -> tuple[list[str | DocumentImage], dict[str, Any]]:
        p = self.params
        images = record.get(p.images_column) or []
        texts = record.get(p.texts_column) or []
        if len(images) != len(texts):
            raise _BadRow(f"{len(images)} images but {len(texts)} texts: the lists must be parallel")
        metadata = _json(record.get(p.metadata_column) if p.metadata_column else None, "metadata")
        if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(images)):
            raise _BadRow("metadata is not a list aligned with images/texts")
        items: list[str | DocumentImage] = []
        text_metadata, empty = [], 0
        for position, (image, text) in enumerate(zip(images, texts)):
            info = metadata[position] if metadata is not None else None
            if image is not None and text is not None:
                raise _BadRow(f"position {position} has both an image and a text")
            if text is not None:
                items.append(str(text))
                text_metadata.append(info)
            elif image is not None:
                items.append(_image(image, info if isinstance(info, dict) else None))
            else:
                empty += 1
        meta: dict[str, Any] = {}
        if any(m is not None for m in text_metadata):
            meta["text_metadata"] = text_metadata
        if empty:
            meta["empty_positions"] = empty
        return items, meta


def _json(value: Any, what: str) -> Any:
    """A JSON string cell parsed (already-parsed values and None pass through)."""
    if value is None or not isinstance(value, (str, bytes)):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise _BadRow(f"{what} is not valid JSON ({error})") from None


def _image(value: Any, info: dict[str, Any] | None) -> DocumentImage:
    """An `images` entry: a URL, or an embedded image {bytes, path}."""
    if isinstance(value, dict):
        path = value.get("path")
        url = path if isinstance(path, str) and path.startswith(("http://", "https://")) else None
        url = url or (info or {}).get("src")
        return DocumentImage(url, value.get("bytes"), info)
    return DocumentImage(str(value), None, info)
