"""Synthetic watermarks: stock-photo style text and logo overlays on the demo web's drawn scenes.

Two kinds, both drawn over the whole picture area that a CLIP center crop sees:

- ``text``: a brand word ("stockpix", "PREVIEW", ...) repeated in rows across the
  image, semi-transparent, rotated as a block;
- ``logo``: a semi-transparent badge (rounded box or disc with a ring) holding a
  short word, near the centre, plus a small line of text below it.

Everything is drawn with Pillow's bundled font and a seeded random stream, so the
same seed gives the same pixels.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

WATERMARK_KINDS = ("text", "logo")
BRANDS = ("stockpix", "PREVIEW", "photodepot", "SAMPLE", "imagebank", "COPYRIGHT", "pixstore", "proof")
INKS = ((255, 255, 255), (235, 235, 235), (20, 20, 20), (128, 128, 128))


def add_watermark(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """A copy of RGB `image` with a `kind` watermark ("text" or "logo") drawn over it."""
    if kind not in WATERMARK_KINDS:
        raise ValueError(f"unknown watermark kind {kind!r}; expected one of {WATERMARK_KINDS}")
    base = image.convert("RGBA")
    overlay = _tiled_text(base, rng) if kind == "text" else _logo(base, rng)
    return Image.alpha_composite(base, overlay).convert("RGB")


def _font(size: float) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, round(size)))


def _ink(image: Image.Image, rng: random.Random, alpha_range: tuple[float, float]) -> tuple[int, int, int, int]:
    """One of the two inks that stand out most from the image's mean colour, with a random opacity."""
    mean = image.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    ranked = sorted(INKS, key=lambda ink: -sum((a - b) ** 2 for a, b in zip(ink, mean)))
    red, green, blue = rng.choice(ranked[:2])
    return red, green, blue, round(255 * rng.uniform(*alpha_range))


def _tiled_text(image: Image.Image, rng: random.Random) -> Image.Image:
    """Rows of a repeated brand word over the whole image, rotated by up to 35 degrees."""
    width, height = image.size
    side = int((width ** 2 + height ** 2) ** 0.5) + 2  # big enough to cover the image after rotation
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(min(width, height) * rng.uniform(0.14, 0.22))
    word = rng.choice(BRANDS)
    ink = _ink(image, rng, (0.5, 0.8))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    step_x = (right - left) * rng.uniform(1.15, 1.5)
    step_y = (bottom - top) * rng.uniform(2.0, 3.0)
    y, row = rng.uniform(-step_y, 0), 0
    while y < side:
        x = -step_x + (row % 2) * step_x / 2
        while x < side:
            draw.text((x, y), word, font=font, fill=ink, stroke_width=max(1, font.size // 16), stroke_fill=ink)
            x += step_x
        y += step_y
        row += 1
    rotated = layer.rotate(rng.uniform(-35, 35), resample=Image.Resampling.BICUBIC)
    offset = ((side - width) // 2, (side - height) // 2)
    return rotated.crop((offset[0], offset[1], offset[0] + width, offset[1] + height))


def _logo(image: Image.Image, rng: random.Random) -> Image.Image:
    """A badge with a short word near the centre of the image, and a caption line under it."""
    width, height = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    short = min(width, height)
    badge = short * rng.uniform(0.45, 0.65)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * short
    cy = height / 2 + rng.uniform(-0.12, 0.12) * short
    fill = _ink(image, rng, (0.45, 0.7))
    line = (255 - fill[0], 255 - fill[1], 255 - fill[2], min(255, fill[3] + 60))
    box = (cx - badge / 2, cy - badge / 2, cx + badge / 2, cy + badge / 2)
    ring = max(2, round(badge / 14))
    if rng.random() < 0.5:
        draw.ellipse(box, fill=fill, outline=line, width=ring)
    else:
        draw.rounded_rectangle(box, radius=badge / 5, fill=fill, outline=line, width=ring)
    word = rng.choice(BRANDS)
    font = _font(badge * 0.8 / max(3.0, len(word) * 0.6))
    draw.text((cx, cy), word, font=font, fill=line, anchor="mm")
    small = _font(short * 0.07)
    draw.text((cx, min(height - 2, cy + badge / 2 + short * 0.06)), f"(c) {rng.choice(BRANDS)}", font=small,
              fill=fill[:3] + (min(255, fill[3] + 80),), anchor="mt")
    return layer


def watermark_examples(n: int, seed: int) -> tuple[list[Image.Image], list[str | None]]:
    """`n` drawn scenes sized like the demo web's (96-640 px), every other one watermarked.

    Returns the images (two thirds re-encoded as JPEG 85-95, as on the demo web) and
    each one's watermark kind (None for clean ones, else alternately "text" and "logo").
    Different seeds give independent draws: training and evaluation use different ones.
    """
    from curate.demo.web import all_scenes, draw_scene  # the web imports this module

    rng = random.Random(f"watermark-examples:{seed}")
    scenes = all_scenes()
    images, kinds = [], []
    for index in range(n):
        width = rng.randint(96, 640)
        height = min(640, max(96, round(width * rng.uniform(0.6, 1.6))))
        image = draw_scene(rng.choice(scenes), width, height, rng.getrandbits(32))
        kind = WATERMARK_KINDS[(index // 2) % len(WATERMARK_KINDS)] if index % 2 else None
        if kind is not None:
            image = add_watermark(image, kind, rng)
        if rng.random() < 2 / 3:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.choice((85, 90, 95)))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        images.append(image)
        kinds.append(kind)
    return images, kinds
