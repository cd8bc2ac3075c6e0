"""Decoding stored image bytes for the safety detectors, re-encoding edited pixels, and `meta` updates."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

# image_meta[].format -> Pillow's encoder name
ENCODERS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


def decode_rgb(data: bytes | None, max_side: int | None = None) -> Image.Image:
    """Decode stored image bytes to RGB; a JPEG larger than `max_side` may be decoded at 1/2..1/8 scale.

    Raises ValueError for missing bytes; Pillow's errors pass through for broken data.
    """
    if data is None:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(data)) as image:
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        return image.convert("RGB")


def encode_like(image: Image.Image, fmt: str | None, original: bytes, quality: int) -> tuple[bytes, str]:
    """Encode RGB `image` in `fmt` (image_meta format; unknown: the original bytes' format) without metadata.

    Returns the bytes and the format name as image_meta records it.
    """
    encoder = ENCODERS.get((fmt or "").lower())
    if encoder is None:
        with Image.open(io.BytesIO(original)) as source:
            encoder = source.format if source.format in ("JPEG", "WEBP", "PNG") else "PNG"
    image.info = {}
    buffer = io.BytesIO()
    if encoder == "JPEG":
        image.save(buffer, "JPEG", quality=quality, optimize=False)
    elif encoder == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=4)
    else:
        image.save(buffer, "PNG")
    name = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}[encoder]
    return buffer.getvalue(), (fmt if fmt and fmt.lower() in ENCODERS else name)


def meta_object(meta: str | None) -> dict[str, Any]:
    """The sample's `meta` JSON as a dict (a non-object meta is kept as `original`)."""
    try:
        current = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        current = {"original": meta}
    if not isinstance(current, dict):
        current = {"original": current}
    return current


def _dump(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def merge_meta(meta: str | None, update: dict[str, Any]) -> str:
    """The sample's `meta` JSON with the keys of `update` set (a non-object meta is kept as `original`)."""
    current = meta_object(meta)
    current.update(update)
    return _dump(current)


def replace_meta_keys(meta: str | None, update: dict[str, Any]) -> str | None:
    """`meta` with the keys of `update` set, those whose value is None removed; unchanged when that changes nothing.

    A stage uses it for keys it owns, so a sample annotated again keeps no stale value.
    """
    current = meta_object(meta)
    changes = {key: value for key, value in update.items()
               if (value is None and key in current) or (value is not None and current.get(key) != value)}
    if not changes:
        return meta
    for key, value in changes.items():
        if value is None:
            del current[key]
        else:
            current[key] = value
    return _dump(current)


def sample_texts(captions: list[dict] | None, segments: list[dict] | None) -> list[str]:
    """Every text of a sample: all named captions and all text segments."""
    texts = [c["text"] for c in captions or () if c.get("text")]
    texts += [s["text"] for s in segments or () if s.get("text")]
    return texts
