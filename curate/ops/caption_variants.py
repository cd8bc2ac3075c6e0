"""Writing one named caption variant into the `captions` column (list of {name, text})."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

from curate import schema

OnExisting = Literal["replace", "keep"]


def set_caption(captions: list[dict] | None, name: str, text: str | None, on_existing: OnExisting) -> list[dict]:
    """`captions` with variant `name` set to `text`.

    A None `text` changes nothing. An existing variant of that name (with text) is replaced, or kept
    with `on_existing: keep`; a new variant goes after the others, so the default caption is unchanged.
    """
    captions = [dict(c) for c in captions or ()]
    if text is None:
        return captions
    for caption in captions:
        if caption["name"] == name:
            if on_existing == "replace" or caption["text"] is None:
                caption["text"] = text
            return captions
    captions.append({"name": name, "text": text})
    return captions


def with_caption_variant(batch: pa.Table, name: str, texts: list[str | None], on_existing: OnExisting) -> pa.Table:
    """`batch` with caption variant `name` set per row from `texts` (None: row unchanged)."""
    current = batch.column("captions").to_pylist()
    updated = [set_caption(captions, name, text, on_existing) for captions, text in zip(current, texts)]
    field = schema.SAMPLE_SCHEMA.field("captions")
    return batch.set_column(batch.schema.get_field_index("captions"), field, pa.array(updated, field.type))
