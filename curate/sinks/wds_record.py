"""The `.json` member of a WebDataset sample: one stable record for every output and export.

The record holds img2dataset's flat fields (`key`, `url`, `caption`, `width`, `height`,
`original_width`, `original_height`, `sha256`, `status`, `error_message`) plus `uid` (DataComp)
and curate's own fields beside them. Its types are `schema.WDS_RECORD_SCHEMA`: every field in
every sample, an absent value written as its type's empty value, never null. Readers that infer
types from the first samples (`datasets.load_dataset("webdataset")` reads five) therefore read
every later sample, whatever was set where.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from curate import schema

SUCCESS = "success"
SCORE_NAMES = tuple(field.name for field in schema.SCORES)
IMAGE_META_FIELDS = schema.WDS_IMAGE_META
EMPTY_BY_TYPE = {"string": "", "int64": 0}


@dataclass(frozen=True)
class StoredSize:
    """The size of image 0 as it stands in the shard, when that differs from `image_meta` (exports resize)."""

    width: int
    height: int


def sample_record(row: dict[str, Any], text: str, stored: StoredSize | None = None) -> dict[str, Any]:
    """The `.json` record of `row` (a SAMPLE_SCHEMA row as a dict) whose `.txt` is `text`.

    `width`/`height` are image 0's size in the shard (`stored` when an exporter resized it),
    `original_*` and `sha256` describe image 0 as fetched, before any resize.
    """
    metas = [image_meta_record(meta) for meta in row.get("image_meta") or []]
    first = metas[0] if metas else image_meta_record(None)
    source = {field.name: _text((row.get("source") or {}).get(field.name)) for field in schema.SOURCE}
    width, height = (stored.width, stored.height) if stored else (first["width"], first["height"])
    return {
        "key": row["key"],
        "uid": source["id"] or row["key"],
        "url": first["url"] or source["url"],
        "caption": text,
        "width": width,
        "height": height,
        "original_width": first["original_width"] or first["width"],
        "original_height": first["original_height"] or first["height"],
        "sha256": first["sha256"],
        "status": SUCCESS,
        "error_message": "",
        "kind": row["kind"],
        "captions": captions_json(row.get("captions")),
        "scores": scores_record(row.get("scores")),
        "roles": compact_text(list(row.get("roles") or [])),
        "source": source,
        "meta": meta_json(row.get("meta")),
        "image_meta": metas,
        "segments": [segment_record(segment) for segment in row.get("segments") or [] if segment],
    }


def image_meta_record(meta: dict[str, Any] | None) -> dict[str, Any]:
    """One `image_meta` entry with every field typed: "" and 0 where unknown, phash as 16 hex digits."""
    meta = meta or {}
    record = {}
    for field in IMAGE_META_FIELDS:
        value = meta.get(field.name)
        if field.name == "phash":
            record["phash"] = "" if value is None else f"{int(value) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
        elif value is None:
            record[field.name] = EMPTY_BY_TYPE[str(field.type)]
        else:
            record[field.name] = int(value) if str(field.type) == "int64" else str(value)
    return record


def segment_record(segment: dict[str, Any]) -> dict[str, Any]:
    """A segment with both fields typed: an image segment has text "", a text segment image -1."""
    image = segment.get("image")
    return {"text": _text(segment.get("text")),
            "image": schema.EMPTY_SEGMENT_IMAGE if image is None else int(image)}


def scores_record(scores: dict[str, Any] | None) -> dict[str, float]:
    """Every score of the schema as a float; EMPTY_SCORE where not computed (or not finite)."""
    scores = scores or {}
    record = {}
    for name in SCORE_NAMES:
        value = scores.get(name)
        record[name] = float(value) if value is not None and math.isfinite(value) else schema.EMPTY_SCORE
    return record


def captions_json(captions: list[dict[str, Any]] | None) -> str:
    """The caption variants as one JSON object string, name -> text ("{}" when there is none)."""
    return compact_text({c["name"]: c["text"] for c in captions or [] if c and c.get("text") is not None})


def meta_json(meta: str | None) -> str:
    """`meta` as stored in Parquet (a JSON string); "{}" when there is none."""
    return "{}" if meta is None else meta


def compact_text(value: Any) -> str:
    """`value` as sorted, compact JSON text (NaN refused)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_bytes(record: dict[str, Any]) -> bytes:
    """`record` as the UTF-8 bytes of the `.json` member."""
    return compact_text(record).encode("utf-8")


def record_features():
    """The `datasets.Features` of the `.json` member (what `datasets` infers from any of our shards)."""
    import datasets  # heavy import, only needed by readers

    return datasets.Features.from_arrow_schema(schema.WDS_RECORD_SCHEMA)


def row_from_record(record: dict[str, Any], images: list[bytes]) -> dict[str, Any]:
    """A SAMPLE_SCHEMA row (without embeddings) rebuilt from a `.json` record and the sample's image bytes.

    The inverse of `sample_record`: empty values become null again. A score of exactly
    EMPTY_SCORE reads back as not computed.
    """
    scores = {name: value for name, value in (record.get("scores") or {}).items()
              if value is not None and value != schema.EMPTY_SCORE}
    meta = record.get("meta")
    return {
        "key": record["key"],
        "kind": record.get("kind"),
        "images": [{"bytes": data, "path": None} for data in images],
        "image_meta": [_image_meta_row(meta) for meta in record.get("image_meta") or []],
        "segments": [{"text": None if s.get("image", -1) >= 0 else s.get("text"),
                      "image": s["image"] if s.get("image", -1) >= 0 else None}
                     for s in record.get("segments") or []],
        "captions": [{"name": name, "text": text} for name, text in _json(record.get("captions"), {}).items()],
        "scores": {name: scores.get(name) for name in SCORE_NAMES} if scores else None,
        "roles": list(_json(record.get("roles"), [])),
        "source": {name: value or None for name, value in (record.get("source") or {}).items()},
        "meta": None if meta in (None, "", "{}") else meta,
    }


def _image_meta_row(meta: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for field in IMAGE_META_FIELDS:
        value = meta.get(field.name)
        if field.name == "phash" and value:
            unsigned = int(value, 16)
            row["phash"] = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
        else:
            row[field.name] = value or None
    return row


def _json(text: Any, empty: Any) -> Any:
    if not isinstance(text, str) or not text:
        return empty
    return json.loads(text)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
