"""A deterministic set of camera-sized JPEGs made from real photos, cached on disk.

The sources are the COCO train2017 photos of /work/shared/data/real/captioned-images
(see its SOURCE.txt), those under CC BY 2.0 and CC BY-SA 2.0 only (the CC BY-ND ones are
left out because every output is an adaptation). Photo `i` of seed `s` is made with a
generator seeded by (s, i):

- a random source photo, cropped to a random window of 55-100% of each side;
- scaled up (bicubic) so that its longest side is 1,000-3,000 px;
- mirrored left-right half of the time;
- colour jitter: brightness 0.8-1.2, contrast 0.8-1.2, saturation 0.7-1.3;
- sensor-like grain: Gaussian noise with sigma 1-6 (without it, upscaled photos are so smooth
  that they compress to a fraction of what a camera's file of that size weighs);
- encoded as baseline JPEG (every 7th progressive) at quality 85-95, 4:2:0 chroma (every
  4th 4:4:4), with the source's ICC profile when it has one (half of them do);
- re-encoded with more grain (then a higher quality) or less grain (then a lower quality) until
  the file is 200 KB - 2 MB.

The same (count, seed) always gives the same bytes on the same Pillow and numpy.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SOURCE_DIR = Path("/work/shared/data/real/captioned-images")
LICENSES = (4, 5)  # COCO license ids: CC BY 2.0, CC BY-SA 2.0
MIN_BYTES, MAX_BYTES = 200 * 1000, 2 * 1000 * 1000
MIN_SIDE, MAX_SIDE = 1000, 3000


@dataclass(frozen=True)
class Photo:
    """One generated JPEG on disk and how it was made."""

    path: Path
    caption: str
    width: int
    height: int
    num_bytes: int
    quality: int
    progressive: bool
    icc: bool
    source: str


def sources() -> list[dict]:
    """The usable source photos (file name, caption) from captions.jsonl."""
    rows = [json.loads(line) for line in (SOURCE_DIR / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if row["license_id"] in LICENSES]


def make_photo(index: int, seed: int, source_rows: list[dict]) -> tuple[bytes, dict]:
    """The JPEG bytes of photo `index` and the settings it was made with."""
    rng = np.random.default_rng([seed, index])
    row = source_rows[int(rng.integers(len(source_rows)))]
    with Image.open(SOURCE_DIR / row["file_name"]) as im:
        icc = im.info.get("icc_profile")
        image = im.convert("RGB")
    width, height = image.size
    crop_w, crop_h = (max(16, round(side * rng.uniform(0.55, 1.0))) for side in (width, height))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    longest = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    scale = longest / max(crop_w, crop_h)
    image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    settings = {
        "source": row["file_name"],
        "caption": row["caption"].strip(),
        "sigma": float(rng.uniform(1.0, 6.0)),
        "quality": int(rng.integers(85, 96)),
        "progressive": index % 7 == 3,
        "subsampling": 0 if index % 4 == 1 else 2,
    }
    base = np.asarray(image, dtype=np.float32)
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    while True:
        grainy = np.clip(base + noise * settings["sigma"], 0, 255).astype(np.uint8)
        data = _encode(Image.fromarray(grainy), settings, icc)
        if len(data) < MIN_BYTES and settings["sigma"] < 16:
            settings["sigma"] += 1.5
        elif len(data) < MIN_BYTES and settings["quality"] < 97:
            settings["quality"] += 2
        elif len(data) > MAX_BYTES and settings["sigma"] > 0.5:
            settings["sigma"] = max(0.0, settings["sigma"] - 1.5)
        elif len(data) > MAX_BYTES and settings["quality"] > 70:
            settings["quality"] -= 5
        else:
            break
    settings["sigma"] = round(settings["sigma"], 2)
    settings.update(width=image.width, height=image.height, num_bytes=len(data), icc=icc is not None)
    return data, settings


def _encode(image: Image.Image, settings: dict, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    image.save(buffer, "JPEG", quality=settings["quality"], subsampling=settings["subsampling"],
               progressive=settings["progressive"], **extra)
    return buffer.getvalue()


def _make_one(job: tuple[int, int, str]) -> dict:
    index, seed, folder = job
    data, settings = make_photo(index, seed, sources())
    path = Path(folder) / f"{index:06d}.jpg"
    path.write_bytes(data)
    return {"index": index, "file": path.name, **settings}


def photo_set(count: int, seed: int, cache_dir: Path, processes: int = 2) -> list[Photo]:
    """`count` photos of seed `seed`, generated into `cache_dir` once (then read from its index.json)."""
    folder = cache_dir / f"photos-n{count}-seed{seed}"
    index = folder / "index.json"
    if not index.exists():
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(i, seed, str(folder)) for i in range(count)]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            entries = pool.map(_make_one, jobs, chunksize=8)
        temporary = index.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries, indent=0))
        temporary.replace(index)
    return [
        Photo(path=folder / e["file"], caption=e["caption"], width=e["width"], height=e["height"],
              num_bytes=e["num_bytes"], quality=e["quality"], progressive=e["progressive"], icc=e["icc"],
              source=e["source"])
        for e in json.loads(index.read_text())
    ]


def describe(photos: list[Photo]) -> dict:
    """Size statistics of a photo set."""
    sizes = np.array([p.num_bytes for p in photos])
    sides = np.array([max(p.width, p.height) for p in photos])
    return {
        "photos": len(photos),
        "total_mb": round(sizes.sum() / 1e6, 1),
        "kb": {name: round(float(fn(sizes)) / 1e3) for name, fn in
               (("min", np.min), ("p10", lambda s: np.percentile(s, 10)), ("median", np.median), ("mean", np.mean),
                ("p90", lambda s: np.percentile(s, 90)), ("max", np.max))},
        "longest_side": {"min": int(sides.min()), "median": int(np.median(sides)), "max": int(sides.max())},
        "megapixels_mean": round(float(np.mean([p.width * p.height for p in photos])) / 1e6, 2),
        "progressive": sum(p.progressive for p in photos),
        "with_icc_profile": sum(p.icc for p in photos),
    }
