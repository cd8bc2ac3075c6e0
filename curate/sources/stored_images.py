"""What the sources of stored images (image_folder, image_shards, hf_dataset) share.

Each reads input rows that already hold image bytes and turns every row into one `pair`
sample: the bytes as they are, `image_meta` from the image header (format, mode, EXIF
orientation, size, sha256, byte count), the captions, scores and provenance the input carries, everything else as
JSON in `meta`. Decoding, fingerprints (pixel_sha256, phash) and resizing are the `decode`
stage's job, so a source stays cheap.

When the input records how the image was first downloaded (img2dataset and DataComp write
`original_width`, `original_height` and `sha256` of the downloaded bytes), those values
are the image's `original_*` / `sha256` (the original's mode and EXIF orientation are then
unknown: null); otherwise the stored bytes are the original.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from curate.schema import caption_text, sample_key
from curate.sources.base import LocalPathSource, samples_table
from curate.sources.edit_images import ImageCellError, probe
from curate.stage import RecipeError

MISSING_IMAGE = "missing_image"  # the row has no image bytes (a failed download, a sidecar without its image)
TOO_LARGE = "too_large"  # the stored image is above `max_image_bytes`
UNREADABLE = "unreadable"  # the file or cell cannot be read
BAD_INPUT_ROW = "bad_input_row"  # metadata that is not valid JSON, or a value of the wrong type
CORRUPT_SHARD = "corrupt_shard"  # a sample in a damaged part of a shard (may be incomplete)

SCORE_NAMES = ("clip_score", "aesthetic", "nsfw", "watermark")  # what an input may carry, precomputed
# Fields a downloader records about the image as first downloaded, reused as image_meta.
CARRIED_META = ("original_width", "original_height", "sha256")
ORIGINAL_FIELDS = ("original_width", "original_height", "original_format", "original_mode", "exif_orientation",
                   "original_num_bytes", "sha256")
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
_TABLE_BYTES = 64 * 1024 * 1024  # a yielded table closes at this many image bytes, whatever its row count


@dataclass
class StoredRow:
    """One input row on its way to becoming a pair sample.

    `reason`/`detail` set by the reader (an unreadable file, a broken shard) make it a drop row.
    """

    source_id: str
    data: bytes | None = None
    captions: dict[str, str | None] = field(default_factory=dict)
    url: str | None = None
    license: str | None = None
    carried_meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float | None] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    detail: str | None = None


def pair_tables(rows: Iterable[StoredRow], dataset: str, batch_rows: int, max_image_bytes: int) -> Iterator[pa.Table]:
    """SAMPLE_SCHEMA tables (with drop_reason/drop_detail) of at most `batch_rows` rows, one row per input row."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    chunk: list[tuple[dict[str, Any], str | None, str | None]] = []
    chunk_bytes = 0
    for index, row in enumerate(rows):
        sample, reason, detail = pair_sample(dataset, index, row, max_image_bytes)
        chunk.append((sample, reason, detail))
        chunk_bytes += len(sample["images"][0]["bytes"] or b"")
        if len(chunk) == batch_rows or chunk_bytes >= _TABLE_BYTES:
            yield samples_table(chunk)
            chunk, chunk_bytes = [], 0
    if chunk:
        yield samples_table(chunk)


def pair_sample(dataset: str, index: int, row: StoredRow, max_image_bytes: int
                ) -> tuple[dict[str, Any], str | None, str | None]:
    """Input row `index` as a sample dict, with its drop reason and detail (None when kept)."""
    reason, detail = row.reason, row.detail
    data = row.data
    image_meta: dict[str, Any] = {"url": row.url}
    if reason is None and data is None:
        reason, detail = MISSING_IMAGE, "no image bytes"
    elif reason is None and len(data) > max_image_bytes:
        reason, detail = TOO_LARGE, f"{len(data)} bytes > max_image_bytes {max_image_bytes}"
    elif reason is None:
        try:
            image_meta.update(header_meta(data, row.carried_meta))
        except ImageCellError as error:
            reason, detail = error.reason, error.detail
    if reason is not None:
        data = None  # a dropped row does not carry its bytes to the drop log
    captions = [{"name": name, "text": text} for name, text in row.captions.items() if text is not None]
    segments: list[dict[str, Any]] = [{"image": 0, "text": None}]
    if captions:
        segments.append({"image": None, "text": caption_text(captions)})
    scores = {name: row.scores.get(name) for name in SCORE_NAMES}
    sample = {
        "key": sample_key(dataset, index, row.source_id),
        "kind": "pair",
        "images": [{"bytes": data, "path": None}],
        "image_meta": [image_meta],
        "segments": segments,
        "captions": captions,
        "scores": scores if any(v is not None for v in scores.values()) else None,
        "roles": [],
        "source": {"dataset": dataset, "id": row.source_id, "url": row.url, "license": row.license},
        "meta": dump_meta(row.meta),
    }
    return sample, reason, detail


