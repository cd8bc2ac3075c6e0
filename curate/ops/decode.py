"""The `decode` stage: decode images that came with their bytes, and fill their `image_meta` as fetch does.

Sources of stored images (image_folder, image_shards, hf_dataset) yield samples whose bytes
are already there; the fetch stage leaves such images alone. This stage decodes each of them
with the fetch stage's `process_image`: upright sRGB, `pixel_sha256` and `phash` for dedup,
resized and re-encoded per `resize` / `encode` (or kept byte for byte with `keep_bytes`).

`width`, `height`, `format` and `num_bytes` then describe the stored bytes. What describes the
image as first obtained (`sha256`, `original_width/height`, `original_format`, `original_mode`,
`exif_orientation`, `original_num_bytes`) is kept when the source recorded it (`sha256` set), else taken from
the bytes decoded here. Images that already have `pixel_sha256` (fetched ones) and images
without bytes are left as they are. A row with an image that does not decode is dropped with
the reason of process_image: `not_image`, `decompression_bomb` or `corrupt`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import ImageError, ProcessedImage, process_image
from curate.schema import SAMPLE_SCHEMA
from curate.sources.edit_images import EXTENSIONS
from curate.stage import Params, Resources, Stage, with_drops

ORIGINAL_FIELDS = ("sha256", "original_width", "original_height", "original_format", "original_mode",
                   "exif_orientation", "original_num_bytes")
# With keep_bytes the re-encoded copy is thrown away; the cheapest encoding keeps that waste small.
_THROWAWAY_ENCODE = EncodeParams(format="jpg", quality=1)
_NO_RESIZE = ResizeParams(mode="none")


class DecodeParams(Params):
    """How stored images are resized and re-encoded (the same settings as the fetch stage's)."""

    resize: ResizeParams = ResizeParams()
    encode: EncodeParams = EncodeParams()
    keep_bytes: bool = False  # keep the stored bytes as they are; only fill image_meta (resize/encode unused)
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb limit (Pillow's default)


class DecodeStage(Stage):
    """Fill `image_meta` (size, format, pixel_sha256, phash) of images that came with bytes, resizing per recipe."""

    name = "decode"
    Params = DecodeParams
    params: DecodeParams
    phase = "prepare"
    resources = Resources(cpus=1.0)
    fingerprints_images = "stored"
    reads = frozenset({"images", "image_meta"})
    provides = frozenset({"images", "image_meta"})
    reads_images = True
    annotation_params = frozenset(DecodeParams.model_fields)  # max_pixels decides what decodes at all
    selection_params = frozenset()
    pool_params = frozenset({"resize", "encode", "keep_bytes"})

    def process(self, batch: pa.Table) -> pa.Table:
        """Decode every stored, not yet decoded image of `batch`; drop rows with an image that does not decode."""
        raw_images = batch.column("images").to_pylist()
        raw_metas = batch.column("image_meta").to_pylist()
        reasons: list[str | None] = [None] * batch.num_rows
        details: list[str | None] = [None] * batch.num_rows
        images, metas = [], []
        for row, (row_images, row_metas) in enumerate(zip(raw_images, raw_metas)):
            row_images, row_metas = list(row_images or []), list(row_metas or [])
            row_metas.extend([None] * (len(row_images) - len(row_metas)))
            for index, image in enumerate(row_images):
                meta = row_metas[index] or {}
                if not image or image.get("bytes") is None or meta.get("pixel_sha256") is not None:
                    continue
                try:
                    processed = self._decode(image["bytes"])
                except ImageError as error:
                    reasons[row] = error.reason
                    details[row] = error.detail if len(row_images) == 1 else f"image {index}: {error.detail}"
                    break
                row_images[index] = {"bytes": self._stored_bytes(image["bytes"], processed), "path": image.get("path")}
                row_metas[index] = self._meta(meta, image["bytes"], processed)
            images.append(row_images)
            metas.append(row_metas)
        batch = _replace(batch, "images", images)
        batch = _replace(batch, "image_meta", metas)
        return with_drops(batch, reasons, details)

    def _decode(self, data: bytes) -> ProcessedImage:
        p = self.params
        if p.keep_bytes:
            return process_image(data, _NO_RESIZE, _THROWAWAY_ENCODE, p.max_pixels)
        return process_image(data, p.resize, p.encode, p.max_pixels)

    def _stored_bytes(self, data: bytes, processed: ProcessedImage) -> bytes:
        return data if self.params.keep_bytes else processed.data

    def _meta(self, old: dict[str, Any], data: bytes, processed: ProcessedImage) -> dict[str, Any]:
        """The new image_meta: the stored bytes' description, the original's as recorded, the fingerprints."""
        if self.params.keep_bytes:
            stored = {"width": processed.original_width, "height": processed.original_height,
                      "format": EXTENSIONS.get(processed.original_format, processed.original_format.lower()),
                      "num_bytes": len(data)}
        else:
            stored = {"width": processed.width, "height": processed.height, "format": processed.format,
                      "num_bytes": processed.num_bytes}
        if old.get("sha256") is not None:
            original = {name: old.get(name) for name in ORIGINAL_FIELDS}
        else:
            original = {"sha256": processed.sha256, "original_width": processed.original_width,
                        "original_height": processed.original_height,
                        "original_format": processed.original_format,
                        "original_mode": processed.original_mode,
                        "exif_orientation": processed.exif_orientation,
                        "original_num_bytes": processed.original_num_bytes}
        return {"url": old.get("url"), **stored, **original, "pixel_sha256": processed.pixel_sha256,
                "phash": processed.phash}


def _replace(batch: pa.Table, name: str, values: list[Any]) -> pa.Table:
    field = SAMPLE_SCHEMA.field(name)
    return batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))
