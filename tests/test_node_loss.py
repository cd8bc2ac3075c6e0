"""A two-node local Ray cluster loses a node mid-run: the run completes, no row lost or duplicated."""

from __future__ import annotations

import io
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
from rich.console import Console

from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_losing_a_node_mid_run_loses_no_row(two_node_cluster, tmp_path):
    cluster, worker_node = two_node_cluster
    web = build_synthetic_web(n_images=60, seed=2)
    for route in web.routes.values():
        route.delay = 0.15  # slow hosts: the run is still fetching when the node goes
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, backoff_base: 0.01, threads: 2}\n"
        "output: {path: out, formats: [parquet]}\nengine: {rows_per_work_shard: 5}\n")
    output = tmp_path / "out"
    result: dict = {}
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, tmp_path / "urls.parquet")
        plan = compile_plan(load_recipe(recipe, [f"output.path={output}"]))

        def run():
            try:
                result["manifest"] = execute(plan, Console(file=io.StringIO()), address=cluster.address,
                                             progress=False)
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                result["error"] = error

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 120
        while not list((output / "_pool/annotations/fetch").glob("*.done.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        done_before = len(list((output / "_pool/annotations/fetch").glob("*.done.json")))
        cluster.remove_node(worker_node)
        runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish after the node loss"
    assert "error" not in result, result.get("error")
    manifest = result["manifest"]
    assert 0 < done_before < 12  # the node went while work shards were still pending
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == 60
    kept = pq.read_table(output / "parquet", columns=["key"]).column("key").to_pylist()
    dropped = pq.read_table(output / "drops.parquet", columns=["key"]).column("key").to_pylist()
    assert len(set(kept)) == len(kept) and not set(kept) & set(dropped)
    assert len(kept) + len(dropped) == 60
    assert len(ray.nodes()) == 2 and sum(node["Alive"] for node in ray.nodes()) == 1
