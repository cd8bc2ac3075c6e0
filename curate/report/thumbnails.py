"""Small JPEG thumbnails of sample images, as data: URIs for a self-contained page."""

from __future__ import annotations

import base64
import io
import warnings

from PIL import Image, ImageOps

THUMBNAIL_SIDE = 192
MAX_PIXELS = 64_000_000  # images above this are not decoded for a thumbnail


def thumbnail_jpeg(data: bytes, side: int = THUMBNAIL_SIDE, quality: int = 82) -> bytes | None:
    """A JPEG of `data` fitted in `side` x `side`, or None when the bytes are not a decodable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    return None
                image.draft("RGB", (side, side))
                image = ImageOps.exif_transpose(image)
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    image = image.convert("RGBA")
                    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, image)
                image = image.convert("RGB")
                image.thumbnail((side, side), Image.Resampling.LANCZOS)
                out = io.BytesIO()
                image.save(out, format="JPEG", quality=quality)
                return out.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def data_uri(data: bytes, mime: str) -> str:
    """`data` as a base64 data: URI of type `mime`."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(data: bytes | None, side: int = THUMBNAIL_SIDE) -> str | None:
    """A data: URI of the thumbnail of `data`, or None without bytes or when they do not decode."""
    if not data:
        return None
    jpeg = thumbnail_jpeg(data, side)
    return data_uri(jpeg, "image/jpeg") if jpeg is not None else None
