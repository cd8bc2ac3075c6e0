"""Checks of image-edit samples: every image there and decodable, and each turn really changes its image.

For every turn of an `edit` sample (curate/edit_sample.py) the input, output and
mask images must have bytes (`edit_missing_image`; an image that only has a URL
needs the fetch stage first) and decode (`corrupt`, `decompression_bomb`). A turn
whose output is its input is `edit_identical`: the same bytes, the same decoded
pixels (sha256 of the upright RGB pixels and size), or a mean absolute change
below `min_change` between 32 x 32 RGB thumbnails (0-255 scale). The change is a
"small perceptual distance" that, unlike a perceptual hash, sees colour edits
("make the car blue" leaves a grayscale pHash unchanged). On the InstructPix2Pix
samples in tests/data real edits change 21-38, while a JPEG re-encode of the same
image changes 0.2-0.6 (quality 90) and 0.6-1.0 (quality 60). The change of each
turn is written to `meta.edit.turns[t].change`.

Samples of other kinds pass unchanged.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import Field

from curate import schema
from curate.edit_sample import EDIT_KIND, Turn, read_turns, write_turns
from curate.fetch.image import READ_FORMATS, pixel_sha256
from curate.stage import Params, Resources, Stage, StageContext, with_drops

EDIT_MISSING_IMAGE = "edit_missing_image"
EDIT_IDENTICAL = "edit_identical"
CORRUPT = "corrupt"
DECOMPRESSION_BOMB = "decompression_bomb"

THUMBNAIL_SIDE = 32
WHITE = (255, 255, 255)


class EditChecksParams(Params):
    """Limits of the edit checks."""

    min_change: float = Field(1.0, ge=0)  # mean absolute thumbnail change (0-255) a turn needs; 0 = exact copies only
    max_pixels: int = Field(89_478_485, ge=1)  # larger images are `decompression_bomb` (Pillow's default limit)
    threads: int = Field(2, ge=1)  # decode threads per worker


@dataclass
class Decoded:
    """What the checks need of one decoded image."""

    pixel_sha256: str
    thumbnail: np.ndarray  # THUMBNAIL_SIDE x THUMBNAIL_SIDE x 3, float32


class DecodeError(Exception):
    """An image that cannot be decoded; `reason` is the drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Drop(Exception):
    """A sample-level failure found while checking one sample."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode(data: bytes, max_pixels: int) -> Decoded:
    """Decode `data` upright to RGB (alpha on white). Raises DecodeError."""
    try:
        with Image.open(io.BytesIO(data), formats=readable_formats()) as image:
            if image.width * image.height > max_pixels:
                raise DecodeError(DECOMPRESSION_BOMB, f"{image.width}x{image.height} pixels > max_pixels {max_pixels}")
            image.load()
            rgb = _to_rgb(_upright(image))
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise DecodeError(DECOMPRESSION_BOMB, str(error)) from error
    except Exception as error:  # noqa: BLE001 - every decoder failure is a drop reason
        raise DecodeError(CORRUPT, f"{type(error).__name__}: {error}") from error
    thumbnail = rgb.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return Decoded(pixel_sha256(rgb), np.asarray(thumbnail, dtype=np.float32))


def readable_formats() -> tuple[str, ...]:
    """The web image formats (fetch's READ_FORMATS) that this Pillow can open."""
    Image.init()
    return tuple(name for name in READ_FORMATS if name in Image.OPEN)


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def change(a: Decoded, b: Decoded) -> float:
    """Mean absolute difference of two thumbnails, 0-255."""
    return float(np.abs(a.thumbnail - b.thumbnail).mean())


class EditChecks(Stage):
    """Drops edit samples with missing or undecodable images and turns that change nothing.

    One step (`process`): its criterion compares each turn's exact change with `min_change`
    while meta records the change rounded to 3 decimals, and whether a turn's output has the
    input's very pixels is not recorded; so every drop is a hard one and a changed
    `min_change` (a selection param) still needs the stage to run again.
    """

    name = "edit_checks"
    Params = EditChecksParams
    phase = "prepare"
    resources = Resources(cpus=1.0)
    reads = frozenset({"kind", "images", "image_meta", "segments", "meta"})
    provides = frozenset({"meta"})
    reads_images = True
    # max_pixels: an image above it does not decode (nothing to measure); threads only sets the pace
    annotation_params = frozenset({"max_pixels", "threads"})
    speed_params = frozenset({"threads"})
    selection_params = frozenset({"min_change"})

    def __init__(self, params: EditChecksParams, context: StageContext | None = None):
        super().__init__(params, context)
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        """Start the decode threads."""
        self._pool = ThreadPoolExecutor(self.params.threads, thread_name_prefix="edit-checks")

    def teardown(self) -> None:
        """Stop the decode threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def process(self, batch: pa.Table) -> pa.Table:
        """Check every edit sample of `batch`; record each turn's change in meta; drop failures."""
        if self._pool is None:
            self.setup()
        columns = {name: batch.column(name).to_pylist() for name in ("kind", "images", "image_meta", "segments",
                                                                       "meta")}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        checked = list(self._pool.map(self._check, rows))
        metas = [meta for meta, _, _ in checked]
        field = schema.SAMPLE_SCHEMA.field("meta")
        batch = batch.set_column(batch.schema.get_field_index("meta"), field, pa.array(metas, field.type))
        return with_drops(batch, [reason for _, reason, _ in checked], [detail for _, _, detail in checked])

    def metrics(self) -> list:
        """meta.edit.turns[].change: a chain's smallest change (recorded to 3 decimals)."""
        from curate.metrics import Metric

        return [Metric("edit.change", "meta.edit.turns.*.change", "mean absolute thumbnail change (0-255), "
                       "smallest turn", reduce="min")]

    def thresholds(self) -> list:
        """min_change on edit.change."""
        from curate.metrics import limits

        return limits(self.params, {"min_change": ("edit.change", "min")})

    def _check(self, row: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        """(meta, drop reason, detail) of one row."""
        if row["kind"] != EDIT_KIND:
            return row["meta"], None, None
        turns = read_turns(row["segments"], row["meta"])
        try:
            changes = self._changes(row, turns)
        except _Drop as drop:
            return row["meta"], drop.reason, drop.detail
        for turn, (value, _) in zip(turns, changes):
            turn.extra["change"] = round(value, 3)
        meta = write_turns(row["meta"], turns)
        for number, (value, same) in enumerate(changes, start=1):
            if same or value < self.params.min_change:
                where = f"turn {number}: " if len(turns) > 1 else ""
                what = "the same pixels" if same else \
                    f"mean absolute change {value:.3f} < min_change {self.params.min_change}"
                return meta, EDIT_IDENTICAL, f"{where}output is the input ({what})"
        return meta, None, None

    def _changes(self, row: dict[str, Any], turns: list[Turn]) -> list[tuple[float, bool]]:
        """Each turn's (change, whether output and input have the same pixels). Raises _Drop."""
        if not turns:
            raise _Drop(EDIT_MISSING_IMAGE, "no turn: an edit needs a source image, an instruction and a target image")
        images, metas = row["images"] or [], row["image_meta"] or []
        decoded: dict[int, Decoded] = {}
        for number, turn in enumerate(turns, start=1):
            where = f"turn {number}: " if len(turns) > 1 else ""
            for role, index in (("source image", turn.input), ("target image", turn.output), ("mask", turn.mask)):
                if index is None and role == "mask":
                    continue
                if index not in decoded:
                    decoded[index] = self._decode(images, metas, index, f"{where}{role}")
        changes = []
        for turn in turns:
            source, target = decoded[turn.input], decoded[turn.output]
            same = turn.input == turn.output or source.pixel_sha256 == target.pixel_sha256
            changes.append((0.0 if same else change(source, target), same))
        return changes

    def _decode(self, images: list[Any], metas: list[Any], index: Any, what: str) -> Decoded:
        if not isinstance(index, int) or not 0 <= index < len(images):
            raise _Drop(EDIT_MISSING_IMAGE, f"{what}: no image {index!r} in a sample of {len(images)} images")
        data = (images[index] or {}).get("bytes")
        if not data:
            url = (metas[index] or {}).get("url") if index < len(metas) else None
            hint = f" (only a URL, {url}: add the fetch stage)" if url else ""
            raise _Drop(EDIT_MISSING_IMAGE, f"{what} (image {index}) has no bytes{hint}")
        try:
            return decode(data, self.params.max_pixels)
        except DecodeError as error:
            raise _Drop(error.reason, f"{what} (image {index}): {error.detail}") from None
