"""The synthetic web of the offline demo: drawn images, their captions, and planted faults.

Every image depicts a simple scene from a small vocabulary (counts x colours x
shapes x backgrounds), e.g. "two green squares on a yellow background", and the
drawing matches the caption, so a caption/image alignment model can tell the
planted mismatches from the rest. Each row of the URL list names the condition
planted on it in `expect`:

- ``ok``: a plain image with its true caption;
- ``mismatched_caption``: the caption of a clearly different scene;
- ``near_duplicate``: an earlier ``ok`` image re-encoded, resized or shifted a little;
- ``duplicate_url``: an earlier ``ok`` row's URL listed again;
- ``tiny``: an image under 32 px on each side;
- ``huge_aspect``: an image more than 5 times wider than tall;
- ``broken_link``: no route (the server answers 404);
- ``corrupt``: a JPEG cut in half, served with the length of what is sent;
- ``opt_out``: served with ``X-Robots-Tag: noai``;
- ``server_error_then_ok``: answers 500 once, then the image;
- ``not_image``: an HTML page at an image URL;
- ``low_quality``: a scene with its true caption, heavily blurred and noisy (for the aesthetic filter);
- ``watermarked``: a scene with its true caption under a stock-photo style text or logo overlay
  (curate.demo.watermark; the row's `watermark` says which), planted only when `build_synthetic_web`
  is given a `watermarked` share.

Everything is deterministic in `seed`: two builds give the same bytes.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from curate.demo.server import Route
from curate.demo.watermark import WATERMARK_KINDS, add_watermark

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "orange": (245, 135, 25),
    "purple": (135, 55, 175),
}
SHAPES = ("circle", "square", "triangle", "star")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
MIN_CONTRAST = 200.0  # RGB distance between a shape's colour and its background

# Planted conditions with a fixed count; the proportional ones are in `planted_counts`.
FIXED_COUNTS = {
    "tiny": 3,
    "broken_link": 3,
    "corrupt": 3,
    "opt_out": 1,
    "server_error_then_ok": 3,
    "not_image": 1,
    "huge_aspect": 1,
    "duplicate_url": 2,
}
MIN_IMAGES = 40
NEAR_DUPLICATE_VARIANTS = ("requality", "resize", "shift")
NOT_IMAGE_BODY = b"<!doctype html><html><head><title>Gallery</title></head><body><p>Image gallery</p></body></html>"


@dataclass(frozen=True)
class Scene:
    """What an image depicts: `count` shapes of one colour on a plain background."""

    count: int
    colour: str
    shape: str
    background: str

    def caption(self) -> str:
        """The sentence that describes the scene, e.g. "two red circles on a blue background"."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{_article(COUNT_WORDS[self.count], self.colour)} {noun} on {_article('a', self.background)} background"


def _article(word: str, following: str) -> str:
    """`word following`, with "a" turned into "an" before a vowel."""
    if word == "a" and following[0] in "aeiou":
        word = "an"
    return f"{word} {following}"


@dataclass
class SyntheticWeb:
    """Routes to serve (path -> Route) and the URL list rows that point at them.

    Each row has `path`, `caption`, `expect` (the planted condition), `true_caption`
    (what the image really shows; None without an image), `width`, `height` and
    `format` of the image as drawn (None without one), `duplicate_of` (the
    path of the original for near duplicates and repeated URLs) and `watermark`
    (the overlay kind, "text" or "logo", of watermarked rows; None otherwise).
    """

    routes: dict[str, Route] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Drawing:
    """A drawn image and how to draw it again."""

    scene: Scene
    width: int
    height: int
    layout_seed: int
    image: Image.Image


def contrasting(colour: str, background: str) -> bool:
    """Whether shapes of `colour` stand out clearly on `background`."""
    return math.dist(COLOURS[colour], COLOURS[background]) >= MIN_CONTRAST


def all_scenes() -> list[Scene]:
    """Every scene of the vocabulary whose shapes contrast with the background."""
    return [
        Scene(count, colour, shape, background)
        for count, colour, shape, background in itertools.product(COUNT_WORDS, COLOURS, SHAPES, COLOURS)
        if colour != background and contrasting(colour, background)
    ]


def planted_counts(n_images: int, watermarked: float = 0.0) -> dict[str, int]:
    """How many rows of each condition a web of `n_images` rows has (`watermarked`: share of watermarked rows)."""
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be at least {MIN_IMAGES}, got {n_images}")
    if not 0.0 <= watermarked <= 0.5:
        raise ValueError(f"watermarked must be a share between 0 and 0.5, got {watermarked}")
    counts = {"mismatched_caption": round(0.10 * n_images), "near_duplicate": round(0.05 * n_images),
              "low_quality": round(0.05 * n_images)}
    if round(watermarked * n_images):
        counts["watermarked"] = round(watermarked * n_images)
    counts.update(FIXED_COUNTS)
    counts["ok"] = n_images - sum(counts.values())
    return counts


