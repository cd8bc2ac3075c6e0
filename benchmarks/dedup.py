"""Semantic dedup benchmark: k-means-partitioned search on Ray vs one FAISS IVF index, against brute force.

Data: `curate.demo.embeddings.planted_embeddings` (512-d float16 unit vectors around
shared centres, 10% planted near-duplicates at cosine ~0.96-0.995, 5% near misses at
~0.85-0.92), written as work shards of 10,000 rows (`key`, `image_meta`, `scores`,
`embeddings`, `meta`, as the engine's model pass leaves them). Rows come in independent
blocks of 100,000, so the first 100k rows are the same at every size: the pairs found
there are compared with exact brute force (every pair with cosine >= threshold, float64).

For each size (default 100k, 300k, 1M), each in a fresh process:
- curate: `DedupSemantic(partition_above=0).decide_files(shards)` on a local Ray with 2 CPUs
  (sample + k-means, assign, per-cluster exact search as Ray tasks, then the keep policy
  and the decision table): wall time, peak RSS and PSS summed over the whole process tree
  (Ray included), and the tree's RSS with Ray idle just before the run;
- faiss-ivf: what a user would write with FAISS alone: all vectors in one process, one
  `IndexIVFFlat` (nlist = 4 sqrt(n), nprobe 16), k=32 nearest neighbours + the threshold
  (curate.dedup.search.float_pairs with exact_below=0), pairs only (no keep decision);
  skipped above `--baseline-max` rows.

    .venv/bin/python benchmarks/dedup.py                      # ~15 min on 2 cores
    .venv/bin/python benchmarks/dedup.py --sizes 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from measure import TreeSampler  # noqa: E402

DIM = 512
SHARD_ROWS = 10_000
SUBSET = 100_000
THRESHOLD = 0.95
SEED = 11


def key_of(n: int) -> str:
    from curate import schema

    return schema.sample_key("planted", n, None)


def write_shards(rows: int, folder: Path) -> list[str]:
    """The planted corpus of `rows` rows as work shards (reused if already there)."""
    from curate import schema
    from curate.demo.embeddings import planted_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"part-{s:05d}.parquet" for s in range(rows // SHARD_ROWS)]
    if all(f.exists() for f in files):
        return [str(f) for f in files]
    planted = planted_embeddings(rows, DIM, seed=SEED)
    np.save(folder / "original.npy", planted.original)
    rng = np.random.default_rng(SEED)
    for s, path in enumerate(files):
        start = s * SHARD_ROWS
        vectors = planted.vectors[start:start + SHARD_ROWS]
        offsets = pa.array(np.arange(0, (len(vectors) + 1) * DIM, DIM, dtype=np.int32))
        image = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float16()))
        embeddings = pa.StructArray.from_arrays(
            [pa.array(["synthetic"] * len(vectors)), image, pa.nulls(len(vectors), image.type)],
            fields=list(schema.EMBEDDINGS))
        sizes = rng.integers(256, 1024, (len(vectors), 2))
        image_meta = pa.array([[{"width": int(w), "height": int(h)}] for w, h in sizes],
                              schema.SAMPLE_SCHEMA.field("image_meta").type)
        scores = pa.array([{"clip_score": float(c)} for c in rng.uniform(0.2, 0.4, len(vectors))],
                          schema.SCORES)
        table = pa.table({"key": [key_of(start + n) for n in range(len(vectors))], "image_meta": image_meta,
                          "scores": scores, "embeddings": embeddings, "meta": pa.nulls(len(vectors), pa.string())})
        pq.write_table(table, path)
    return [str(f) for f in files]


def read_vectors(files: list[str]) -> np.ndarray:
    from curate.dedup.semantic import image_embeddings

    return np.concatenate([image_embeddings(pq.read_table(f, columns=["embeddings"]))[0] for f in files])


def brute_force_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair (i < j) with float64 cosine >= threshold, by blocked float32 products + exact re-check."""
    found = set()
    block = 1024
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        qi, mj = np.nonzero(sims >= threshold - 1e-3)
        qi += start
        upper = mj > qi
        qi, mj = qi[upper], mj[upper]
        exact = np.einsum("nd,nd->n", vectors[qi].astype(np.float64), vectors[mj].astype(np.float64))
        found.update(zip(qi[exact >= threshold].tolist(), mj[exact >= threshold].tolist()))
    return found


# ------------------------------------------------------------------ one measured run (child process)

