"""Cheap rule-based filtering: image size, aspect ratio and caption length.

Sizes are the original ones (`image_meta[i].original_width/height`, as fetched),
checked for every image of a sample; an image whose size is unknown is not
checked. Every limit is inclusive: a value equal to the limit is kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.schema import caption_text
from curate.stage import Params, Stage, with_drops

TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"


class BasicFilterParams(Params):
    """Limits of the basic filter; None disables a rule."""

    min_side: int | None = Field(None, ge=1)  # shortest side of every image, in pixels
    max_aspect_ratio: float | None = Field(None, ge=1.0)  # longest side / shortest side
    min_caption_chars: int | None = Field(None, ge=0)  # characters, surrounding whitespace excluded
    max_caption_chars: int | None = Field(None, ge=0)
    min_caption_words: int | None = Field(None, ge=0)  # whitespace-separated words
    max_caption_words: int | None = Field(None, ge=0)
    # When False, samples without caption text are kept and skip the caption length rules.
    drop_empty_captions: bool = True

    @model_validator(mode="after")
    def _min_not_above_max(self) -> "BasicFilterParams":
        for unit in ("chars", "words"):
            low, high = getattr(self, f"min_caption_{unit}"), getattr(self, f"max_caption_{unit}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_caption_{unit} ({low}) is above max_caption_{unit} ({high})")
        return self


def sample_text(kind: str, captions: list[dict] | None, segments: list[dict] | None) -> str | None:
    """The text a sample's caption rules apply to.

    A pair's caption (`caption_text`); for other kinds, all text segments joined by a space.
    """
    if kind == "pair":
        return caption_text(captions)
    texts = [s["text"] for s in segments or () if s.get("text") is not None]
    return " ".join(texts) if texts else None


def image_extremes(image_meta: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the smallest short side and the largest aspect ratio over its images.

    Images without a known original size are ignored; a row with none gets
    +inf (smallest side) and -inf (largest ratio), which no limit rejects.
    """
    if isinstance(image_meta, pa.ChunkedArray):
        image_meta = image_meta.combine_chunks()
    rows = len(image_meta)
    smallest = np.full(rows, np.inf)
    largest = np.full(rows, -np.inf)
    flat = pc.list_flatten(image_meta)
    if len(flat) == 0:
        return smallest, largest
    parents = pc.list_parent_indices(image_meta).to_numpy()
    width = pc.struct_field(flat, "original_width").cast(pa.float64()).to_numpy(zero_copy_only=False)
    height = pc.struct_field(flat, "original_height").cast(pa.float64()).to_numpy(zero_copy_only=False)
    short, long = np.minimum(width, height), np.maximum(width, height)  # NaN where unknown
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(short > 0, long / short, np.where(np.isnan(short), np.nan, np.inf))
    np.fmin.at(smallest, parents, short)  # fmin/fmax skip NaN
    np.fmax.at(largest, parents, ratio)
    return smallest, largest


class BasicFilter(Stage):
    """Drops samples whose images are too small or too elongated, or whose caption is empty, too short or too long."""

    name = "basic_filter"
    phase = "prepare"
    Params = BasicFilterParams
    params: BasicFilterParams

    def process(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with `drop_reason`/`drop_detail` set on the rows that break a rule."""
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        self._check_images(batch, reasons, details)
        self._check_captions(batch, reasons, details)
        return with_drops(batch, reasons, details)

    def _check_images(self, batch: pa.Table, reasons: list, details: list) -> None:
        p = self.params
        if p.min_side is None and p.max_aspect_ratio is None:
            return
        smallest, largest = image_extremes(batch.column("image_meta"))
        for i in range(batch.num_rows):
            if p.min_side is not None and smallest[i] < p.min_side:
                reasons[i], details[i] = TOO_SMALL, f"min side {int(smallest[i])} < {p.min_side}"
            elif p.max_aspect_ratio is not None and largest[i] > p.max_aspect_ratio:
                reasons[i], details[i] = ASPECT_RATIO, f"aspect ratio {largest[i]:.2f} > {p.max_aspect_ratio:g}"

    def _check_captions(self, batch: pa.Table, reasons: list, details: list) -> None:
        kinds = batch.column("kind").to_pylist()
        captions = batch.column("captions").to_pylist()
        segments = batch.column("segments").to_pylist()
        for i, kind in enumerate(kinds):
            if reasons[i] is not None:
                continue
            verdict = self._caption_verdict(sample_text(kind, captions[i], segments[i]))
            if verdict is not None:
                reasons[i], details[i] = verdict

    def _caption_verdict(self, text: str | None) -> tuple[str, str] | None:
        """(reason, detail) when `text` breaks a caption rule, else None."""
        p = self.params
        text = (text or "").strip()
        if not text:
            return (EMPTY_CAPTION, "caption is empty") if p.drop_empty_captions else None
        chars, words = len(text), len(text.split())
        if p.min_caption_chars is not None and chars < p.min_caption_chars:
            return CAPTION_TOO_SHORT, f"caption {chars} chars < {p.min_caption_chars}"
        if p.min_caption_words is not None and words < p.min_caption_words:
            return CAPTION_TOO_SHORT, f"caption {words} words < {p.min_caption_words}"
        if p.max_caption_chars is not None and chars > p.max_caption_chars:
            return CAPTION_TOO_LONG, f"caption {chars} chars > {p.max_caption_chars}"
        if p.max_caption_words is not None and words > p.max_caption_words:
            return CAPTION_TOO_LONG, f"caption {words} words > {p.max_caption_words}"
        return None
