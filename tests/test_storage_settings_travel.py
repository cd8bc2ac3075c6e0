"""Storage settings travel with the paths: an S3 endpoint given only in the recipe reaches every Ray task.

Semantic dedup above its partitioning threshold runs nested Ray tasks (sample, assign, search)
from inside the corpus decision's task. On a fresh local Ray whose workers have no
AWS_ENDPOINT_URL, a run reading and writing on the loopback S3 (moto's server), with the endpoint
only in the recipe's `storage` section, must succeed, write its output into the bucket and find
the same near-duplicates as the same recipe on local folders.
"""

from __future__ import annotations

import io
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from moto_s3 import moto_bucket
from rich.console import Console

from curate import storage
from curate.dedup.semantic import TINY_CLIP_THRESHOLD
from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

BUCKET = "travel"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "curate-test-key", "AWS_SECRET_ACCESS_KEY": "curate-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# fetch, the tiny CLIP's embeddings, then semantic dedup as the only corpus-wide stage, forced onto the
# partitioned search (partition_above: 0) with a few rows per k-means cluster; 5 work shards.
RECIPE = f"""\
source: {{type: url_list, path: urls.parquet}}
stages:
  fetch: {{allow_private_addresses: true, host_rate: null, backoff_base: 0.01}}
  clip_score: {{model: {{model: curate-tiny}}}}
  dedup_semantic: {{threshold: {TINY_CLIP_THRESHOLD}, partition_above: 0, cluster_rows: 8, probe: 3}}
output: {{path: out, formats: [parquet]}}
engine: {{rows_per_work_shard: 24}}
"""


@pytest.fixture(scope="module")
def s3_without_endpoint_in_env():
    """moto's S3 server on loopback, credentials in the environment, and a fresh Ray with no endpoint variable."""
    # the Ray workers started below must not inherit an endpoint
    with moto_bucket(BUCKET, AWS_ENV, unset=ENDPOINT_VARIABLES) as (endpoint, filesystem):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            yield endpoint, filesystem
        finally:
            ray.shutdown()


def test_semantic_dedup_partitioned_on_s3_with_the_endpoint_only_in_the_recipe(s3_without_endpoint_in_env,
                                                                               tmp_path):
    endpoint, filesystem = s3_without_endpoint_in_env

    def worker_endpoint() -> tuple[str | None, str | None]:  # sent by value: workers cannot import this file
        return os.environ.get("AWS_ENDPOINT_URL"), storage.StorageConfig.from_settings().endpoint_url

    assert ray.get(ray.remote(worker_endpoint).remote()) == (None, None)  # only the recipe names the endpoint
    web = build_synthetic_web(n_images=120, seed=5)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    with LoopbackServer(web.routes) as server:
        url_list = tmp_path / "urls.parquet"
        write_url_list(web, server.base_url, str(url_list))
        pafs.copy_files(str(url_list), f"{BUCKET}/input/urls.parquet", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)
        remote = execute(compile_plan(load_recipe(recipe, [
            f"source.path=s3://{BUCKET}/input/urls.parquet", f"output.path=s3://{BUCKET}/out",
            f"storage.endpoint_url={endpoint}"])), Console(file=io.StringIO()), progress=False, judge=False)
        local = execute(compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}"])),
                        Console(file=io.StringIO()), progress=False, judge=False)

    assert remote["reconciliation"]["ok"]
    decision = remote["decisions"]["dedup_semantic"]
    assert decision["index"].startswith("k-means partitions")
    keys = {i.path for i in filesystem.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))
            if i.type == pafs.FileType.File}
    assert {f"{BUCKET}/out/{s['path']}" for s in remote["outputs"]["shards"]} <= keys
    assert f"{BUCKET}/out/manifest.json" in keys

    drops = pq.read_table(f"{BUCKET}/out/drops.parquet", filesystem=filesystem).to_pylist()
    semantic = [d for d in drops if d["stage"] == "dedup_semantic"]
    base = server.base_url.rstrip("/")
    listed_twice = {base + r["path"] for r in web.rows if r["expect"] == "duplicate_url"}
    assert listed_twice  # every URL listed twice: the same image, one copy dropped
    assert len({d["url"] for d in semantic} & listed_twice) == len(listed_twice)
    print(f"\nsemantic dedup on S3: removed {decision['removed']}, {len(listed_twice)} URLs listed twice, "
          f"{decision['index']}")
    assert decision["removed"] == len(semantic) == local["decisions"]["dedup_semantic"]["removed"]
    local_drops = pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()
    assert sorted(d["key"] for d in semantic) == sorted(d["key"] for d in local_drops
                                                        if d["stage"] == "dedup_semantic")
    assert [(s["path"], s["rows"], s["sha256"]) for s in remote["outputs"]["shards"]] == [
        (s["path"], s["rows"], s["sha256"]) for s in local["outputs"]["shards"]]


def test_a_reselection_without_ray_starts_it_for_a_partitioned_semantic_decision(tmp_path):
    """A changed threshold re-selects in this process (no annotation is pending), but semantic dedup above its
    partitioning threshold decides with Ray tasks: the run starts Ray for that decision and says so."""
    web = build_synthetic_web(n_images=60, seed=7)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    output = tmp_path / "out"
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, str(tmp_path / "urls.parquet"))
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
        first = execute(compile_plan(load_recipe(recipe, [f"output.path={output}"])), Console(file=io.StringIO()),
                        progress=False, judge=False)
    ray.shutdown()
    looser = TINY_CLIP_THRESHOLD - 0.02
    again = execute(compile_plan(load_recipe(recipe, [f"output.path={output}",
                                                      f"stages.dedup_semantic.threshold={looser}"])),
                    Console(file=io.StringIO()), progress=False, judge=False)
    assert again["reconciliation"]["ok"] and again["device"]["ray"] is True
    assert again["decisions"]["dedup_semantic"]["index"].startswith("k-means partitions")
    assert all(entry["computed_rows"] == 0 for entry in again["pool"]["annotations"].values())  # nothing annotated
    assert again["decisions"]["dedup_semantic"]["removed"] >= first["decisions"]["dedup_semantic"]["removed"]
