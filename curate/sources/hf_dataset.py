"""A Hugging Face dataset on local disk as `pair` samples: a `save_to_disk` folder, or files `datasets` can load.

`path` is either a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read
with `datasets.load_from_disk`: memory-mapped Arrow), or local data files, a folder or a glob
given to `datasets.load_dataset(..., streaming=True)` (Parquet, JSON Lines, CSV, Arrow,
imagefolder, ...; the builder comes from `builder`, else from the file extension, else
`datasets` infers it from the folder). Nothing is downloaded. Rows are read in Arrow batches,
images as stored ({bytes, path} structs are not decoded), so memory stays bounded.

`image_column` holds the image (an Image feature, raw bytes or a file path); `caption_columns`
maps caption names to columns (`{alt: text}`); the id, url and license columns are used when
the dataset has them; `score_columns` carries precomputed scores; other columns go to `meta`.
A row without an image, with an unreadable or oversized image file, or whose image has no image
header becomes a drop row. A dataset that cannot be read at all is a RecipeError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from curate.sources.stored_images import (
    DEFAULT_MAX_IMAGE_BYTES,
    StoredImagesSource,
    StoredRow,
    cell_bytes,
    pair_tables,
    score,
    text,
)
from curate.stage import Params, RecipeError

BUILDERS_BY_EXTENSION = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json",
                         ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".tar": "webdataset"}
CAPTION_COLUMNS = ("caption", "text")
READ_ROWS = 64  # rows read at a time: image datasets hold megabytes per row


class HfDatasetParams(Params):
    """Where the dataset is and which of its columns mean what."""

    path: str  # a save_to_disk folder, data files, a folder or a glob; relative to the recipe
    builder: str | None = None  # load_dataset's builder (parquet, json, csv, arrow, imagefolder, ...)
    data_files: str | list[str] | None = None  # load_dataset's data_files, relative to `path` when it is a folder
    split: str | None = None  # needed when the dataset has several splits
    dataset: str | None = None  # recorded in source.dataset and the keys; default: the folder or file name
    image_column: str = "image"
    caption_columns: dict[str, str] | None = None  # caption name -> column; default: {alt: first of caption, text}
    id_column: str | None = "id"  # source.id when the dataset has it (else the row number)
    url_column: str | None = "url"
    license_column: str | None = "license"
    score_columns: dict[Literal["clip_score", "aesthetic"], str] = {}
    extra_columns: list[str] | Literal["all"] = "all"  # other columns kept in `meta` (binary values left out)
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)


class HfDatasetSource(StoredImagesSource):
    """Streams a local Hugging Face dataset as `pair` samples, one per row, in dataset order."""

    name = "hf_dataset"
    Params = HfDatasetParams
    params: HfDatasetParams

    def is_saved_to_disk(self) -> bool:
        """True for a folder written by `save_to_disk`."""
        return any(os.path.isfile(os.path.join(self.path, marker)) for marker in ("state.json", "dataset_dict.json"))

    def preflight(self) -> None:
        """Open the dataset and check it has the configured columns."""
        self._columns(self._open())

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` rows, with drop_reason/drop_detail columns."""
        data = self._open()
        columns = self._columns(data)
        yield from pair_tables(self._rows(data, columns, min(batch_rows, READ_ROWS)), self.dataset, batch_rows,
                               self.params.max_image_bytes)

    def describe(self) -> dict[str, Any]:
        """Type, path, how it is loaded, split and the columns used."""
        p = self.params
        return {"type": self.name, "path": self.path, "dataset": self.dataset,
                "loader": "load_from_disk" if self.is_saved_to_disk() else "load_dataset",
                "builder": p.builder, "split": p.split,
                "columns": {"image": p.image_column, "captions": p.caption_columns, "id": p.id_column,
                            "url": p.url_column, "license": p.license_column, "scores": p.score_columns}}

    # -- loading -------------------------------------------------------------

    def _open(self):
        """The split to read, as a `datasets` Dataset (memory-mapped) or IterableDataset (streamed)."""
        import datasets  # heavy import, only when this source is used

        path = self.path
        if not os.path.exists(path) and not any(ch in path for ch in "*?["):
            raise RecipeError(f"dataset not found: {path}", path="source.path")
        try:
            if self.is_saved_to_disk():
                loaded = datasets.load_from_disk(path)
            else:
                loaded = datasets.load_dataset(**self._load_arguments(), streaming=True)
        except RecipeError:
            raise
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; each is a bad input path
            raise RecipeError(f"datasets cannot load {path}: {type(error).__name__}: {error}",
                              path="source.path") from error
        return self._split(loaded, datasets)

    def _load_arguments(self) -> dict[str, Any]:
        """The arguments of load_dataset: the builder (or the folder) and where the data files are."""
        path, p = self.path, self.params
        if p.builder is None and os.path.isdir(path):
            return {"path": path, "data_files": p.data_files}
        builder = p.builder or BUILDERS_BY_EXTENSION.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise RecipeError(f"cannot tell how to load {path}; set source.builder (parquet, json, csv, arrow, "
                              "imagefolder, ...)", path="source.builder")
        if os.path.isdir(path):
            return {"path": builder, "data_dir": path, "data_files": p.data_files}
        return {"path": builder, "data_files": p.data_files or path}

    def _split(self, loaded, datasets):
        split = self.params.split
        if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            names = list(loaded)
            if split is None and len(names) == 1:
                split = names[0]
            if split not in names:
                raise RecipeError(f"choose one of the splits {', '.join(names)} with source.split",
                                  path="source.split")
            return loaded[split]
        if split is not None and getattr(loaded, "split", None) not in (None, split):
            raise RecipeError(f"{self.path} holds the split {loaded.split!r} only", path="source.split")
        return loaded

    def _columns(self, data) -> dict[str, Any]:
        """The columns to use, checked against the dataset's: image, captions, id, url, license, scores."""
        p = self.params
        names = list(data.features) if data.features is not None else self._peek_columns(data)
        explicit = p.model_fields_set

        def require(column: str | None, key: str) -> None:
            if column is not None and column not in names:
                raise RecipeError(f"column {column!r} not in {self.path}; available columns: {', '.join(names)}",
                                  path=f"source.{key}")

        require(p.image_column, "image_column")
        captions = p.caption_columns
        if captions is None:
            found = next((c for c in CAPTION_COLUMNS if c in names), None)
            captions = {"alt": found} if found else {}
        for name, column in captions.items():
            require(column, f"caption_columns.{name}")
        chosen = {"image": p.image_column, "captions": captions}
        for role in ("id", "url", "license"):
            column = getattr(p, f"{role}_column")
            if f"{role}_column" in explicit:
                require(column, f"{role}_column")
            chosen[role] = column if column in names else None
        for name, column in p.score_columns.items():
            require(column, f"score_columns.{name}")
        if isinstance(p.extra_columns, list):
            for column in p.extra_columns:
                require(column, "extra_columns")
        chosen["scores"] = p.score_columns
        return chosen

    def _peek_columns(self, data) -> list[str]:
        """Column names of a streamed dataset whose features are only known once read."""
        first = next(iter(data.with_format("arrow").iter(batch_size=1)), None)
        return first.column_names if first is not None else []

    # -- reading -------------------------------------------------------------

    def _rows(self, data, columns: dict[str, Any], read_rows: int) -> Iterator[StoredRow]:
        p = self.params
        base_dir = Path(self.path if os.path.isdir(self.path) else os.path.dirname(self.path))
        used = {columns["image"], *columns["captions"].values(), columns["id"], columns["url"], columns["license"],
                *columns["scores"].values()}
        index = 0
        batches = iter(data.with_format("arrow").iter(batch_size=read_rows))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - a broken file inside the dataset; say where and stop
                raise RecipeError(f"cannot read {self.path} after row {index}: {type(error).__name__}: {error}",
                                  path="source.path") from error
            for values in batch.to_pylist():
                source_id = text(values.get(columns["id"])) if columns["id"] else None
                row = StoredRow(source_id or str(index))
                row.captions = {name: text(values.get(c)) for name, c in columns["captions"].items()}
                row.url = text(values.get(columns["url"])) if columns["url"] else None
                row.license = text(values.get(columns["license"])) if columns["license"] else None
                row.scores = {name: score(values.get(c)) for name, c in columns["scores"].items()}
                if p.extra_columns == "all":
                    row.meta = {k: v for k, v in values.items() if k not in used}
                else:
                    row.meta = {k: values.get(k) for k in p.extra_columns}
                row.data, row.reason, row.detail = cell_bytes(values.get(columns["image"]), base_dir,
                                                              p.max_image_bytes)
                yield row
                index += 1
