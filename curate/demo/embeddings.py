"""Synthetic clustered embeddings with planted near-duplicates, for dedup tests and benchmarks.

Rows come in independent blocks (`block` rows each; copies never leave their block, so
the first k blocks are a self-contained subset). Within a block: base points scattered
around shared centres (cosine to their centre ~0.7, so unrelated points of one cluster sit
near cosine 0.5), planted near-duplicates of some base points (cosine ~0.96-0.995 to the
original) and near misses (cosine ~0.85-0.92), all shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlantedEmbeddings:
    """`vectors` (float16, unit rows) and, per row, the row it copies (itself for originals)."""

    vectors: np.ndarray
    original: np.ndarray

    def planted_pairs(self) -> set[tuple[int, int]]:
        """All (i < j) pairs of rows that copy the same original (the original included)."""
        groups: dict[int, list[int]] = {}
        for row, original in enumerate(self.original.tolist()):
            groups.setdefault(original, []).append(row)
        return {(a, b) for members in groups.values() for x, a in enumerate(members) for b in members[x + 1:]}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _perturb(base: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`base` rows moved by relative noise `noise` (cosine to base ~ 1 / sqrt(1 + noise^2))."""
    d = base.shape[1]
    return _unit(base + noise[:, None] * rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(d))


def planted_embeddings(rows: int, dim: int = 512, seed: int = 0, block: int = 100_000,
                       duplicate_share: float = 0.1, near_miss_share: float = 0.05,
                       points_per_centre: int = 500) -> PlantedEmbeddings:
    """`rows` embeddings of size `dim` with planted near-duplicates (see the module docstring)."""
    vectors, originals = [], []
    for start in range(0, rows, block):
        size = min(block, rows - start)
        rng = np.random.default_rng([seed, start])
        block_vectors, block_originals = _block(size, dim, rng, duplicate_share, near_miss_share, points_per_centre)
        vectors.append(block_vectors)
        originals.append(block_originals + start)
    return PlantedEmbeddings(np.concatenate(vectors), np.concatenate(originals))


def _block(size: int, dim: int, rng: np.random.Generator, duplicate_share: float, near_miss_share: float,
           points_per_centre: int) -> tuple[np.ndarray, np.ndarray]:
    copies = int(size * duplicate_share)
    misses = int(size * near_miss_share)
    bases = size - copies - misses
    centres = _unit(rng.standard_normal((max(1, bases // points_per_centre), dim), dtype=np.float32))
    base = _perturb(centres[rng.integers(0, len(centres), bases)], np.full(bases, 1.0, np.float32), rng)
    copied = rng.integers(0, bases, copies)
    copy = _perturb(base[copied], rng.uniform(0.1, 0.29, copies).astype(np.float32), rng)
    missed = rng.integers(0, bases, misses)
    miss = _perturb(base[missed], rng.uniform(0.43, 0.62, misses).astype(np.float32), rng)
    vectors = np.concatenate([base, copy, miss]).astype(np.float16)
    original = np.concatenate([np.arange(bases), copied, bases + copies + np.arange(misses)])
    order = rng.permutation(size)
    position = np.empty(size, dtype=np.int64)
    position[order] = np.arange(size)
    return vectors[order], position[original[order]]
