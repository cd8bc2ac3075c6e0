"""The unified sample schema: one Arrow schema for every kind of sample.

Every stage reads and writes tables of this schema; every sink writes it (or a
trainer-specific view of it). Field meanings are documented in
docs/architecture.md. Nothing else in the package defines sample columns.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Iterable

import pyarrow as pa

KINDS = ("pair", "interleaved", "edit")
ROLES = ("understanding", "generation", "editing", "interleaved")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

IMAGE_META = pa.struct(
    [
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),  # of the original bytes as fetched
        ("format", pa.string()),  # encoding of `images[i].bytes`: jpg / webp / png
        ("original_format", pa.string()),  # what the host served: JPEG, PNG, GIF, ...
        ("original_mode", pa.string()),  # Pillow's mode of the image as served: RGB, RGBA, CMYK, L, P, ...
        ("exif_orientation", pa.int32()),  # the EXIF orientation tag of the original, 1 when absent
        ("num_bytes", pa.int64()),  # size of `images[i].bytes`
        ("original_num_bytes", pa.int64()),
        ("pixel_sha256", pa.string()),  # of the decoded RGB pixels (exact copies re-encoded identically)
        ("phash", pa.int64()),  # 64-bit perceptual hash (DCT) of the decoded image, as a signed integer
    ]
)

SEGMENT = pa.struct([("text", pa.string()), ("image", pa.int32())])

CAPTION = pa.struct([("name", pa.string()), ("text", pa.string())])

SCORES = pa.struct(
    [
        ("clip_score", pa.float32()),
        ("aesthetic", pa.float32()),
        ("clip_direction", pa.float32()),  # edits: cosine of the CLIP image change and text change
        ("nsfw", pa.float32()),  # probability of nudity, max over the sample's images (nsfw stage)
        ("watermark", pa.float32()),  # probability of a watermark on image 0 (watermark stage)
    ]
)

EMBEDDINGS = pa.struct(
    [
        ("model", pa.string()),  # which CLIP produced them: "<model>/<pretrained tag or weights sha256 prefix>"
        ("image", pa.list_(pa.float16())),  # L2-normalised image embedding of images[0]
        ("text", pa.list_(pa.float16())),  # L2-normalised embedding of the scored caption
    ]
)

SOURCE = pa.struct(
    [
        ("dataset", pa.string()),
        ("id", pa.string()),
        ("url", pa.string()),
        ("license", pa.string()),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("images", pa.list_(IMAGE)),
        pa.field("image_meta", pa.list_(IMAGE_META)),
        pa.field("segments", pa.list_(SEGMENT)),
        pa.field("captions", pa.list_(CAPTION)),
        pa.field("scores", SCORES),
        pa.field("embeddings", EMBEDDINGS),
        pa.field("roles", pa.list_(pa.string())),
        pa.field("source", SOURCE),
        pa.field("meta", pa.string()),
    ]
)

DROP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        # the index an image removed from a kept document had in it (curate/drop_log.py); null for a
        # row that drops a whole sample, the only rows "input rows = output rows + dropped rows" counts
        pa.field("image", pa.int32()),
    ]
)

# The `.json` member of every WebDataset sample (run outputs and `curate export --to wds`):
# img2dataset's flat fields, then curate's own. Every field is present in every sample with
# this type; an absent value is the type's empty value (EMPTY_*), never null, so readers that
# infer types from the first samples (`datasets`) read every later sample too. Variable
# structures (caption variants, roles, meta) are JSON strings, as `exif` is in img2dataset.
# Field by field: docs/architecture.md, "The WebDataset .json record".
EMPTY_SCORE = -1.0  # a score the run did not compute for the sample
EMPTY_SEGMENT_IMAGE = -1  # segments[].image of a text segment

# IMAGE_META with every integer as int64 (JSON has one integer type) and phash as 16 hex digits (the
# int64 of Parquet, unsigned): a signed 64-bit hash has no typed empty value, a string has "".
WDS_IMAGE_META = pa.struct([
    (field.name, pa.string() if field.name == "phash" else pa.int64() if pa.types.is_integer(field.type)
     else field.type)
    for field in IMAGE_META
])

WDS_RECORD_SCHEMA = pa.schema(
    [
        # img2dataset's fields, with img2dataset's meanings
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        # curate's own
        ("kind", pa.string()),
        ("captions", pa.string()),  # JSON object: variant name -> text
        ("scores", pa.struct([(field.name, pa.float64()) for field in SCORES])),
        ("roles", pa.string()),  # JSON array of role names
        ("source", pa.struct([(field.name, pa.string()) for field in SOURCE])),
        ("meta", pa.string()),  # JSON, as in Parquet
        ("image_meta", pa.list_(WDS_IMAGE_META)),
        ("segments", pa.list_(pa.struct([("text", pa.string()), ("image", pa.int64())]))),
    ]
)

# Columns a stage may set on a batch to drop rows; the engine moves such rows to
# the drop log and strips these columns before anything is written.
DROP_REASON = "drop_reason"
DROP_DETAIL = "drop_detail"


def sample_key(source_id: str, row_index: int, url: str | None) -> str:
    """A stable 16-hex-digit key for the input row `row_index` of source `source_id`.

    Deterministic for the same input, distinct for a URL listed twice (the row
    index differs), and free of dots (WebDataset and HF split keys at the first dot).
    """
    digest = hashlib.blake2b(
        f"{source_id}\x1f{row_index}\x1f{url or ''}".encode(), digest_size=8
    )
    return digest.hexdigest()


def empty_table(schema: pa.Schema = SAMPLE_SCHEMA) -> pa.Table:
    """An empty table of `schema`."""
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema = SAMPLE_SCHEMA) -> pa.Table:
    """Return `table` with exactly the columns of `schema`, in order and with its types.

    Missing columns are filled with nulls; extra columns are an error (a stage that
    needs a new column adds it here, in the one schema).
    """
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the sample schema: {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def from_rows(rows: Iterable[dict[str, Any]], schema: pa.Schema = SAMPLE_SCHEMA) -> pa.Table:
    """Build a table of `schema` from python dicts (missing fields become null)."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def caption_text(captions: list[dict] | None, prefer: Iterable[str] = ("alt",)) -> str | None:
    """The caption to use for a sample: the first of `prefer` present, else the first one."""
    if not captions:
        return None
    by_name = {c["name"]: c["text"] for c in captions}
    for name in prefer:
        if by_name.get(name) is not None:
            return by_name[name]
    return captions[0]["text"]


def with_image_features(arrow_schema: pa.Schema, column: str = "images") -> pa.Schema:
    """`arrow_schema` with the `huggingface` metadata that makes `datasets` read `column` as a list of Image."""
    import datasets  # heavy import, only needed when writing Parquet

    features = datasets.Features.from_arrow_schema(arrow_schema)
    features[column] = datasets.List(datasets.Image())
    metadata = json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True).encode()
    return arrow_schema.with_metadata({b"huggingface": metadata})


@functools.lru_cache(maxsize=1)
def parquet_schema() -> pa.Schema:
    """SAMPLE_SCHEMA with the Hugging Face features metadata attached."""
    return with_image_features(SAMPLE_SCHEMA)


def hf_features_metadata() -> bytes:
    """The `huggingface` schema metadata that makes `datasets` read `images` as Image features."""
    return parquet_schema().metadata[b"huggingface"]


def describe() -> list[dict[str, str]]:
    """The schema as a list of {name, type} for the manifest."""
    return [{"name": f.name, "type": str(f.type)} for f in SAMPLE_SCHEMA]
