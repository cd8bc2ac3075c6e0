"""Document filters for interleaved samples: images, text length, failed images, repetition.

Rows of other kinds pass unchanged. First, images too small or too elongated for training
(`min_image_side`, `max_image_aspect_ratio`, original sizes) are removed from the document,
each recorded in meta.removed_images (stage `documents`), as OBELICS removes small images from
its documents rather than dropping the documents. Then the document is judged, in this order:

| reason | rule |
|---|---|
| `too_many_failed_images` | removed / all images the document had > `max_failed_image_share` (removed: see below) |
| `too_few_images` / `too_many_images` | images left < `min_images` / > `max_images` |
| `text_too_short` | characters (or whitespace-separated words) of all text < `min_text_chars` (`min_text_words`) |
| `image_text_ratio` | images per 100 words outside [`min_images_per_100_words`, `max_images_per_100_words`] |
| `duplicate_paragraphs` | share of text segments that repeat an earlier one > `max_duplicate_paragraph_share` |
| `char_repetition` | character repetition ratio > `max_char_repetition_ratio` |
| `word_repetition` | word repetition ratio > `max_word_repetition_ratio` |

Removed images are those in meta.removed_images: fetch failures (with `fetch.on_image_failure:
drop_image`) and the size rules above.

The repetition ratios are those of the BigScience ROOTS / OBELICS filters. Character
repetition (n = `char_repetition_n`, default 10): of the character n-grams of the text, the
share of all occurrences taken by the k most frequent ones, k = floor(sqrt(number of distinct
n-grams)), counting only n-grams that occur more than once. Word repetition (n =
`word_repetition_n`, default 5): the share of word n-gram occurrences whose n-gram occurs more
than once. Both are 0 for a text too short to have an n-gram.

`annotate` removes the images (the size rules) and measures every interleaved document,
whatever the limits, into `meta.documents`: `images` (left after the removal),
`removed_images` (entries of meta.removed_images so far), `text_chars` (all text joined by
newlines, surrounding whitespace excluded), `text_words`, `duplicate_paragraph_share`,
`char_repetition` (n = `char_repetition_n`) and `word_repetition` (n = `word_repetition_n`).
`select` judges from `meta.documents` alone, so changing a limit re-selects without
measuring again (the image size rules and the n-gram sizes change what is measured).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import Field

from curate.extract.document import (
    KIND,
    dump_meta,
    load_meta,
    record_removed,
    remove_images,
    removed_counter,
    texts_of,
)
from curate.schema import SAMPLE_SCHEMA
from curate.stage import Params, Stage, with_drops

TOO_MANY_FAILED_IMAGES = "too_many_failed_images"
TOO_FEW_IMAGES = "too_few_images"
TOO_MANY_IMAGES = "too_many_images"
TEXT_TOO_SHORT = "text_too_short"
IMAGE_TEXT_RATIO = "image_text_ratio"
DUPLICATE_PARAGRAPHS = "duplicate_paragraphs"
CHAR_REPETITION = "char_repetition"
WORD_REPETITION = "word_repetition"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_ASPECT_RATIO = "image_aspect_ratio"

META_KEY = "documents"


class DocumentsParams(Params):
    """Limits of the document filter; None disables a rule. All limits are inclusive."""

    min_image_side: int | None = Field(None, ge=1)  # remove images whose shorter original side is below
    max_image_aspect_ratio: float | None = Field(None, ge=1.0)  # remove images longer / shorter side above
    max_failed_image_share: float | None = Field(None, ge=0.0, le=1.0)
    min_images: int | None = Field(None, ge=0)
    max_images: int | None = Field(None, ge=0)
    min_text_chars: int | None = Field(None, ge=0)
    min_text_words: int | None = Field(None, ge=0)
    min_images_per_100_words: float | None = Field(None, ge=0.0)
    max_images_per_100_words: float | None = Field(None, ge=0.0)
    max_duplicate_paragraph_share: float | None = Field(None, ge=0.0, le=1.0)
    max_char_repetition_ratio: float | None = Field(None, ge=0.0, le=1.0)
    char_repetition_n: int = Field(10, ge=1)
    max_word_repetition_ratio: float | None = Field(None, ge=0.0, le=1.0)
    word_repetition_n: int = Field(5, ge=1)


def char_repetition_ratio(text: str, n: int) -> float:
    """Share of character n-gram occurrences taken by the floor(sqrt(distinct)) most frequent repeated ones."""
    counts = Counter(text[i:i + n] for i in range(len(text) - n + 1))
    if not counts:
        return 0.0
    frequencies = sorted(counts.values(), reverse=True)
    repeated = sum(1 for f in frequencies if f > 1)
    top = min(int(math.sqrt(len(frequencies))), repeated)
    return sum(frequencies[:top]) / sum(frequencies)


def word_repetition_ratio(text: str, n: int) -> float:
    """Share of word n-gram occurrences whose n-gram occurs more than once."""
    words = text.lower().split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0.0
    return sum(f for f in counts.values() if f > 1) / sum(counts.values())


def duplicate_paragraph_share(paragraphs: list[str]) -> float:
    """Share of paragraphs that repeat an earlier one (after trimming)."""
    seen, duplicates = set(), 0
    for paragraph in (p.strip() for p in paragraphs):
        if not paragraph:
            continue
        duplicates += paragraph in seen
        seen.add(paragraph)
    return duplicates / max(1, len(seen) + duplicates)


def measure(image_meta: list[dict], segments: list[dict], meta: str | None, char_n: int,
            word_n: int) -> dict[str, Any]:
    """What `meta.documents` records of one document."""
    paragraphs = texts_of(segments)
    text = "\n".join(paragraphs)
    return {
        "images": len(image_meta),
        "removed_images": len(load_meta(meta).get("removed_images", [])),
        "text_chars": len(text.strip()),
        "text_words": len(text.split()),
        "duplicate_paragraph_share": duplicate_paragraph_share(paragraphs),
        "char_repetition": char_repetition_ratio(text, char_n),
        "word_repetition": word_repetition_ratio(text, word_n),
    }


def read_measurements(meta: str | None) -> dict[str, Any]:
    """The `meta.documents` record of one document; ValueError when it was not annotated."""
    record = load_meta(meta).get(META_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"meta.{META_KEY} is missing: the documents stage's annotate() did not run on this sample")
    return record


class DocumentFilter(Stage):
    """Removes unusable images from interleaved documents, then drops documents that break a rule."""

    name = "documents"
    phase = "prepare"
    Params = DocumentsParams
    params: DocumentsParams
    reads = frozenset({"kind", "images", "image_meta", "segments", "meta"})
    provides = frozenset({"images", "image_meta", "segments", "meta"})
    reads_images = False  # images are removed from the list, their bytes never looked at
    annotation_params = frozenset({"min_image_side", "max_image_aspect_ratio", "char_repetition_n",
                                   "word_repetition_n"})
    selection_params = frozenset(DocumentsParams.model_fields) - annotation_params

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with small images removed from documents and each document measured in meta."""
        kinds = batch.column("kind").to_pylist()
        images = batch.column("images").to_pylist()
        metas = batch.column("image_meta").to_pylist()
        segments = batch.column("segments").to_pylist()
        meta_json = batch.column("meta").to_pylist()
        changed = False
        for row, kind in enumerate(kinds):
            if kind != KIND:
                continue
            removed = self._unusable_images(metas[row] or [])
            if removed:
                changed = True
                images[row], metas[row], segments[row] = remove_images(
                    images[row] or [], metas[row] or [], segments[row], [entry["index"] for entry in removed])
                meta_json[row] = record_removed(meta_json[row], removed)
                for entry in removed:  # the funnel's per-image counts: counters images_removed.<reason>
                    self.count(removed_counter(entry["reason"]))
            record = load_meta(meta_json[row])
            record[META_KEY] = measure(metas[row] or [], segments[row] or [], meta_json[row],
                                       self.params.char_repetition_n, self.params.word_repetition_n)
            meta_json[row] = dump_meta(record)
        replaced = [("images", images), ("image_meta", metas), ("segments", segments)] if changed else []
        for name, values in (*replaced, ("meta", meta_json)):
            field = SAMPLE_SCHEMA.field(name)
            batch = batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))
        return batch

    def select(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with `drop_reason` set on the documents whose `meta.documents` breaks a rule."""
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        for row, (kind, meta) in enumerate(zip(batch.column("kind").to_pylist(), batch.column("meta").to_pylist())):
            if kind == KIND:
                verdict = self._verdict(read_measurements(meta))
                if verdict is not None:
                    reasons[row], details[row] = verdict
        return with_drops(batch, reasons, details)

    def metrics(self) -> list:
        """meta.documents' measurements, and the two ratios `select` computes from them."""
        import numpy as np

        from curate.metrics import Metric

        def failed_share(images: np.ndarray, removed: np.ndarray) -> np.ndarray:
            total = images + removed
            return np.where(total > 0, removed / total, np.where(np.isnan(total), np.nan, 0.0))

        def images_per_100_words(images: np.ndarray, words: np.ndarray) -> np.ndarray:
            ratio = np.where(words > 0, images * 100 / words, np.inf)
            return np.where(np.isnan(images) | np.isnan(words), np.nan, ratio)

        fields = {"images": "images left in the document", "removed_images": "images removed from the document",
                  "text_chars": "characters of all text", "text_words": "words of all text",
                  "duplicate_paragraph_share": "share of paragraphs repeating an earlier one",
                  "char_repetition": f"character repetition ({self.params.char_repetition_n}-grams)",
                  "word_repetition": f"word repetition ({self.params.word_repetition_n}-grams)"}
        return [*(Metric(f"documents.{name}", f"meta.{META_KEY}.{name}", text) for name, text in fields.items()),
                Metric("documents.failed_image_share", description="removed / all images the document had",
                       inputs=(f"meta.{META_KEY}.images", f"meta.{META_KEY}.removed_images"), combine=failed_share),
                Metric("documents.images_per_100_words", description="images per 100 words of text",
                       inputs=(f"meta.{META_KEY}.images", f"meta.{META_KEY}.text_words"),
                       combine=images_per_100_words)]

    def thresholds(self) -> list:
        """Every document limit (the image size rules remove images, they judge no document)."""
        from curate.metrics import limits

        return limits(self.params, {
            "max_failed_image_share": ("documents.failed_image_share", "max"),
            "min_images": ("documents.images", "min"), "max_images": ("documents.images", "max"),
            "min_text_chars": ("documents.text_chars", "min"), "min_text_words": ("documents.text_words", "min"),
            "min_images_per_100_words": ("documents.images_per_100_words", "min"),
            "max_images_per_100_words": ("documents.images_per_100_words", "max"),
            "max_duplicate_paragraph_share": ("documents.duplicate_paragraph_share", "max"),
            "max_char_repetition_ratio": ("documents.char_repetition", "max"),
            "max_word_repetition_ratio": ("documents.word_repetition", "max")})

    def _unusable_images(self, image_meta: list[dict]) -> list[dict]:
        """The images to remove for their size, as meta.removed_images entries."""
        p = self.params
        removed = []
        for index, meta in enumerate(image_meta):
            width, height = (meta or {}).get("original_width"), (meta or {}).get("original_height")
            if not width or not height:
                continue
            short, long = min(width, height), max(width, height)
            entry = {"index": index, "url": meta.get("url"), "stage": self.name}
            if p.min_image_side is not None and short < p.min_image_side:
                removed.append({**entry, "reason": IMAGE_TOO_SMALL, "detail": f"min side {short} < {p.min_image_side}"})
            elif p.max_image_aspect_ratio is not None and long / short > p.max_image_aspect_ratio:
                removed.append({**entry, "reason": IMAGE_ASPECT_RATIO,
                                "detail": f"aspect ratio {long / short:.2f} > {p.max_image_aspect_ratio:g}"})
        return removed

    def _verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, detail) of the first rule a document breaks, in the order of the module docstring."""
        return self._image_verdict(measured) or self._text_length_verdict(measured) or self._text_verdict(measured)

    def _image_verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        images, removed = measured["images"], measured["removed_images"]
        if p.max_failed_image_share is not None:
            share = removed / (removed + images) if removed + images else 0.0
            if share > p.max_failed_image_share:
                return TOO_MANY_FAILED_IMAGES, (f"{removed} of {removed + images} images failed or were removed "
                                                f"({share:.2f} > {p.max_failed_image_share:g})")
        if p.min_images is not None and images < p.min_images:
            return TOO_FEW_IMAGES, f"{images} images < {p.min_images}"
        if p.max_images is not None and images > p.max_images:
            return TOO_MANY_IMAGES, f"{images} images > {p.max_images}"
        return None

    def _text_length_verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        chars, words = measured["text_chars"], measured["text_words"]
        if p.min_text_chars is not None and chars < p.min_text_chars:
            return TEXT_TOO_SHORT, f"text {chars} chars < {p.min_text_chars}"
        if p.min_text_words is not None and words < p.min_text_words:
            return TEXT_TOO_SHORT, f"text {words} words < {p.min_text_words}"
        return None

    def _text_verdict(self, measured: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        images, words = measured["images"], measured["text_words"]
        if p.min_images_per_100_words is not None or p.max_images_per_100_words is not None:
            ratio = images * 100 / words if words else math.inf
            if p.min_images_per_100_words is not None and ratio < p.min_images_per_100_words:
                return IMAGE_TEXT_RATIO, f"{ratio:.2f} images per 100 words < {p.min_images_per_100_words:g}"
            if p.max_images_per_100_words is not None and ratio > p.max_images_per_100_words:
                return IMAGE_TEXT_RATIO, f"{ratio:.2f} images per 100 words > {p.max_images_per_100_words:g}"
        share = measured["duplicate_paragraph_share"]
        if p.max_duplicate_paragraph_share is not None and share > p.max_duplicate_paragraph_share:
            return DUPLICATE_PARAGRAPHS, f"{share:.2f} of paragraphs repeated > {p.max_duplicate_paragraph_share:g}"
        ratio = measured["char_repetition"]
        if p.max_char_repetition_ratio is not None and ratio > p.max_char_repetition_ratio:
            return CHAR_REPETITION, f"character repetition {ratio:.3f} > {p.max_char_repetition_ratio:g}"
        ratio = measured["word_repetition"]
        if p.max_word_repetition_ratio is not None and ratio > p.max_word_repetition_ratio:
            return WORD_REPETITION, f"word repetition {ratio:.3f} > {p.max_word_repetition_ratio:g}"
        return None