def run_curate(files: list[str], out: Path) -> dict:
    import ray

    import curate.dedup.semantic as semantic
    from curate.dedup.semantic import DedupSemantic, DedupSemanticParams

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    time.sleep(3)
    idle = TreeSampler(os.getpid())
    idle.sample()
    captured = {}

    def capturing(*args, **kwargs):
        result = semantic_pairs(*args, **kwargs)
        captured["pairs"] = result
        return result

    semantic_pairs = semantic.partitioned_pairs
    semantic.partitioned_pairs = capturing
    stage = DedupSemantic(DedupSemanticParams(threshold=THRESHOLD, partition_above=0))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        drops, summary, rows = stage.decide_files(files, work)
    seconds = time.perf_counter() - started
    i, j = captured["pairs"][0], captured["pairs"][1]
    subset = (i < SUBSET) & (j < SUBSET)
    np.savez(out, i=i[subset], j=j[subset])
    ray.shutdown()
    return {"seconds": round(seconds, 1), "rows": rows, "removed": summary["removed"], "pairs": summary["pairs"],
            "index": summary["index"], "ray_idle_rss_mib": round(idle.peak_rss / 2**20)}


def run_faiss(files: list[str], out: Path) -> dict:
    from curate.dedup.search import float_pairs

    vectors = read_vectors(files)
    started = time.perf_counter()
    i, j, _, index = float_pairs(vectors, THRESHOLD, k=32, exact_below=0, nprobe=16)
    seconds = time.perf_counter() - started
    subset = (i < SUBSET) & (j < SUBSET)
    np.savez(out, i=i[subset], j=j[subset])
    return {"seconds": round(seconds, 1), "rows": len(vectors), "pairs": len(i), "index": index}


def child(args: argparse.Namespace) -> None:
    files = sorted(str(p) for p in Path(args.shards).glob("part-*.parquet"))
    out = Path(args.out)
    result = run_curate(files, out) if args.child == "curate" else run_faiss(files, out)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ driver

def measure(tool: str, shards: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", tool, "--shards", str(shards), "--out", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(process.pid, interval=0.5, pss_every=4)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{stderr[-3000:]}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    result.update(process_seconds=round(time.perf_counter() - started, 1),
                  peak_rss_mib=round(sampler.peak_rss / 2**20), peak_pss_mib=round(sampler.peak_pss / 2**20))
    return result


def pair_quality(found_file: Path, truth: set[tuple[int, int]]) -> dict:
    data = np.load(found_file)
    found = set(zip(data["i"].tolist(), data["j"].tolist()))
    hits = len(found & truth)
    return {"pair_recall": round(hits / max(1, len(truth)), 4), "pair_precision": round(hits / max(1, len(found)), 4)}


def planted_precision(shards: Path, found_file: Path) -> float:
    """Share of found subset pairs that are planted copies of one original (near misses must not match)."""
    original = np.load(shards / "original.npy")[:SUBSET]
    data = np.load(found_file)
    if len(data["i"]) == 0:
        return 1.0
    return round(float(np.mean(original[data["i"]] == original[data["j"]])), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--baseline-max", type=int, default=300_000)
    parser.add_argument("--cache", default="/tmp/curate-bench-dedup")
    parser.add_argument("--json")
    parser.add_argument("--child", choices=["curate", "faiss"])
    parser.add_argument("--shards")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    cache = Path(args.cache)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {"machine": {"cpus": os.cpu_count()}, "threshold": THRESHOLD, "dim": DIM, "runs": []}
    truth = None
    for rows in sizes:
        shards = cache / f"rows{rows}"
        started = time.perf_counter()
        files = write_shards(rows, shards)
        print(f"{rows} rows: shards ready ({time.perf_counter() - started:.0f} s)", flush=True)
        if truth is None:
            started = time.perf_counter()
            truth = brute_force_pairs(read_vectors(files[:SUBSET // SHARD_ROWS]), THRESHOLD)
            results["brute_force_100k"] = {"pairs": len(truth), "seconds": round(time.perf_counter() - started, 1)}
            print(f"brute force on the first {SUBSET} rows: {len(truth)} pairs", flush=True)
        for tool in ("curate", "faiss"):
            if tool == "faiss" and rows > args.baseline_max:
                continue
            found_file = cache / f"found-{tool}-{rows}.npz"
            result = measure(tool, shards, found_file)
            result.update(tool=tool, **pair_quality(found_file, truth),
                          planted_precision=planted_precision(shards, found_file))
            results["runs"].append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
