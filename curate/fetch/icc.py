"""Colour-managing decoded images to sRGB through their embedded ICC profile, cheaply.

Building a LittleCMS transform costs a few milliseconds and applying one about as much as
decoding the JPEG at reduced scale, while most web images that carry a profile carry one of
a handful of sRGB profiles. So, per process:

- one transform is built per distinct (profile, mode) and kept in a small LRU cache; it is
  built without LittleCMS's pixel cache, which makes it safe to share between threads;
- a profile whose RGB transform moves no 8-bit colour by more than one level (checked once,
  over all 2^24 colours; e.g. the common "sRGB IEC61966-2.1", which differs from LittleCMS's
  built-in sRGB only by rounding on 0.4% of the colours) is treated as sRGB already: the
  decoded pixels are kept as they are, so the same picture with and without that profile
  gives the same pixels.
"""

from __future__ import annotations

import functools
import io
from typing import Literal

import numpy as np
from PIL import Image, ImageCms

NEAR_IDENTITY_LEVELS = 1  # a transform that moves no colour further than this is treated as no-op
CACHE_SIZE = 64
_COARSE_LEVELS = np.linspace(0, 255, 32).round().astype(np.uint8)  # 32^3 colours: quick rejection
_RED_BLOCK = 16  # the exhaustive check runs in blocks of 16 x 256 x 256 colours (3 MiB each)

Plan = ImageCms.ImageCmsTransform | Literal["keep"]


def to_srgb(im: Image.Image, profile: bytes, output_mode: str) -> Image.Image:
    """`im` (mode L, RGB, RGBA or CMYK) converted from `profile` to sRGB in `output_mode`.

    Returns `im` itself when the profile is unusable or already sRGB within a level; may
    convert in place when the modes match. Raises nothing for a broken profile.
    """
    plan = _plan(profile, im.mode, output_mode)
    if plan == "keep":
        return im
    if im.mode == output_mode:
        plan.apply_in_place(im)
        return im
    return plan.apply(im)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _plan(profile: bytes, input_mode: str, output_mode: str) -> Plan:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        transform = ImageCms.buildTransform(source, _srgb(), input_mode, output_mode,
                                            flags=ImageCms.Flags.NOCACHE)
        near_identity = input_mode in ("RGB", "RGBA") and _near_identity(
            transform if input_mode == output_mode == "RGB" else
            ImageCms.buildTransform(source, _srgb(), "RGB", "RGB", flags=ImageCms.Flags.NOCACHE))
    except Exception:  # noqa: BLE001 - a broken or mismatched profile keeps the raw values
        return "keep"
    return "keep" if near_identity else transform


@functools.lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _near_identity(transform: ImageCms.ImageCmsTransform) -> bool:
    """True if `transform` (RGB -> RGB) maps every 8-bit colour within NEAR_IDENTITY_LEVELS of itself."""
    coarse = np.stack(np.meshgrid(_COARSE_LEVELS, _COARSE_LEVELS, _COARSE_LEVELS, indexing="ij"), axis=-1)
    if not _maps_close(transform, coarse.reshape(len(_COARSE_LEVELS) ** 2, -1, 3)):
        return False
    levels = np.arange(256, dtype=np.uint8)
    green, blue = np.meshgrid(levels, levels, indexing="ij")
    for red in range(0, 256, _RED_BLOCK):
        block = np.empty((_RED_BLOCK, 256, 256, 3), dtype=np.uint8)
        block[..., 0] = np.arange(red, red + _RED_BLOCK, dtype=np.uint8)[:, None, None]
        block[..., 1], block[..., 2] = green, blue
        if not _maps_close(transform, block.reshape(_RED_BLOCK * 256, 256, 3)):
            return False
    return True


def _maps_close(transform: ImageCms.ImageCmsTransform, colours: np.ndarray) -> bool:
    converted = np.asarray(transform.apply(Image.fromarray(colours, "RGB")), dtype=np.int16)
    return int(np.abs(converted - colours.astype(np.int16)).max()) <= NEAR_IDENTITY_LEVELS
