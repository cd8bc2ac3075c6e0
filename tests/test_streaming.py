"""Annotation groups stream across their own pools; GPU stages run only where GPUs are, CPU stages take none."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import ray
from rich.console import Console

from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine import cluster
from curate.engine.run import TIMELINE_FILE, compile_plan, execute
from curate.recipe import load_recipe


@pytest.fixture
def gpu_node_cluster():
    """Two local nodes: the head (driver, CPUs only) and one that declares a GPU."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_node = local.add_node(num_cpus=1, num_gpus=1)
    local.wait_for_nodes()
    ray.init(address=local.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield local, gpu_node
    ray.shutdown()
    local.shutdown()


def _timeline(output) -> list[dict]:
    lines = (output / "_work" / TIMELINE_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _fetch_and_score(tmp_path, web, engine: str, address: str | None = None) -> tuple[dict, object]:
    """Run fetch + clip_score (tiny model, keeps everything) over `web` with `engine` settings (YAML flow
    mapping entries); return the manifest and the output folder (its work area kept)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n"
        "  fetch: {allow_private_addresses: true, host_rate: null, threads: 2, backoff_base: 0.01}\n"
        "  clip_score: {model: {model: curate-tiny}, min_score: -1.0}\n"
        "output: {path: out, formats: [parquet]}\n"
        f"engine: {{keep_work: true, {engine}}}\n")
    output = tmp_path / "out"
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, tmp_path / "urls.parquet")
        manifest = execute(compile_plan(load_recipe(recipe, [f"output.path={output}"])),
                           Console(file=io.StringIO()), address=address, progress=False)
    return manifest, output


def test_model_actors_run_on_the_gpu_node_while_fetch_streams_on(gpu_node_cluster, tmp_path):
    local, gpu_node = gpu_node_cluster
    web = build_synthetic_web(n_images=48, seed=5)
    for route in web.routes.values():
        route.delay = 0.2  # slow hosts: fetching takes long enough for the model to start on early shards
    manifest, output = _fetch_and_score(tmp_path, web, "rows_per_work_shard: 4", address=local.address)
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == 48
    timeline = _timeline(output)
    model = [e for e in timeline if e["step"] == "model"]
    fetch = [e for e in timeline if e["step"] == "prepare"]
    assert len(model) == len(fetch) == 12  # every work shard went through both groups once

    # Model actors only on the GPU node, each holding a GPU; fetch actors hold none (and may run anywhere).
    assert {e["node"] for e in model} == {gpu_node.node_id}
    assert all(e["gpus"] for e in model)
    assert all(e["gpus"] == [] for e in fetch)
    assert len({e["pid"] for e in model}) == 1  # one model actor, loaded once, up across the shards

    # Streaming: the model works on early shards while fetch still works on later ones.
    overlaps = [(m["shard"], f["shard"]) for m in model for f in fetch
                if f["shard"] > m["shard"] and f["start"] < m["end"] and m["start"] < f["end"]]
    assert overlaps, "the model stage never ran while a later shard was still fetching"
    first_model_start = min(e["start"] for e in model)
    last_fetch_end = max(e["end"] for e in fetch)
    assert first_model_start < last_fetch_end

    kept = pq.read_table(output / "parquet", columns=["key"]).num_rows
    assert kept == manifest["reconciliation"]["output_rows"] > 0


def test_backpressure_bounds_the_shards_in_flight(local_ray, tmp_path):
    """With max_shards_in_flight 2, no work shard starts fetching before the shard two before it left the model
    group."""
    web = build_synthetic_web(n_images=40, seed=6)
    manifest, output = _fetch_and_score(tmp_path, web, "rows_per_work_shard: 5, max_shards_in_flight: 2")
    assert manifest["reconciliation"]["ok"]
    timeline = _timeline(output)
    fetch_start = {e["shard"]: e["start"] for e in timeline if e["step"] == "prepare"}
    model_end = {e["shard"]: e["end"] for e in timeline if e["step"] == "model"}
    assert len(fetch_start) == len(model_end) == 8
    for shard in range(2, 8):
        # shard n enters only when fewer than 2 are in flight: at least one of the earlier ones has left
        assert fetch_start[shard] >= min(model_end[s] for s in range(shard)) - 0.05


def test_pools_share_the_cpus_and_gpu_pools_get_one_worker_per_gpu():
    resources = {"CPU": 8.0, "GPU": 2.0, "memory": 64e9}
    fetch, model, idle = cluster.plan_pools(resources, "auto", [
        cluster.Demand(cpus=1.0, shards=100), cluster.Demand(cpus=1.0, gpus=1.0, shards=100),
        cluster.Demand(cpus=1.0, shards=0)])
    assert model.workers == 2 and model.gpus_per_worker == 1.0
    assert fetch.gpus_per_worker == 0.0 and fetch.workers >= 1
    assert idle.workers == 0
    assert fetch.workers * fetch.cpus_per_worker + model.workers * model.cpus_per_worker <= 8 * 0.8 + 1e-9
    # a pool never gets more workers than it has work shards
    (few,) = cluster.plan_pools(resources, "auto", [cluster.Demand(cpus=1.0, shards=2)])
    assert few.workers == 2
    # one GPU node: the GPU pool takes its worker there and leaves the CPU pools their worker count
    fetch, model = cluster.plan_pools({"CPU": 2.0, "GPU": 1.0}, "auto", [
        cluster.Demand(cpus=1.0, shards=20), cluster.Demand(cpus=1.0, gpus=1.0, shards=20)])
    assert (fetch.workers, model.workers) == (2, 1)
    assert fetch.workers * fetch.cpus_per_worker + model.cpus_per_worker <= 1.6 + 1e-9
    # CPUs only: two CPU pools side by side split the workers
    fetch, model = cluster.plan_pools({"CPU": 2.0}, "auto", [cluster.Demand(cpus=1.0, shards=20)] * 2)
    assert (fetch.workers, model.workers) == (1, 1)
    # a number asks for that many workers per pool, their CPUs shared
    a, b = cluster.plan_pools({"CPU": 2.0}, 4, [cluster.Demand(cpus=1.0, shards=10)] * 2)
    assert a.workers == b.workers == 4 and 8 * a.cpus_per_worker <= 1.6 + 1e-9


def test_a_phase_mixing_gpu_and_cpu_stages_is_split_so_cpu_stages_hold_no_gpu(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"url": ["http://example.org/a.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("source: {type: url_list, path: urls.parquet}\n"
                      "stages: {fetch: {}, nsfw: {}, faces: {}}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n")
    plan = compile_plan(load_recipe(recipe), require_weights=False)
    groups = [(g.name, [s.name for s in g.stages]) for g in plan.groups]
    assert groups == [("prepare", ["fetch"]), ("safety", ["nsfw"]), ("safety-cpu", ["faces"])]
    stages = {s.name: s for s in plan.stages}
    assert stages["nsfw"].resources.gpus > 0 and stages["faces"].resources.gpus == 0
