"""Cheap rule-based filtering: image size, aspect ratio and caption length.

Sizes are the original ones (`image_meta[i].original_width/height`, as fetched),
checked for every image of a sample; an image whose size is unknown is not
checked. Every limit is inclusive: a value equal to the limit is kept.

`annotate` measures every sample, whatever the limits, into `meta.basic`:

- `min_side`: the smallest shorter original side over the sample's images (null when no
  image size is known);
- `max_aspect_ratio`: the largest longer / shorter original side (null when no image size
  is known, and when `min_side` is 0: the ratio is then infinite);
- `caption_chars`, `caption_words`: characters (surrounding whitespace excluded) and
  whitespace-separated words of the sample's text (`sample_text`); 0 and 0 when it is empty.

`select` applies the limits to `meta.basic` alone, so changing a limit re-selects without
measuring again. An existing JSON object in `meta` keeps its other keys (see
`curate.extract.document.load_meta` for other values).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.extract.document import dump_meta, load_meta
from curate.schema import SAMPLE_SCHEMA, caption_text
from curate.stage import Params, Stage, with_drops

TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"

META_KEY = "basic"


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


def measurements(smallest: float, largest: float, text: str | None) -> dict[str, Any]:
    """What `meta.basic` records of one sample, from its `image_extremes` and its text."""
    text = (text or "").strip()
    known = not math.isinf(smallest)
    return {
        "min_side": int(smallest) if known else None,
        "max_aspect_ratio": float(largest) if known and not math.isinf(largest) else None,
        "caption_chars": len(text),
        "caption_words": len(text.split()),
    }


def read_measurements(meta: str | None) -> dict[str, Any]:
    """The `meta.basic` record of one sample; ValueError when the sample was not annotated."""
    record = load_meta(meta).get(META_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"meta.{META_KEY} is missing: basic_filter's annotate() did not run on this sample")
    return record


class BasicFilter(Stage):
    """Drops samples whose images are too small or too elongated, or whose caption is empty, too short or too long."""

    name = "basic_filter"
    phase = "prepare"
    Params = BasicFilterParams
    params: BasicFilterParams
    reads = frozenset({"kind", "captions", "segments", "image_meta", "meta"})
    provides = frozenset({"meta"})
    reads_images = False
    annotation_params = frozenset()  # the measurements do not depend on the limits
    selection_params = frozenset(BasicFilterParams.model_fields)

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with every sample's measurements in `meta.basic`."""
        smallest, largest = image_extremes(batch.column("image_meta"))
        texts = map(sample_text, *(batch.column(name).to_pylist() for name in ("kind", "captions", "segments")))
        metas = []
        for row, (meta, text) in enumerate(zip(batch.column("meta").to_pylist(), texts)):
            record = load_meta(meta)
            record[META_KEY] = measurements(smallest[row], largest[row], text)
            metas.append(dump_meta(record))
        field = SAMPLE_SCHEMA.field("meta")
        return batch.set_column(batch.schema.get_field_index("meta"), field, pa.array(metas, field.type))

    def select(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with `drop_reason`/`drop_detail` set on the rows whose `meta.basic` breaks a rule."""
        verdicts = [self._verdict(read_measurements(meta)) for meta in batch.column("meta").to_pylist()]
        return with_drops(batch, [v[0] if v else None for v in verdicts], [v[1] if v else None for v in verdicts])

    def metrics(self) -> list:
        """meta.basic: smallest side, largest aspect ratio (infinite with a side of 0), caption length."""
        from curate.metrics import Metric

        side, ratio = f"meta.{META_KEY}.min_side", f"meta.{META_KEY}.max_aspect_ratio"
        return [Metric("basic.min_side", side, "shorter original side of the smallest image"),
                Metric("basic.max_aspect_ratio", description="longer / shorter original side, most elongated image",
                       inputs=(side, ratio), combine=lambda sides, ratios: np.where(sides == 0, np.inf, ratios)),
                Metric("basic.caption_chars", f"meta.{META_KEY}.caption_chars", "caption characters"),
                Metric("basic.caption_words", f"meta.{META_KEY}.caption_words", "caption words")]

    def thresholds(self) -> list:
        """Every limit on a measurement (drop_empty_captions is a rule, not a threshold)."""
        from curate.metrics import limits

        return limits(self.params, {
            "min_side": ("basic.min_side", "min"), "max_aspect_ratio": ("basic.max_aspect_ratio", "max"),
            "min_caption_chars": ("basic.caption_chars", "min"), "max_caption_chars": ("basic.caption_chars", "max"),
            "min_caption_words": ("basic.caption_words", "min"), "max_caption_words": ("basic.caption_words", "max")})

    def _verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, detail) of the first rule a sample breaks, image rules first, else None."""
        return self._image_verdict(measured) or self._caption_verdict(measured)

    def _image_verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        smallest = measured["min_side"]
        if smallest is None:
            return None
        largest = math.inf if smallest == 0 else measured["max_aspect_ratio"]
        if p.min_side is not None and smallest < p.min_side:
            return TOO_SMALL, f"min side {smallest} < {p.min_side}"
        if p.max_aspect_ratio is not None and largest > p.max_aspect_ratio:
            return ASPECT_RATIO, f"aspect ratio {largest:.2f} > {p.max_aspect_ratio:g}"
        return None

    def _caption_verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        chars, words = measured["caption_chars"], measured["caption_words"]
        if not chars:
            return (EMPTY_CAPTION, "caption is empty") if p.drop_empty_captions else None
        if p.min_caption_chars is not None and chars < p.min_caption_chars:
            return CAPTION_TOO_SHORT, f"caption {chars} chars < {p.min_caption_chars}"
        if p.min_caption_words is not None and words < p.min_caption_words:
            return CAPTION_TOO_SHORT, f"caption {words} words < {p.min_caption_words}"
        if p.max_caption_chars is not None and chars > p.max_caption_chars:
            return CAPTION_TOO_LONG, f"caption {chars} chars > {p.max_caption_chars}"
        if p.max_caption_words is not None and words > p.max_caption_words:
            return CAPTION_TOO_LONG, f"caption {words} words > {p.max_caption_words}"
        return None
