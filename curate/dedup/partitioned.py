"""Semantic pair search over k-means partitions, as parallel Ray tasks (SemDeDup style).

No process holds the whole corpus's embeddings:

1. sample: each work shard gives the embeddings of the rows whose key falls in a fixed
   hash range (the same rows whatever the shard order); k-means is trained on them, sorted
   by key, with a fixed seed (spherical k-means, inner product).
2. assign: each work shard, in a task of its own, finds the `probe` nearest centroids of
   every row, and writes, per group of clusters, its rows as *members* of their nearest
   cluster and as *queries* of each probed cluster (a shuffle of shard x group files).
3. search: each group of clusters, in a task of its own, compares every query with every
   member of the same cluster by blocked matrix products (exact within a cluster) and
   keeps candidate pairs above the threshold, re-measured in float64.

The pairs come back as global row ids (row offset of the work shard + row); which sample
of a pair is kept is decided afterwards on the whole edge list (policy.keep), so the
partitioning changes only which pairs are found, never which of them wins. A pair whose
two samples fall in clusters that neither probes is missed: `probe` trades recall for
time (benchmarks/dedup.py measures the pair recall against exact brute force).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from curate import storage

SAMPLE_PER_CLUSTER = 64  # k-means training points per centroid
KEY_SPACE = 16 ** 8  # keys are hex digests; the first 8 digits choose the training sample
QUERY_BLOCK = 4096
CANDIDATE_MARGIN = 1e-3  # float32 products may sit this far below their float64 value
GROUP_BYTES = 1 << 30  # aim for at most ~1 GiB of vectors per search task


@dataclass(frozen=True)
class PartitionPlan:
    """How a corpus of `rows` vectors is cut: clusters, probed clusters per query, search tasks."""

    rows: int
    clusters: int
    probe: int
    groups: int
    seed: int = 1234

    @classmethod
    def for_corpus(cls, rows: int, dim: int, cluster_rows: int, probe: int, parallelism: int) -> "PartitionPlan":
        """About `cluster_rows` rows per cluster; enough groups for `parallelism` and bounded memory."""
        clusters = max(1, min(rows // 2, round(rows / cluster_rows)))
        by_memory = math.ceil(rows * dim * 4 * (1 + probe) / GROUP_BYTES)
        groups = max(1, min(clusters, max(2 * parallelism, by_memory)))
        return cls(rows=rows, clusters=clusters, probe=min(probe, clusters), groups=groups)

    def describe(self) -> str:
        """The manifest's description of the index."""
        return (f"k-means partitions (clusters={self.clusters}, probe={self.probe}, tasks={self.groups}) "
                f"+ exact inner products within a cluster, on CPU")

    @property
    def sample_fraction(self) -> float:
        return min(1.0, SAMPLE_PER_CLUSTER * self.clusters / max(1, self.rows))


def normalized_embeddings(path: str | storage.Location) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(keys, float32 unit vectors of the rows that have one, their row indices, models) of one work shard."""
    from curate.dedup.semantic import image_embeddings

    table = storage.read_table(path, columns=["key", "embeddings"])
    vectors, judged, models = image_embeddings(table)
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    rows = np.flatnonzero(judged)
    return keys, vectors[rows], rows, models


def in_sample(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each key is in the training sample: a fixed range of the key space."""
    cutoff = int(fraction * KEY_SPACE)
    return np.fromiter((int(k[:8], 16) < cutoff for k in keys), dtype=bool, count=len(keys))


