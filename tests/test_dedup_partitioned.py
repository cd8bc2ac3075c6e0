"""Semantic dedup over k-means partitions as Ray tasks: same pairs and keep-set as one exact search."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.dedup.partitioned import PartitionPlan, partitioned_pairs
from curate.dedup.semantic import DedupSemantic, DedupSemanticParams
from curate.demo.embeddings import planted_embeddings

ROWS, DIM, SHARDS = 6_000, 64, 6
THRESHOLD = 0.95


def exact_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Brute force: every pair (i < j) of unit rows with cosine >= threshold."""
    unit = vectors.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    i, j = np.nonzero(np.triu(unit @ unit.T >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    planted = planted_embeddings(ROWS, DIM, seed=3, block=2_000, points_per_centre=100)
    keys = [schema.sample_key("planted", n, None) for n in range(ROWS)]
    rows = [{"key": key, "kind": "pair", "scores": {"clip_score": None},
             "embeddings": {"model": "synthetic", "image": vector.tolist(), "text": None}}
            for key, vector in zip(keys, planted.vectors)]
    rows[17]["embeddings"] = None  # a sample without an embedding is not judged
    folder = tmp_path_factory.mktemp("shards")
    files = []
    per_shard = ROWS // SHARDS
    for s in range(SHARDS):
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(schema.from_rows(rows[s * per_shard:(s + 1) * per_shard]), path)
        files.append(str(path))
    return planted, keys, files


def test_partitioned_search_finds_the_exact_pairs(corpus, local_ray, tmp_path):
    planted, _, files = corpus
    i, j, cosine, judged, models, index = partitioned_pairs(files, THRESHOLD, cluster_rows=300, probe=3,
                                                           work_dir=str(tmp_path), parallelism=2)
    found = set(zip(i.tolist(), j.tolist()))
    truth = {(a, b) for a, b in exact_pairs(planted.vectors, THRESHOLD) if 17 not in (a, b)}
    recall = len(found & truth) / len(truth)
    print(f"\npartitioned: {len(found)} pairs, exact {len(truth)}, recall {recall:.4f}, {index}")
    assert found <= truth  # every reported pair re-measured above the threshold
    assert recall >= 0.98
    assert np.all(cosine >= THRESHOLD)
    assert sum(len(r) for r in judged) == ROWS - 1 and 17 not in judged[0]
    assert models == ["synthetic"] and index.startswith("k-means partitions (clusters=20, probe=3")


def test_partitioned_decision_matches_the_single_process_one(corpus, local_ray, tmp_path):
    _, keys, files = corpus
    params = dict(threshold=THRESHOLD)
    single, single_summary, rows = DedupSemantic(DedupSemanticParams(**params)).decide_files(files, str(tmp_path))
    stage = DedupSemantic(DedupSemanticParams(**params, partition_above=0, cluster_rows=300, probe=3))
    split, split_summary, split_rows = stage.decide_files(files, str(tmp_path))
    assert rows == split_rows == ROWS
    assert single_summary["removed"] > 300
    gone = {r["key"] for r in single.to_pylist() if r["reason"]}
    gone_split = {r["key"] for r in split.to_pylist() if r["reason"]}
    assert len(gone ^ gone_split) <= 0.01 * len(gone)
    assert split_summary["index"].startswith("k-means partitions") and split_summary["judged"] == ROWS - 1
    assert not (tmp_path / "semantic").exists()  # the shuffle files are removed afterwards


def dropped(decision: pa.Table) -> dict[str, str]:
    return {r["key"]: r["detail"] for r in decision.to_pylist() if r["reason"]}


def test_partitioned_decision_does_not_depend_on_shard_order_when_the_criteria_decide(corpus, local_ray, tmp_path):
    _, _, files = corpus
    scored = []
    for n, path in enumerate(files):  # distinct clip scores, so that source order never breaks a tie
        table = pq.read_table(path)
        scores = pa.array([{"clip_score": float(n * ROWS + r)} for r in range(table.num_rows)], schema.SCORES)
        scored.append(str(tmp_path / f"scored-{n}.parquet"))
        pq.write_table(table.set_column(table.schema.get_field_index("scores"), "scores", scores), scored[-1])
    stage = DedupSemantic(DedupSemanticParams(threshold=THRESHOLD, partition_above=0, cluster_rows=300,
                                              keep=["clip_score"]))
    forward, _, _ = stage.decide_files(scored, str(tmp_path / "a"))
    backward, _, _ = stage.decide_files(scored[::-1], str(tmp_path / "b"))
    assert dropped(forward) == dropped(backward)


def test_partitioned_and_single_process_break_ties_by_the_same_source_order(local_ray, tmp_path):
    """Equal on every criterion, the earlier row in work-shard order is kept, partitioned or not."""
    base = np.eye(DIM, dtype=np.float32)[:8]
    rows = [{"key": schema.sample_key("ties", n, None), "kind": "pair",
             "embeddings": {"model": "synthetic", "image": base[n % 8].tolist(), "text": None}} for n in range(32)]
    files = []
    for s in range(4):
        files.append(str(tmp_path / f"part-{s}.parquet"))
        pq.write_table(schema.from_rows(rows[s * 8:(s + 1) * 8]), files[-1])
    for order in (files, files[::-1]):
        single, _, _ = DedupSemantic(DedupSemanticParams(threshold=THRESHOLD)).decide_files(order, str(tmp_path))
        split, _, _ = DedupSemantic(DedupSemanticParams(threshold=THRESHOLD, partition_above=0, cluster_rows=4)
                                    ).decide_files(order, str(tmp_path))
        first_shard = {r["key"] for r in pq.read_table(order[0]).to_pylist()}
        assert dropped(single) == dropped(split)
        assert len(dropped(single)) == 24 and not first_shard & set(dropped(single))
        assert all("; kept for source_order: row " in detail for detail in dropped(single).values())


def test_plan_bounds_memory_and_uses_every_cpu():
    small = PartitionPlan.for_corpus(rows=10_000, dim=512, cluster_rows=2_000, probe=3, parallelism=2)
    assert (small.clusters, small.groups) == (5, 4)
    huge = PartitionPlan.for_corpus(rows=10_000_000, dim=512, cluster_rows=2_000, probe=3, parallelism=2)
    per_task_bytes = huge.rows / huge.groups * 512 * 4 * (1 + huge.probe)
    assert per_task_bytes <= 1.01 * (1 << 30) and huge.clusters == 5_000


def test_pairs_found_by_two_search_tasks_are_reported_once(corpus, local_ray, tmp_path):
    _, _, files = corpus
    i, j, _, _, _, _ = partitioned_pairs(files, THRESHOLD, cluster_rows=100, probe=8, work_dir=str(tmp_path),
                                         parallelism=2)
    pairs = list(zip(i.tolist(), j.tolist()))
    assert len(pairs) == len(set(pairs)) and all(a < b for a, b in pairs)
