"""Find pairs of near-identical vectors with FAISS.

Both searches return candidate pairs (i < j) and re-measure every candidate exactly in
numpy (popcount of XOR; float64 dot product), so the threshold is applied to a value that
does not depend on the index type, the batch or the BLAS kernel. Rows are expected in the
order of preference (policy.preference_order): indexes built on them, IVF training
included, are then the same whatever order the input shards came in.

- binary (64-bit perceptual hashes): `IndexBinaryFlat` range search up to `exact_below`
  rows; above, `IndexBinaryMultiHash` with 4 tables of 16 bits and nflip =
  max_distance // 4, which by the pigeonhole principle still finds every pair within
  `max_distance` (one of the 4 chunks differs in at most max_distance // 4 bits).
- float (L2-normalised embeddings, cosine = inner product): `IndexFlatIP` up to
  `exact_below` rows, `IndexIVFFlat` (nlist ~ 4 sqrt(n), `nprobe` lists searched) above.
  k-nearest-neighbour search plus the threshold (GPU indexes have no range search), on
  every GPU when faiss sees one, else on the CPU. Pairs are symmetric: (i, j) counts if j
  is among i's k nearest or i among j's.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

QUERY_CHUNK = 16384
HASH_TABLES = 4
HASH_BITS = 16


def phash_codes(hashes: np.ndarray) -> np.ndarray:
    """Signed int64 hashes as FAISS binary codes: n x 8 uint8, most significant byte first."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=">i8").view(np.uint8).reshape(-1, 8))


def hamming(codes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact Hamming distances between the rows i and j of binary `codes`."""
    if len(i) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unpackbits(codes[i] ^ codes[j], axis=1).sum(axis=1).astype(np.int64)


def binary_index(n: int, max_distance: int, exact_below: int) -> tuple[faiss.IndexBinary, str]:
    """The binary index for `n` 64-bit codes and its description for the manifest."""
    if n <= exact_below:
        return faiss.IndexBinaryFlat(64), "IndexBinaryFlat"
    index = faiss.IndexBinaryMultiHash(64, HASH_TABLES, HASH_BITS)
    index.nflip = max_distance // HASH_TABLES
    return index, f"IndexBinaryMultiHash(nhash={HASH_TABLES}, b={HASH_BITS}, nflip={index.nflip})"


def binary_pairs(
    codes: np.ndarray, max_distance: int, exact_below: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i < j) of 64-bit codes within Hamming `max_distance`: (i, j, distance, index description)."""
    n = len(codes)
    index, description = binary_index(n, max_distance, exact_below)
    if n < 2:
        return *_empty_pairs(np.int64), description
    index.add(codes)
    found_i, found_j = [], []
    for start in range(0, n, QUERY_CHUNK):
        limits, _, labels = index.range_search(codes[start:start + QUERY_CHUNK], max_distance + 1)  # radius is strict
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits.astype(np.int64)))
        found_i.append(queries)
        found_j.append(labels.astype(np.int64))
    i, j = _unique_pairs(np.concatenate(found_i), np.concatenate(found_j))
    distance = hamming(codes, i, j)
    close = distance <= max_distance
    return i[close], j[close], distance[close], description


def float_index(n: int, d: int, exact_below: int, nprobe: int) -> tuple[faiss.Index, str]:
    """The inner-product index for `n` vectors of size `d` (untrained) and its description."""
    if n <= exact_below:
        return faiss.IndexFlatIP(d), "IndexFlatIP"
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(nprobe, nlist)
    return index, f"IndexIVFFlat(nlist={nlist}, nprobe={index.nprobe})"


def float_pairs(
    vectors: np.ndarray, threshold: float, k: int, exact_below: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i < j) of L2-normalised rows with cosine >= `threshold`: (i, j, cosine, index description)."""
    n, d = vectors.shape
    index, description = float_index(n, d, exact_below, nprobe)
    gpus = faiss.get_num_gpus()
    description += f" on {gpus} GPU(s)" if gpus > 0 else " on CPU"
    if n < 2:
        return *_empty_pairs(np.float64), description
    if not index.is_trained:
        nlist = index.nlist
        step = max(1, n // (256 * nlist))
        index.train(vectors[::step])
    if gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    neighbours = min(k + 1, n)
    found_i, found_j = [], []
    for start in range(0, n, QUERY_CHUNK):
        _, labels = index.search(vectors[start:start + QUERY_CHUNK], neighbours)
        found_i.append(np.repeat(np.arange(start, start + len(labels)), neighbours))
        found_j.append(labels.reshape(-1).astype(np.int64))
    i, j = _unique_pairs(np.concatenate(found_i), np.concatenate(found_j))
    cosine = _cosines(vectors, i, j)
    close = cosine >= threshold
    return i[close], j[close], cosine[close], description


def _cosines(vectors: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 dot products of rows i and j, pair by pair (deterministic, BLAS-free)."""
    out = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), QUERY_CHUNK):
        a = vectors[i[start:start + QUERY_CHUNK]].astype(np.float64)
        b = vectors[j[start:start + QUERY_CHUNK]].astype(np.float64)
        out[start:start + QUERY_CHUNK] = np.einsum("nd,nd->n", a, b)
    return out


def _unique_pairs(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs (min, max) without self pairs or FAISS's -1 placeholders, sorted."""
    valid = (j >= 0) & (i != j)
    low, high = np.minimum(i[valid], j[valid]), np.maximum(i[valid], j[valid])
    if len(low) == 0:
        return low, high
    pairs = np.unique(np.stack([low, high], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _empty_pairs(measure_type: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, measure_type)
