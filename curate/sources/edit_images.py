"""Turn one image cell of an edit dataset into image bytes and what their header tells.

A cell may be a Hugging Face Image struct ({bytes, path}), raw bytes, a file path
(relative paths against the dataset's folder) or an http(s) URL (left for the fetch
stage). The bytes are kept as they are; only the header is read here (format, size,
EXIF orientation), so a source stays cheap. Full decoding is the edit_checks stage's job.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError

from curate.fetch.image import READ_FORMATS, SWAPPING_ORIENTATIONS

# Pillow format name -> the `image_meta.format` / WebDataset extension of those bytes.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "DIB": "bmp",
              "TIFF": "tiff", "ICO": "ico", "AVIF": "avif", "HEIF": "heif"}


class ImageCellError(Exception):
    """An image cell that does not hold a usable image; `reason` is a drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class CellImage:
    """An image read from a cell: its bytes (None while only a URL is known) and its `image_meta`."""

    data: bytes | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """What identifies the image's content: the sha256 of its bytes, else its URL."""
        return self.meta.get("sha256") or f"url:{self.meta.get('url')}"

    def as_image(self) -> dict[str, Any]:
        """The `images[i]` struct."""
        return {"bytes": self.data, "path": None}


def read_cell(cell: Any, base_dir: Path, missing: str) -> CellImage:
    """Read an image cell.

    Raises ImageCellError: `missing` for an absent image, `corrupt` for data that is
    not an image, `decompression_bomb` for a header with far too many pixels.
    """
    data, url = _cell_bytes(cell, base_dir, missing)
    if data is None:
        return CellImage(None, {"url": url})
    return CellImage(data, {"url": url, **probe(data)})


def _cell_bytes(cell: Any, base_dir: Path, missing: str) -> tuple[bytes | None, str | None]:
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"]), None
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        if not cell:
            raise ImageCellError(missing, "empty image bytes")
        return bytes(cell), None
    if isinstance(cell, str) and cell.strip():
        location = cell.strip()
        if location.lower().startswith(("http://", "https://")):
            return None, location
        path = Path(location).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ImageCellError(missing, f"cannot read {path}: {error.strerror or error}") from error
        if not data:
            raise ImageCellError(missing, f"{path} is empty")
        return data, None
    empty = cell is None or cell == ""
    raise ImageCellError(missing, "no image" if empty else f"not an image cell: {type(cell).__name__}")


def probe(data: bytes) -> dict[str, Any]:
    """`image_meta` fields known from the header: format, mode, EXIF orientation, upright size, sha256, byte counts."""
    try:
        with Image.open(io.BytesIO(data), formats=readable_formats()) as image:
            pillow_format = image.format or ""
            mode = image.mode
            orientation = _orientation(image)
            width, height = image.size
            if orientation in SWAPPING_ORIENTATIONS:
                width, height = height, width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageCellError("corrupt", f"not an image of a supported format ({type(error).__name__})") from error
    except Image.DecompressionBombError as error:
        raise ImageCellError("decompression_bomb", str(error)) from error
    return {
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": EXTENSIONS.get(pillow_format, pillow_format.lower() or None),
        "original_format": pillow_format or None,
        "original_mode": mode,
        "exif_orientation": orientation,
        "num_bytes": len(data),
        "original_num_bytes": len(data),
    }


def readable_formats() -> tuple[str, ...]:
    """The web image formats (fetch's READ_FORMATS) that this Pillow can open."""
    Image.init()
    return tuple(name for name in READ_FORMATS if name in Image.OPEN)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF means "no orientation"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