def header_meta(data: bytes, carried: dict[str, Any]) -> dict[str, Any]:
    """`image_meta` fields from the image header, with the downloader's record of the original when given.

    Raises ImageCellError (`corrupt`, `decompression_bomb`) for data whose header is not an image's.
    """
    meta = probe(data)
    recorded = {name: carried.get(name) for name in CARRIED_META if carried.get(name) is not None}
    if recorded:
        for name in ORIGINAL_FIELDS:
            meta[name] = None
        meta.update(recorded)
    return meta


def dump_meta(values: dict[str, Any]) -> str | None:
    """`values` as the `meta` JSON string (binary values left out); None when empty."""
    kept = {k: v for k, v in values.items() if not isinstance(v, (bytes, bytearray, memoryview))}
    return json.dumps(kept, sort_keys=True, ensure_ascii=False, default=str) if kept else None


def text(value: Any) -> str | None:
    """A field value as text (None stays None; bytes decoded as UTF-8)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def score(value: Any) -> float | None:
    """A precomputed score as a float; None when absent or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN means "not scored"


def cell_bytes(cell: Any, base_dir: Path, max_image_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """The image bytes of a column cell: (bytes, drop reason, detail).

    A cell is a Hugging Face Image struct {bytes, path}, raw bytes, or a file path (relative
    paths against `base_dir`). A file above `max_image_bytes` is not read.
    """
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"]), None, None
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return (bytes(cell), None, None) if len(cell) else (None, MISSING_IMAGE, "empty image bytes")
    if isinstance(cell, str) and cell.strip():
        return read_image_file(Path(cell.strip()) if os.path.isabs(cell.strip()) else base_dir / cell.strip(),
                               max_image_bytes)
    if cell is None or cell == "":
        return None, MISSING_IMAGE, "no image"
    return None, BAD_INPUT_ROW, f"not an image cell but {type(cell).__name__}"


def read_image_file(path: Path, max_image_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """The bytes of the image file `path`: (bytes, drop reason, detail); too large files are not read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever, a device never end
            return None, UNREADABLE, f"{path} is not a regular file"
        size = info.st_size
        if size > max_image_bytes:
            return None, TOO_LARGE, f"{path}: {size} bytes > max_image_bytes {max_image_bytes}"
        with open(path, "rb") as handle:
            data = handle.read(max_image_bytes + 1)
    except OSError as error:
        return None, UNREADABLE, f"cannot read {path}: {error.strerror or error}"
    if len(data) > max_image_bytes:
        return None, TOO_LARGE, f"{path}: more than max_image_bytes {max_image_bytes}"
    if not data:
        return None, MISSING_IMAGE, f"{path} is empty"
    return data, None, None


def matching_files(path: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """The input files in reading order: `path` itself, the files below a folder, or a glob's matches.

    Only names ending with one of `suffixes` (case-insensitive) are taken from a folder or a
    glob; hidden files and folders are skipped. Raises RecipeError when nothing matches.
    """
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for folder, folders, names in os.walk(path):
            folders[:] = [f for f in folders if not f.startswith(".")]
            found += [os.path.join(folder, n) for n in names if n.lower().endswith(suffixes) and n[0] != "."]
        if not found:
            raise RecipeError(f"no {what} ({', '.join(suffixes)}) in folder {path}", path="source.path")
        return sorted(found)
    if glob.has_magic(path):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.lower().endswith(suffixes)]
        if found:
            return sorted(found)
    raise RecipeError(f"{what} not found: {path}", path="source.path")


class StoredImagesSource(LocalPathSource):
    """Base of the sources that read images stored on disk."""

    fallback_dataset = "images"
