"""The sample fields a role condition may name, and how each is read from a batch of samples.

Every field is read from the unified sample (curate/schema.py); a field without a
value for a sample (no score computed, no caption, no image size known) is
missing (None), and a comparison with a missing value is false.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema

NUMBER = "number"
STRING = "string"
BOOL = "bool"
STRINGS = "list of strings"


@dataclass(frozen=True)
class FieldInfo:
    """A field's type (number, string, list of strings) and what it means."""

    type: str
    doc: str


_SCORE_DOCS = {
    "clip_score": "cosine of the CLIP image and caption embeddings (clip_score stage)",
    "aesthetic": "aesthetic head score, about 1-10 (aesthetic stage)",
    "clip_direction": "edits: weakest turn's directional CLIP similarity (edit_direction stage)",
    "nsfw": "probability of nudity, max over the images (nsfw stage)",
    "watermark": "probability of a watermark on image 0 (watermark stage)",
}

_IMAGE_DOC = ("over all images of the sample, from the stored size (image_meta width/height, else the original "
              "size); missing when no image size is known")

FIELDS: dict[str, FieldInfo] = {
    "kind": FieldInfo(STRING, "pair, interleaved or edit"),
    **{f.name: FieldInfo(NUMBER, f"scores.{f.name}: {_SCORE_DOCS.get(f.name, 'a sample score')}")
       for f in schema.SCORES},
    "caption_chars": FieldInfo(NUMBER, "characters of the role's caption (the first of the role's `captions` the "
                                       "sample has; without `captions`: alt, else the first caption), surrounding "
                                       "whitespace excluded; missing without one"),
    "caption_words": FieldInfo(NUMBER, "whitespace-separated words of the role's preferred caption"),
    "caption_names": FieldInfo(STRINGS, "names of the sample's caption variants with text, for "
                                        "`'dense' in caption_names`"),
    "num_images": FieldInfo(NUMBER, "number of images of the sample"),
    "min_side": FieldInfo(NUMBER, f"smallest short side of any image, {_IMAGE_DOC}"),
    "max_side": FieldInfo(NUMBER, f"largest long side of any image, {_IMAGE_DOC}"),
    "min_width": FieldInfo(NUMBER, f"smallest width, {_IMAGE_DOC}"),
    "min_height": FieldInfo(NUMBER, f"smallest height, {_IMAGE_DOC}"),
    "max_width": FieldInfo(NUMBER, f"largest width, {_IMAGE_DOC}"),
    "max_height": FieldInfo(NUMBER, f"largest height, {_IMAGE_DOC}"),
    "min_pixels": FieldInfo(NUMBER, f"smallest width x height, {_IMAGE_DOC}"),
    "max_pixels": FieldInfo(NUMBER, f"largest width x height, {_IMAGE_DOC}"),
    "max_aspect_ratio": FieldInfo(NUMBER, f"largest long side / short side, {_IMAGE_DOC}"),
    "source.dataset": FieldInfo(STRING, "source.dataset"),
    "source.license": FieldInfo(STRING, "source.license"),
    "language": FieldInfo(STRING, "meta.language.code as the language stage writes it (or a plain string "
                                  "meta.language); missing when not detected"),
}

# Fields whose value depends on the role asking (its caption preference).
CAPTION_FIELDS = frozenset({"caption_chars", "caption_words"})

_IMAGE_FIELDS = ("min_side", "max_side", "min_width", "min_height", "max_width", "max_height", "min_pixels",
                 "max_pixels", "max_aspect_ratio")


def field_types() -> dict[str, str]:
    """Field name -> type, what the expression checker needs."""
    return {name: info.type for name, info in FIELDS.items()}


