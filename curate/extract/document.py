"""The interleaved document as a unified sample, and the edits stages make to one.

A document is a list of items in reading order: text (str) or DocumentImage. As a sample
(docs/architecture.md, "Interleaved documents") it is `kind = interleaved`, `images` /
`image_meta` in order of first appearance, and `segments` that interleave text entries and
image indices. `meta` is a JSON object: the source's own fields, `images` (per-image details
from the source, in the source's order, each with its `url`) and, once stages remove images,
`removed_images` ({index, url, stage, reason, detail}).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

KIND = "interleaved"
IMAGES_REMOVED = "images_removed"  # prefix of the stage counters of removed images (removed_counter)


@dataclass(frozen=True)
class DocumentImage:
    """An image of a document: its URL and/or its bytes, and what the source says about it."""

    url: str | None
    data: bytes | None = None
    info: dict[str, Any] | None = None


def dump_meta(meta: dict[str, Any] | None) -> str | None:
    """`meta` as the compact, key-sorted JSON stored in the `meta` column (None when empty)."""
    if not meta:
        return None
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def load_meta(meta: str | None) -> dict[str, Any]:
    """The `meta` column of a sample as a dict (a non-object value is kept under `original`)."""
    if not meta:
        return {}
    try:
        value = json.loads(meta)
    except json.JSONDecodeError:
        return {"original": meta}
    return value if isinstance(value, dict) else {"original": value}


def document_sample(
    key: str,
    dataset: str,
    row_id: str,
    url: str | None,
    items: Iterable[str | DocumentImage],
    meta: dict[str, Any] | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """A unified sample (dict) of kind `interleaved` from items in reading order.

    Empty texts are left out. Per-image `info` of the source goes to meta["images"], aligned with
    `images` as built here (later stages that remove images leave it unchanged; join on `url`).
    """
    images, image_meta, segments, infos = [], [], [], []
    for item in items:
        if isinstance(item, DocumentImage):
            segments.append({"text": None, "image": len(images)})
            images.append({"bytes": item.data, "path": None})
            image_meta.append({"url": item.url})
            infos.append({"url": item.url, **(item.info or {})})
        elif item and item.strip():
            segments.append({"text": item, "image": None})
    meta = dict(meta or {})
    if any(len(info) > 1 for info in infos):
        meta["images"] = infos
    return {
        "key": key,
        "kind": KIND,
        "images": images,
        "image_meta": image_meta,
        "segments": segments,
        "captions": [],
        "scores": None,
        "roles": [],
        "source": {"dataset": dataset, "id": row_id, "url": url, "license": license},
        "meta": dump_meta(meta),
    }


def remove_images(
    images: list[dict | None], image_meta: list[dict | None], segments: list[dict] | None, drop: Iterable[int]
) -> tuple[list[dict | None], list[dict | None], list[dict]]:
    """The sample's images, image_meta and segments without the images at indices `drop`.

    Segments that showed a removed image are removed; the others are renumbered, so the
    text order and the order of the remaining images are unchanged.
    """
    drop = set(drop)
    new_index, kept_images, kept_meta = {}, [], []
    for index, meta in enumerate(image_meta):
        if index in drop:
            continue
        new_index[index] = len(kept_meta)
        kept_images.append(images[index] if index < len(images) else None)
        kept_meta.append(meta)
    kept_segments = []
    for segment in segments or []:
        image = segment.get("image")
        if image is None:
            kept_segments.append(segment)
        elif image in new_index:
            kept_segments.append({**segment, "image": new_index[image]})
    return kept_images, kept_meta, kept_segments


def removed_counter(reason: str | None) -> str:
    """The stage counter (Stage.count) of images removed from documents for `reason`: `images_removed.<reason>`.

    Stages that remove images count one per image, so the manifest's funnel has them per stage and reason.
    """
    return f"{IMAGES_REMOVED}.{reason or 'unknown'}"


def record_removed(meta: str | None, removed: list[dict[str, Any]]) -> str | None:
    """`meta` with `removed` appended to its `removed_images` list."""
    if not removed:
        return meta
    data = load_meta(meta)
    data["removed_images"] = [*data.get("removed_images", []), *removed]
    return dump_meta(data)


def texts_of(segments: list[dict] | None) -> list[str]:
    """The text entries of a sample's segments, in order."""
    return [s["text"] for s in segments or () if s.get("text") is not None]
