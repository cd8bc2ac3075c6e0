"""Decode, preprocess and embed images with a CLIP model, decoding ahead of the model.

Decoding and preprocessing run in a thread pool (Pillow releases the GIL) a few
chunks ahead of the model, so the model waits on JPEG decoding only when decoding
is the slower of the two.
"""

from __future__ import annotations

import io
from collections import deque
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


def embed_images(model: ClipModel, images: Sequence[bytes | None], pool: ThreadPoolExecutor, chunk_size: int,
                 prefetch: int = 2) -> tuple[np.ndarray, list[str | None]]:
    """Embed encoded images; return (n x d float32 L2-normalised, NaN rows where decoding failed; errors)."""
    embeddings = np.full((len(images), model.embed_dim), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(images)
    starts = list(range(0, len(images), chunk_size))
    pending: deque[tuple[int, Future]] = deque()
    for start in starts:
        pending.append((start, pool.submit(_prepare_chunk, model, images[start:start + chunk_size])))
        if len(pending) > prefetch:
            _consume(model, *pending.popleft(), embeddings, errors)
    while pending:
        _consume(model, *pending.popleft(), embeddings, errors)
    return embeddings, errors


def _consume(model: ClipModel, start: int, future: Future, embeddings: np.ndarray, errors: list[str | None]) -> None:
    pixels, positions, chunk_errors = future.result()
    for offset, error in enumerate(chunk_errors):
        errors[start + offset] = error
    if pixels is not None:
        rows = [start + p for p in positions]
        embeddings[rows] = model.encode_images(pixels)


def embed_texts(model: ClipModel, texts: Sequence[str], chunk_size: int) -> np.ndarray:
    """Embed texts in chunks; n x d float32, L2-normalised."""
    if not texts:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    parts = [model.encode_texts(list(texts[i:i + chunk_size])) for i in range(0, len(texts), chunk_size)]
    return np.concatenate(parts).astype(np.float32, copy=False)