def sample_shard(path: str | storage.Location, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(keys, vectors) of the shard's rows in the training sample."""
    keys, vectors, rows, _ = normalized_embeddings(path)
    chosen = in_sample(keys[rows], fraction)
    return keys[rows][chosen], vectors[chosen]


def train_centroids(keys: np.ndarray, vectors: np.ndarray, plan: PartitionPlan) -> np.ndarray:
    """Spherical k-means centroids, trained on the sample sorted by key (order-independent)."""
    order = np.argsort(keys.astype(str), kind="stable")
    sample = np.ascontiguousarray(vectors[order], dtype=np.float32)
    clusters = min(plan.clusters, len(sample))
    kmeans = faiss.Kmeans(sample.shape[1], clusters, niter=20, seed=plan.seed, spherical=True,
                          max_points_per_centroid=SAMPLE_PER_CLUSTER * 4, min_points_per_centroid=1)
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign_shard(path: str | storage.Location, offset: int, centroids: np.ndarray, plan: PartitionPlan,
                 out_dir: str | storage.Location, shard: int) -> tuple[int, np.ndarray, list[str]]:
    """Split one work shard's vectors into per-group member and query files; return (shard, judged rows, models)."""
    _, vectors, rows, models = normalized_embeddings(path)
    probe = min(plan.probe, len(centroids))
    if len(rows):
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        _, nearest = index.search(vectors, probe)
    else:
        nearest = np.zeros((0, probe), dtype=np.int64)
    ids = offset + rows.astype(np.int64)
    home = nearest[:, 0] if len(rows) else np.zeros(0, np.int64)
    for group in range(plan.groups):
        members = np.flatnonzero(home % plan.groups == group)
        query_rows, query_slots = np.nonzero(nearest % plan.groups == group)
        with storage.atomic_output(group_file(out_dir, shard, group)) as target, \
                open(target, "wb") as out:
            np.savez(out, member_ids=ids[members], member_clusters=home[members],
                     member_vectors=vectors[members].astype(np.float32),
                     query_ids=ids[query_rows], query_clusters=nearest[query_rows, query_slots],
                     query_vectors=vectors[query_rows].astype(np.float32))
    return shard, rows, models


def search_group(files: list[str | storage.Location], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, global ids) with cosine >= `threshold` among one group's clusters: (i, j, cosine)."""
    parts = [_load_npz(f) for f in files]

    def stacked(name: str, dtype) -> np.ndarray:
        arrays = [p[name] for p in parts]
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    member_ids, member_clusters = stacked("member_ids", np.int64), stacked("member_clusters", np.int64)
    query_ids, query_clusters = stacked("query_ids", np.int64), stacked("query_clusters", np.int64)
    dim = next((p["member_vectors"].shape[1] for p in parts if p["member_vectors"].ndim == 2), 0)
    member_vectors = np.concatenate([p["member_vectors"].reshape(-1, dim) for p in parts]) if parts else None
    query_vectors = np.concatenate([p["query_vectors"].reshape(-1, dim) for p in parts]) if parts else None
    found_i, found_j = [], []
    for cluster in np.unique(member_clusters):
        members = np.flatnonzero(member_clusters == cluster)
        queries = np.flatnonzero(query_clusters == cluster)
        m_vectors, m_ids = member_vectors[members], member_ids[members]
        for start in range(0, len(queries), QUERY_BLOCK):
            block = queries[start:start + QUERY_BLOCK]
            q_at, m_at = np.nonzero(query_vectors[block] @ m_vectors.T >= threshold - CANDIDATE_MARGIN)
            found_i.append(query_ids[block][q_at])
            found_j.append(m_ids[m_at])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    keep = i != j
    low, high = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    pairs = np.unique(np.stack([low, high], axis=1), axis=0) if len(low) else np.zeros((0, 2), np.int64)
    position = {gid: n for n, gid in enumerate(np.concatenate([member_ids, query_ids]).tolist())}
    all_vectors = np.concatenate([member_vectors, query_vectors])
    a = all_vectors[[position[g] for g in pairs[:, 0].tolist()]].astype(np.float64)
    b = all_vectors[[position[g] for g in pairs[:, 1].tolist()]].astype(np.float64)
    cosine = np.einsum("nd,nd->n", a, b) if len(pairs) else np.zeros(0)
    close = cosine >= threshold
    return pairs[close, 0], pairs[close, 1], cosine[close]


def partitioned_pairs(files: list[str | storage.Location], threshold: float, cluster_rows: int, probe: int,
                      work_dir: str | storage.Location, parallelism: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[str], str]:
    """All pairs with cosine >= `threshold` found in probed clusters, over the rows of `files` in order.

    Runs the sample, assign and search steps as Ray tasks. Returns (i, j, cosine, judged
    rows per file, embedding models, index description); i and j are global row ids (file
    offset + row). Plain path strings are resolved here, once: the tasks get `Path`s and
    `StoragePath`s, which carry this process's storage settings (endpoint, region) with them,
    so no task depends on the settings of the worker it lands on.
    """
    import ray

    files = [storage.location(f) for f in files]
    counts = [storage.parquet_file(f).metadata.num_rows for f in files]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = int(offsets[-1])
    dim = _dimension(files)
    plan = PartitionPlan.for_corpus(rows, dim, cluster_rows, probe, parallelism)
    sample_task = ray.remote(sample_shard).options(num_cpus=1, max_retries=2)
    samples = ray.get([sample_task.remote(f, plan.sample_fraction) for f in files])
    keys = np.concatenate([k for k, _ in samples]) if samples else np.zeros(0, object)
    vectors = np.concatenate([v for _, v in samples]) if samples else np.zeros((0, dim), np.float32)
    del samples
    if len(vectors) == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), [np.zeros(0, np.int64) for _ in files],
                [], plan.describe())
    centroids = train_centroids(keys, vectors, plan)
    del keys, vectors
    plan = PartitionPlan(rows=rows, clusters=len(centroids), probe=min(plan.probe, len(centroids)),
                         groups=min(plan.groups, len(centroids)), seed=plan.seed)
    shuffle = storage.location(work_dir) / "partitions"
    if isinstance(shuffle, Path):
        shuffle.mkdir(parents=True, exist_ok=True)
    centroids_ref = ray.put(centroids)
    assign_task = ray.remote(assign_shard).options(num_cpus=1, max_retries=2)
    assigned = ray.get([assign_task.remote(f, int(offsets[s]), centroids_ref, plan, shuffle, s)
                        for s, f in enumerate(files)])
    judged = [rows_ for _, rows_, _ in sorted(assigned, key=lambda item: item[0])]
    models = sorted({m for _, _, names in assigned for m in names})
    search_task = ray.remote(search_group).options(num_cpus=1, max_retries=2)
    found = ray.get([
        search_task.remote([group_file(shuffle, s, g) for s in range(len(files))], threshold)
        for g in range(plan.groups)
    ])
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    cosine = np.concatenate([f[2] for f in found])
    # A pair whose samples probe each other's clusters is found by two search tasks.
    _, first = np.unique(np.stack([i, j], axis=1), axis=0, return_index=True) if len(i) else (None, np.zeros(0, int))
    return i[first], j[first], cosine[first], judged, models, plan.describe()


def group_file(folder: str | storage.Location, shard: int, group: int) -> storage.Location:
    """The shuffle file of one work shard's rows for one group of clusters."""
    return storage.location(folder) / f"shard{shard:05d}-group{group:04d}.npz"


def _dimension(files: list[storage.Location]) -> int:
    """The embedding size of the first row that has one (0 when none has)."""
    import pyarrow.compute as pc

    for f in files:
        table = storage.read_table(f, columns=["embeddings"])
        if table.num_rows == 0:
            continue
        lengths = pc.list_value_length(pc.struct_field(table.column("embeddings").combine_chunks(), "image"))
        present = pc.max(lengths).as_py()
        if present:
            return int(present)
    return 0


def _load_npz(path: str | storage.Location) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by assign_shard, from the local disk or the store."""
    with storage.open_input(path) as source:
        with np.load(io.BytesIO(source.read())) as data:
            return {name: data[name] for name in data.files}
