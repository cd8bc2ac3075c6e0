"""Existing image-text shards as `pair` samples: WebDataset tars, and Parquet files with embedded images.

Made for the outputs of img2dataset (tars of `KEY.jpg` + `KEY.txt` + `KEY.json`, or Parquet
with a `jpg` column), DataComp shards (the same, with `uid` and CLIP scores in the `.json`)
and Hugging Face Parquet (an Image column {bytes, path}). The metadata the shards carry is
reused, not recomputed: `url` becomes image_meta.url and source.url, the id field (`uid`)
source.id, the caption the caption `alt`, the recorded `original_width`/`original_height`/
`sha256` of the downloaded image its image_meta, the score fields the recipe maps (e.g.
`scores: {clip_score: clip_l14_similarity_score}`) the sample's scores, everything else `meta`.

Every sample of a tar (a group of members sharing a key) and every Parquet row is one input
row. A row without image bytes (img2dataset keeps failed downloads as Parquet rows, with their
`status` and `error_message`), an image above `max_image_bytes` or without an image header,
and the samples of damaged shards (curate/sources/shard_readers.py) become drop rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from curate.sources.shard_readers import ParquetRecord, TarSample, parquet_columns, parquet_records, tar_samples
from curate.sources.stored_images import (
    BAD_INPUT_ROW,
    CARRIED_META,
    CORRUPT_SHARD,
    DEFAULT_MAX_IMAGE_BYTES,
    MISSING_IMAGE,
    TOO_LARGE,
    StoredImagesSource,
    StoredRow,
    cell_bytes,
    matching_files,
    pair_tables,
    score,
    text,
)
from curate.stage import Params, RecipeError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
PARQUET_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "image")
CAPTION_FIELDS = ("txt", "caption", "text")
READ_ROWS = 64  # Parquet rows read at a time: image shards hold megabytes per row group


class ImageShardsParams(Params):
    """Where the shards are and which of their fields mean what.

    A field is a tar member extension, a key of the sample's `.json` or a Parquet column.
    """

    path: str  # a shard, a folder of shards (subfolders included) or a glob; relative to the recipe
    format: Literal["auto", "webdataset", "parquet"] = "auto"  # auto: tars if there are any, else Parquet
    dataset: str | None = None  # recorded in source.dataset and the keys; default: the folder or file name
    image_field: str | None = None  # default: the first of jpg, jpeg, png, webp (Parquet: also image)
    captions: dict[str, str] | None = None  # caption name -> field; default: {alt: first of txt, caption, text}
    url_field: str | None = "url"
    id_field: str | None = "uid"  # source.id when the sample has it; else "<shard>:<key or row>"
    license_field: str | None = "license"
    # score -> field, e.g. {clip_score: clip_l14_similarity_score} (DataComp), {nsfw: punsafe, watermark: pwatermark}
    scores: dict[Literal["clip_score", "aesthetic", "nsfw", "watermark"], str] = {}
    carry_image_meta: bool = True  # reuse original_width / original_height / sha256 the downloader recorded
    extra_fields: list[str] | Literal["all"] = "all"  # other fields kept in `meta`
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)


class ImageShardsSource(StoredImagesSource):
    """Streams WebDataset tars or Parquet shards as `pair` samples, in file order."""

    name = "image_shards"
    Params = ImageShardsParams
    params: ImageShardsParams

    def files(self) -> tuple[str, list[str]]:
        """(format, the shard files in reading order); raises RecipeError when there are none."""
        fmt = self.params.format if self.params.format != "auto" else self._detect_format()
        if fmt == "webdataset":
            return fmt, matching_files(self.path, TAR_SUFFIXES, "WebDataset tars")
        return fmt, matching_files(self.path, PARQUET_SUFFIXES, "Parquet shards")

    def _detect_format(self) -> str:
        """A file's format from its extension; for a folder or glob, webdataset when it has tars, else parquet."""
        if os.path.isfile(self.path):
            name = self.path.lower()
            if name.endswith(TAR_SUFFIXES):
                return "webdataset"
            if name.endswith(PARQUET_SUFFIXES):
                return "parquet"
            raise RecipeError(f"cannot tell the format of {self.path}; set source.format", path="source.format")
        try:
            matching_files(self.path, TAR_SUFFIXES, "WebDataset tars")
        except RecipeError:
            return "parquet"
        return "webdataset"

    def preflight(self) -> None:
        """Check shards exist; for Parquet, that the first one has the image column and the named fields."""
        fmt, files = self.files()
        if fmt != "parquet":
            return
        try:
            names = parquet_columns(files[0])
        except (pa.ArrowException, OSError) as error:
            raise RecipeError(f"cannot read {files[0]} as Parquet: {error}", path="source.path") from error
        self._image_column(names, files[0])
        if isinstance(self.params.extra_fields, list):
            for column in self.params.extra_fields:
                if column not in names:
                    raise RecipeError(f"column {column!r} not in {files[0]}", path="source.extra_fields")

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` rows, with drop_reason/drop_detail columns."""
        self.preflight()
        yield from pair_tables(self._rows(min(batch_rows, READ_ROWS)), self.dataset, batch_rows,
                               self.params.max_image_bytes)

    def describe(self) -> dict[str, Any]:
        """Type, path, format, shard count and the fields used."""
        p = self.params
        described: dict[str, Any] = {"type": self.name, "path": self.path, "dataset": self.dataset,
                                     "fields": {"image": p.image_field, "captions": p.captions, "url": p.url_field,
                                                "id": p.id_field, "license": p.license_field, "scores": p.scores},
                                     "carry_image_meta": p.carry_image_meta}
        try:
            fmt, files = self.files()
            described.update(format=fmt, shards=len(files), size_bytes=sum(os.path.getsize(f) for f in files))
        except (RecipeError, OSError):
            described["format"] = p.format
        return described

    # -- reading -------------------------------------------------------------

    def _rows(self, read_rows: int) -> Iterator[StoredRow]:
        fmt, files = self.files()
        root = self.path if os.path.isdir(self.path) else os.path.dirname(self.path.split("*", 1)[0])
        for file in files:
            shard = Path(os.path.relpath(file, root)).as_posix()
            if fmt == "webdataset":
                for sample in tar_samples(file, self.params.max_image_bytes):
                    yield self._tar_row(shard, sample)
            else:
                names = None
                for record in parquet_records(file, self._read_columns(file), read_rows):
                    if names is None and record.values is not None:
                        names = list(record.values)
                    yield self._parquet_row(shard, file, record, names)

    def _tar_row(self, shard: str, sample: TarSample) -> StoredRow:
        members = sample.members
        image_ext = self.params.image_field or next((e for e in TAR_IMAGE_FIELDS if e in members), None)
        record: dict[str, Any] = {}
        problem = None
        if members.get("json") is not None:
            try:
                loaded = json.loads(members["json"])
                record = loaded if isinstance(loaded, dict) else {}
                if not isinstance(loaded, dict):
                    problem = (BAD_INPUT_ROW, f"{shard}: {sample.key}.json is not a JSON object")
            except ValueError as error:
                problem = (BAD_INPUT_ROW, f"{shard}: {sample.key}.json is not valid JSON: {error}")
        for ext, data in members.items():
            if ext in (image_ext, "json") or data is None:
                continue
            try:
                record[ext] = data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a binary member (.npy, a second image): not metadata
        row = self._stored(record, f"{shard}:{sample.key}" if sample.key else shard)
        if sample.damage is not None:
            row.reason, row.detail = CORRUPT_SHARD, sample.damage
        elif problem is not None:
            row.reason, row.detail = problem
        elif image_ext is None or image_ext not in members:
            row.reason, row.detail = MISSING_IMAGE, _missing_detail(shard, sample.key, record, sorted(members))
        elif members[image_ext] is None:
            row.reason = TOO_LARGE
            row.detail = f"{shard}: {sample.key}.{image_ext} is above max_image_bytes {self.params.max_image_bytes}"
        else:
            row.data = members[image_ext]
        return row

    def _parquet_row(self, shard: str, file: str, record: ParquetRecord, names: list[str] | None) -> StoredRow:
        if record.values is None:
            return StoredRow(f"{shard}:{record.row}", reason=CORRUPT_SHARD, detail=record.damage)
        values = record.values
        column = self._image_column(names or list(values), file)
        fallback = f"{shard}:{values['key']}" if values.get("key") is not None else f"{shard}:{record.row}"
        row = self._stored({k: v for k, v in values.items() if k != column}, fallback)
        row.data, reason, detail = cell_bytes(values.get(column), Path(file).parent, self.params.max_image_bytes)
        if reason == MISSING_IMAGE:
            detail = _missing_detail(shard, fallback.split(":", 1)[1], values, [])
        row.reason, row.detail = reason, detail
        return row

    def _stored(self, record: dict[str, Any], fallback_id: str) -> StoredRow:
        """A StoredRow with everything but the image, from a sample's fields."""
        p = self.params
        captions = p.captions
        repeated: set[str] = set()
        if captions is None:
            found = next((f for f in CAPTION_FIELDS if record.get(f) is not None), None)
            captions = {"alt": found} if found else {}
            # img2dataset writes the caption twice (KEY.txt and the .json's caption): keep one copy
            repeated = {f for f in CAPTION_FIELDS if found and text(record.get(f)) == text(record.get(found))}
        id_value = text(record.get(p.id_field)) if p.id_field else None
        row = StoredRow(id_value or fallback_id)
        row.captions = {name: text(record.get(f)) for name, f in captions.items()}
        row.url = text(record.get(p.url_field)) if p.url_field else None
        row.license = text(record.get(p.license_field)) if p.license_field else None
        row.scores = {name: score(record.get(f)) for name, f in p.scores.items()}
        row.carried_meta = {k: record.get(k) for k in CARRIED_META} if p.carry_image_meta else {}
        used = {*captions.values(), *repeated, p.url_field, p.id_field, p.license_field, *p.scores.values()}
        if p.carry_image_meta:
            used.update(CARRIED_META)
        if p.extra_fields == "all":
            row.meta = {k: v for k, v in record.items() if k not in used}
        else:
            row.meta = {k: record.get(k) for k in p.extra_fields}
        return row

    def _image_column(self, names: list[str], file: str) -> str:
        if self.params.image_field is not None:
            if self.params.image_field not in names:
                raise RecipeError(f"column {self.params.image_field!r} not in {file}; available columns: "
                                  f"{', '.join(names)}", path="source.image_field")
            return self.params.image_field
        column = next((c for c in PARQUET_IMAGE_FIELDS if c in names), None)
        if column is None:
            raise RecipeError(f"no image column ({', '.join(PARQUET_IMAGE_FIELDS)}) in {file}; set "
                              "source.image_field", path="source.image_field")
        return column

    def _read_columns(self, file: str) -> list[str] | None:
        if self.params.extra_fields == "all":
            return None
        p = self.params
        try:
            names = parquet_columns(file)
        except (pa.ArrowException, OSError):
            return None  # parquet_records reports the unreadable file as a drop row
        wanted = [self._image_column(names, file), *(p.captions or {}).values(), p.url_field, p.id_field,
                  p.license_field, *p.scores.values(), *p.extra_fields, "key", "status", "error_message"]
        if p.captions is None:
            wanted += CAPTION_FIELDS
        if p.carry_image_meta:
            wanted += CARRIED_META
        return [c for c in dict.fromkeys(wanted) if c is not None and c in names]


def _missing_detail(shard: str, key: str, record: dict[str, Any], members: list[str]) -> str:
    """Why a sample has no image, with the downloader's status and error when it recorded them."""
    status = record.get("status")
    error = record.get("error_message")
    if status is not None or error is not None:
        return f"{shard}: {key}: no image (status {status}: {error})"
    if members:
        return f"{shard}: {key}: no image member among {', '.join(members)}"
    return f"{shard}: {key}: no image"
