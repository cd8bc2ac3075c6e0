"""`dedup_semantic`: samples whose CLIP image embeddings are nearly the same direction.

Reads `embeddings.image` (float16, written by clip_score), converts it to float32 and
L2-normalises it again (float16 rounding). Two samples with cosine >= `threshold` are
duplicates. Pairs come from k-nearest-neighbour search plus the threshold
(search.float_pairs): exact `IndexFlatIP` up to `exact_below` rows, `IndexIVFFlat` above;
on the GPU when faiss-gpu sees one. Groups follow `policy` (SemDeDup-style by default),
visiting the samples in the order of `keep` (curate/dedup/policy.py).

The threshold depends on the model: 0.95 suits real CLIPs (SemDeDup removes at
1 - eps with eps ~ 0.05); the project's tiny CLIP needs its own (TINY_CLIP_THRESHOLD,
measured on planted near-duplicates of demo-web scenes (JPEG q60, 75% resize, shapes
shifted by 1/30) and same-caption negatives: at 0.9995 precision 1.0 and recall 0.51 on
the calibration set (seed 1, 150 scenes), 1.0 and 0.55 on the test set (seed 7); at
0.9993 a same-caption drawing already slips in. The tiny CLIP embeds the caption's scene,
so other drawings of one caption sit at cosine 0.97..0.999 and shifted copies often fall
below any safe threshold).
Rows without an image embedding are not judged.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import storage
from curate.dedup.common import decide_duplicates
from curate.dedup.partitioned import partitioned_pairs
from curate.dedup.policy import DEFAULT_KEEP, KeepCriteria
from curate.dedup.search import float_pairs
from curate.stage import CorpusStage, Params

TINY_CLIP_THRESHOLD = 0.9995


class DedupSemanticParams(Params):
    """Cosine threshold, neighbours searched per sample, grouping, which copy to keep, and the index choice."""

    threshold: float = Field(0.95, gt=-1.0, le=1.0)
    k: int = Field(32, ge=1)
    policy: Literal["semdedup", "components"] = "semdedup"
    keep: KeepCriteria = Field(default_factory=lambda: list(DEFAULT_KEEP))
    exact_below: int = Field(100_000, ge=0)  # IndexFlatIP up to this many rows, IndexIVFFlat above
    nprobe: int = Field(16, ge=1)
    # Above this many rows the search runs over k-means partitions as parallel Ray tasks.
    partition_above: int = Field(500_000, ge=0)
    cluster_rows: int = Field(2_000, ge=2)  # rows per k-means cluster when partitioned
    probe: int = Field(3, ge=1)  # clusters each sample is compared with when partitioned


def image_embeddings(table: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(n x d float32 L2-normalised embeddings (zeros where missing), mask of rows that have one, models)."""
    if table.num_rows == 0 or "embeddings" not in table.column_names:
        return np.zeros((table.num_rows, 0), np.float32), np.zeros(table.num_rows, bool), []
    column = table.column("embeddings").combine_chunks()
    lists = pc.struct_field(column, "image")
    lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False))
    present = lengths > 0
    d = int(lengths.max(initial=0))
    if present.any() and (lengths[present] != d).any():
        raise ValueError("dedup_semantic: image embeddings of different sizes (more than one model?)")
    vectors = np.zeros((table.num_rows, d), dtype=np.float32)
    if d:
        flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.float32)
        vectors[present] = flat.reshape(-1, d)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        present &= norms[:, 0] > 0
        vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    models = sorted({m for m in pc.struct_field(column, "model").to_pylist() if m})
    return np.ascontiguousarray(vectors), present, models


class DedupSemantic(CorpusStage):
    """Drops samples whose image embedding is within `threshold` cosine of a more preferred one."""

    name = "dedup_semantic"
    Params = DedupSemanticParams
    columns = ("key", "image_meta", "scores", "embeddings", "meta")
    uses_ray_tasks = True  # above partition_above rows: k-means partitions searched by Ray tasks
    reads = frozenset({"image_meta", "scores", "embeddings", "meta"})
    provides = frozenset({"meta"})  # meta.dedup.semantic.group of every group member
    reads_images = False
    annotation_params = frozenset()
    selection_params = frozenset({"threshold", "k", "policy", "keep", "exact_below", "nprobe", "partition_above",
                                  "cluster_rows", "probe"})

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Find pairs with cosine >= `threshold` among k nearest neighbours and drop per `policy`."""
        params = self.params
        vectors, judged, models = image_embeddings(table)

        def find_edges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
            i, j, cosine, index = float_pairs(vectors[rows], params.threshold, params.k, params.exact_below,
                                              params.nprobe)
            return i, j, [f"cosine {c:.4f}" for c in cosine.tolist()], {"index": index, "k": params.k}

        return decide_duplicates("semantic", table, judged, params.policy, find_edges,
                                 {"threshold": f"cosine >= {params.threshold}", "models": models}, keep=params.keep)

    def decide_files(self, files: list[str], work_dir: str) -> tuple[pa.Table, dict, int]:
        """Small corpora: one process (see `decide`). Large ones: k-means partitions searched by Ray tasks."""
        counts = [storage.parquet_file(f).metadata.num_rows for f in files]
        rows = sum(counts)
        if rows <= self.params.partition_above:
            return super().decide_files(files, work_dir)
        import ray

        params = self.params
        parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
        partitions = f"{str(work_dir).rstrip('/')}/semantic"
        i, j, cosine, judged_rows, models, index = partitioned_pairs(files, params.threshold, params.cluster_rows,
                                                             params.probe, partitions, parallelism)
        columns = ["key", "image_meta", "scores", "meta"]
        table = pa.concat_tables([storage.read_table(f, columns=columns) for f in files])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        judged = np.zeros(rows, dtype=bool)
        for shard, judged_in_shard in enumerate(judged_rows):
            judged[offsets[shard] + judged_in_shard] = True

        def find_edges(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
            rank = np.full(rows, -1, dtype=np.int64)
            rank[ordered] = np.arange(len(ordered))
            return rank[i], rank[j], [f"cosine {c:.4f}" for c in cosine.tolist()], {"index": index}

        drops, summary = decide_duplicates("semantic", table, judged, params.policy, find_edges,
                                           {"threshold": f"cosine >= {params.threshold}", "models": models},
                                           keep=params.keep)
        storage.remove_tree(partitions, ignore_errors=True)
        return drops, summary, rows