class BatchFields:
    """Per-row values of the fields of one batch, each computed on first use."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._cache: dict[tuple[str, tuple[str, ...]], list[Any]] = {}

    def rows(self, names: Iterable[str], prefer: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """One dict per row with the values of `names`; caption fields follow `prefer`."""
        names = list(names)
        columns = [self.values(name, prefer) for name in names]
        if not names:
            return [{} for _ in range(self.table.num_rows)]
        return [dict(zip(names, values)) for values in zip(*columns)]

    def values(self, name: str, prefer: tuple[str, ...] = ()) -> list[Any]:
        """The values of field `name` for every row (None where missing)."""
        cache_key = (name, tuple(prefer) if name in CAPTION_FIELDS else ())
        if cache_key not in self._cache:
            if name in _IMAGE_FIELDS:
                self._cache.update({(field, ()): values for field, values in self._image_fields().items()})
            else:
                self._cache[cache_key] = self._compute(name, tuple(prefer))
        return self._cache[cache_key]

    def _compute(self, name: str, prefer: tuple[str, ...]) -> list[Any]:
        table = self.table
        if name == "kind":
            return table.column("kind").to_pylist()
        if name in schema.SCORES.names:
            values = pc.struct_field(table.column("scores"), name).to_pylist()
            return [None if v is None or math.isnan(v) else v for v in values]
        if name in CAPTION_FIELDS:
            texts = [role_caption(c, prefer) for c in table.column("captions").to_pylist()]
            if name == "caption_chars":
                return [None if t is None else len(t.strip()) for t in texts]
            return [None if t is None else len(t.split()) for t in texts]
        if name == "caption_names":
            return [[c["name"] for c in captions or () if c["text"]]
                    for captions in table.column("captions").to_pylist()]
        if name == "num_images":
            return pc.fill_null(pc.list_value_length(table.column("image_meta")), 0).to_pylist()
        if name.startswith("source."):
            return pc.struct_field(table.column("source"), name.split(".", 1)[1]).to_pylist()
        if name == "language":
            return [_language(meta) for meta in table.column("meta").to_pylist()]
        raise KeyError(name)

    def _image_fields(self) -> dict[str, list[Any]]:
        result: dict[str, list[Any]] = {name: [] for name in _IMAGE_FIELDS}
        for metas in self.table.column("image_meta").to_pylist():
            sizes = [size for size in (_image_size(m) for m in metas or ()) if size is not None]
            widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
            shorts, longs = [min(s) for s in sizes], [max(s) for s in sizes]
            ratios = [long / short for short, long in zip(shorts, longs) if short > 0]
            row = {
                "min_side": min(shorts, default=None), "max_side": max(longs, default=None),
                "min_width": min(widths, default=None), "min_height": min(heights, default=None),
                "max_width": max(widths, default=None), "max_height": max(heights, default=None),
                "min_pixels": min((w * h for w, h in sizes), default=None),
                "max_pixels": max((w * h for w, h in sizes), default=None),
                "max_aspect_ratio": max(ratios, default=None),
            }
            for name, value in row.items():
                result[name].append(value)
        return result


def role_caption(captions: list[dict] | None, prefer: tuple[str, ...] = ()) -> str | None:
    """A role's caption: the first variant of `prefer` the sample has with text, else None.

    Without `prefer`, the default caption (`alt`, else the first one), as exporters choose it.
    """
    if not prefer:
        return schema.caption_text(captions)
    texts: dict[str, str] = {}
    for caption in captions or ():
        if caption["text"]:
            texts.setdefault(caption["name"], caption["text"])
    return next((texts[name] for name in prefer if name in texts), None)


def _image_size(meta: dict | None) -> tuple[int, int] | None:
    """The stored size of one image, else its original size, else None."""
    if not meta:
        return None
    for width_key, height_key in (("width", "height"), ("original_width", "original_height")):
        width, height = meta.get(width_key), meta.get(height_key)
        if width is not None and height is not None:
            return int(width), int(height)
    return None


def _language(meta: str | None) -> str | None:
    if not meta:
        return None
    try:
        record = json.loads(meta)
    except ValueError:
        return None
    language = record.get("language") if isinstance(record, dict) else None
    if isinstance(language, dict):
        language = language.get("code")
    return language if isinstance(language, str) else None
