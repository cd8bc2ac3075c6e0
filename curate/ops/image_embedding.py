"""Decode, preprocess and embed images with a CLIP model, decoding ahead of the model.

All images of a batch are handed to a thread pool in small chunks (Pillow releases
the GIL while decoding); the model embeds each chunk as soon as it is ready, and a
caller can encode texts meanwhile. So the model waits on JPEG decoding only when
decoding is the slower of the two.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from curate.models.clip import ClipModel


def _prepare_chunk(model: ClipModel, chunk: Sequence[bytes | None]):
    """Decode and preprocess one chunk; return (pixels of the good images, their positions, errors)."""
    images, positions, errors = [], [], [None] * len(chunk)
    for position, data in enumerate(chunk):
        if data is None:
            errors[position] = "no image bytes"
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.convert("RGB"))
            positions.append(position)
        except Exception as error:  # a sample-level failure, reported as the row's drop detail
            errors[position] = f"{type(error).__name__}: {error}"
    pixels = model.preprocess_images(images) if images else None
    return pixels, positions, errors


def decode_chunk_size(rows: int, threads: int, model_batch: int) -> int:
    """Rows per decode task: small enough that every thread gets several and the model starts early."""
    return max(1, min(model_batch, math.ceil(rows / (4 * threads)), 64))


def submit_decodes(model: ClipModel, images: Sequence[bytes | None], pool: ThreadPoolExecutor,
                   threads: int) -> list[tuple[int, Future]]:
    """Start decoding and preprocessing all `images` in the pool, in small chunks; return (start, future)s."""
    size = decode_chunk_size(len(images), threads, model.batch_size)
    return [(start, pool.submit(_prepare_chunk, model, images[start:start + size]))
            for start in range(0, len(images), size)]


def collect_embeddings(model: ClipModel, pending: list[tuple[int, Future]],
                       rows: int) -> tuple[np.ndarray, list[str | None]]:
    """Embed decoded chunks as they complete, in order; (rows x d float32, NaN where decoding failed; errors)."""
    embeddings = np.full((rows, model.embed_dim), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * rows
    for start, future in pending:
        pixels, positions, chunk_errors = future.result()
        errors[start:start + len(chunk_errors)] = chunk_errors
        if pixels is not None:
            embeddings[[start + p for p in positions]] = model.encode_images(pixels)
    return embeddings, errors


def embed_images(model: ClipModel, images: Sequence[bytes | None], pool: ThreadPoolExecutor,
                 threads: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode ahead in `pool` while the model embeds what is ready; see `collect_embeddings`."""
    return collect_embeddings(model, submit_decodes(model, images, pool, threads), len(images))


def embed_texts(model: ClipModel, texts: Sequence[str], chunk_size: int) -> np.ndarray:
    """Embed texts in chunks; n x d float32, L2-normalised."""
    if not texts:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    parts = [model.encode_texts(list(texts[i:i + chunk_size])) for i in range(0, len(texts), chunk_size)]
    return np.concatenate(parts).astype(np.float32, copy=False)