def draw_scene(scene: Scene, width: int, height: int, layout_seed: int, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """Draw `scene` at `width` x `height`.

    The shapes sit in `count` cells along the longer side; their size and place in
    the cell come from `layout_seed`, relative to the image, so the same seed at
    another size draws the same picture scaled. `shift` moves every shape by pixels.
    """
    rng = random.Random(layout_seed)
    image = Image.new("RGB", (width, height), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    across = width >= height
    cell_w = width / scene.count if across else width
    cell_h = height if across else height / scene.count
    for index in range(scene.count):
        size = rng.uniform(0.55, 0.8) * min(cell_w, cell_h)
        x0 = index * cell_w if across else 0.0
        y0 = 0.0 if across else index * cell_h
        cx = x0 + cell_w / 2 + rng.uniform(-1, 1) * (cell_w - size) / 2 + shift[0]
        cy = y0 + cell_h / 2 + rng.uniform(-1, 1) * (cell_h - size) / 2 + shift[1]
        _draw_shape(draw, scene.shape, cx, cy, size, COLOURS[scene.colour])
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, colour: tuple[int, int, int]
) -> None:
    half = size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Encode `image` as JPEG (at `quality`) or PNG."""
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


class _Builder:
    """Builds the rows and routes of one web, drawing from one seeded random stream."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.web = SyntheticWeb()
        self.scene_pool: list[Scene] = []
        self.originals: list[dict[str, Any]] = []  # ok rows not yet copied by a near duplicate or repeated URL
        self.drawings: dict[str, _Drawing] = {}  # path -> drawing, for ok rows
        self.near_duplicates = 0
        self.watermarks = 0

    def next_scene(self) -> Scene:
        """A scene not used yet (the whole vocabulary is used before any repeats)."""
        if not self.scene_pool:
            self.scene_pool = all_scenes()
            self.rng.shuffle(self.scene_pool)
        return self.scene_pool.pop()

    def normal_size(self) -> tuple[int, int]:
        width = self.rng.randint(96, 640)
        height = min(640, max(96, round(width * self.rng.uniform(0.6, 1.6))))
        return width, height

    def draw(self, size: tuple[int, int] | None = None) -> _Drawing:
        scene = self.next_scene()
        width, height = size or self.normal_size()
        layout_seed = self.rng.getrandbits(32)
        return _Drawing(scene, width, height, layout_seed, draw_scene(scene, width, height, layout_seed))

    def image_format(self) -> tuple[str, int]:
        fmt = "JPEG" if self.rng.random() < 2 / 3 else "PNG"
        return fmt, self.rng.choice((85, 90, 95))

    def add(
        self,
        index: int,
        expect: str,
        caption: str,
        drawing: _Drawing | None = None,
        body: bytes | None = None,
        fmt: str = "JPEG",
        **route_options: Any,
    ) -> dict[str, Any]:
        """Add a row (and its route when `body` is given) and return it."""
        path = f"/images/{index:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        row = {
            "path": path,
            "caption": caption,
            "expect": expect,
            "true_caption": drawing.scene.caption() if drawing else None,
            "width": drawing.image.width if drawing else None,
            "height": drawing.image.height if drawing else None,
            "format": fmt if drawing else None,
            "duplicate_of": None,
            "watermark": None,
        }
        if body is not None:
            content_type = route_options.pop("content_type", f"image/{fmt.lower()}")
            self.web.routes[path] = Route(body=body, content_type=content_type, **route_options)
        self.web.rows.append(row)
        return row

    def add_image(
        self, index: int, expect: str, drawing: _Drawing, caption: str | None = None, **route_options: Any
    ) -> None:
        """Encode `drawing` as JPEG or PNG and add its row; ok rows become originals to copy."""
        fmt, quality = self.image_format()
        body = encode(drawing.image, fmt, quality)
        row = self.add(index, expect, caption or drawing.scene.caption(), drawing, body, fmt, **route_options)
        if expect == "ok":
            self.originals.append(row)
            self.drawings[row["path"]] = drawing

    def take_original(self) -> dict[str, Any]:
        """An earlier ok row to copy, each used once while there are unused ones."""
        if self.originals:
            return self.originals.pop(self.rng.randrange(len(self.originals)))
        return self.rng.choice([row for row in self.web.rows if row["expect"] == "ok"])

    # -- one method per planted condition ------------------------------------

    def ok(self, index: int) -> None:
        self.add_image(index, "ok", self.draw())

    def mismatched_caption(self, index: int) -> None:
        drawing = self.draw()
        self.add_image(index, "mismatched_caption", drawing, caption=self.unrelated_scene(drawing.scene).caption())

    def unrelated_scene(self, scene: Scene) -> Scene:
        """A scene differing from `scene` in colour, shape and background."""
        candidates = [
            s for s in all_scenes()
            if s.colour != scene.colour and s.shape != scene.shape and s.background != scene.background
        ]
        return self.rng.choice(candidates)

    def near_duplicate(self, index: int) -> None:
        original = self.take_original()
        source = self.drawings[original["path"]]
        variant = NEAR_DUPLICATE_VARIANTS[self.near_duplicates % len(NEAR_DUPLICATE_VARIANTS)]
        self.near_duplicates += 1
        image, fmt, quality = source.image, original["format"], 90
        if variant == "requality":
            fmt, quality = "JPEG", 60
        elif variant == "resize":
            size = (round(source.width * 0.75), round(source.height * 0.75))
            image = source.image.resize(size, Image.Resampling.LANCZOS)
        else:
            shift = (max(2, source.width // 30), max(2, source.height // 30))
            image = draw_scene(source.scene, source.width, source.height, source.layout_seed, shift)
        drawing = _Drawing(source.scene, image.width, image.height, source.layout_seed, image)
        row = self.add(index, "near_duplicate", original["caption"], drawing, encode(image, fmt, quality), fmt)
        row["duplicate_of"] = original["path"]

    def duplicate_url(self, index: int) -> None:
        original = self.take_original()
        row = dict(original, expect="duplicate_url", duplicate_of=original["path"])
        self.web.rows.append(row)

    def tiny(self, index: int) -> None:
        size = (self.rng.randint(12, 31), self.rng.randint(12, 31))
        self.add_image(index, "tiny", self.draw(size))

    def huge_aspect(self, index: int) -> None:
        height = self.rng.randint(96, 112)
        self.add_image(index, "huge_aspect", self.draw((self.rng.randint(600, 640), height)))

    def broken_link(self, index: int) -> None:
        self.add(index, "broken_link", self.next_scene().caption())

    def corrupt(self, index: int) -> None:
        drawing = self.draw()
        data = encode(drawing.image, "JPEG", 90)
        self.add(index, "corrupt", drawing.scene.caption(), drawing, body=data[: len(data) // 2])

    def opt_out(self, index: int) -> None:
        self.add_image(index, "opt_out", self.draw(), headers={"X-Robots-Tag": "noai"})

    def server_error_then_ok(self, index: int) -> None:
        self.add_image(index, "server_error_then_ok", self.draw(), fail_times=1, fail_status=500)

    def low_quality(self, index: int) -> None:
        drawing = self.draw()
        blurred = drawing.image.filter(ImageFilter.GaussianBlur(radius=max(drawing.width, drawing.height) / 40))
        noise = np.random.default_rng(self.rng.getrandbits(32)).normal(0.0, 40.0, (blurred.height, blurred.width, 1))
        image = Image.fromarray(np.clip(np.asarray(blurred, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        degraded = _Drawing(drawing.scene, drawing.width, drawing.height, drawing.layout_seed, image)
        self.add_image(index, "low_quality", degraded)

    def watermarked(self, index: int) -> None:
        drawing = self.draw()
        kind = WATERMARK_KINDS[self.watermarks % len(WATERMARK_KINDS)]
        self.watermarks += 1
        image = add_watermark(drawing.image, kind, self.rng)
        self.add_image(index, "watermarked", _Drawing(drawing.scene, drawing.width, drawing.height,
                                                      drawing.layout_seed, image))
        self.web.rows[-1]["watermark"] = kind

    def not_image(self, index: int) -> None:
        caption = self.next_scene().caption()
        self.add(index, "not_image", caption, body=NOT_IMAGE_BODY, content_type="text/html; charset=utf-8")


def _row_plan(counts: dict[str, int], rng: random.Random) -> list[str]:
    """The planted condition of each row, shuffled, with an ok row first so every copy has an original."""
    plan = [expect for expect, count in counts.items() for _ in range(count)]
    rng.shuffle(plan)
    first_ok = plan.index("ok")
    plan[0], plan[first_ok] = plan[first_ok], plan[0]
    return plan


def build_synthetic_web(n_images: int = 240, seed: int = 0, watermarked: float = 0.0) -> SyntheticWeb:
    """Draw a web of `n_images` URL list rows with the conditions of `planted_counts` planted.

    `watermarked` is the share of rows drawn with a text or logo watermark (default none).
    """
    builder = _Builder(seed)
    for index, expect in enumerate(_row_plan(planted_counts(n_images, watermarked), builder.rng)):
        getattr(builder, expect)(index)
    return builder.web


def write_url_list(web: SyntheticWeb, base_url: str, path: str) -> None:
    """Write the web's URL list to Parquet `path`: columns url (absolute), caption, expect."""
    base = base_url.rstrip("/")
    table = pa.table(
        {
            "url": [base + row["path"] for row in web.rows],
            "caption": [row["caption"] for row in web.rows],
            "expect": [row["expect"] for row in web.rows],
        }
    )
    pq.write_table(table, path)
