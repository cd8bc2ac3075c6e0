"""Engine pieces: worker sizing, work-shard split, output-shard planning, stage failures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from rich.console import Console

from curate import registry, schema
from curate.demo.server import LoopbackServer, Route
from curate.engine.apply import apply_stages
from curate.engine.cluster import plan_workers
from curate.engine.run import compile_plan, execute
from curate.engine.split import _rechunk
from curate.engine.write import plan_output_shards
from curate.files import RunLayout
from curate.recipe import load_recipe
from curate.stage import StageFailure

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.mark.parametrize("cpus, requested, shards, workers", [(2, "auto", 10, 2), (2, "auto", 1, 1), (8, 3, 10, 3),
                                                              (1, "auto", 5, 1), (16, "auto", 4, 4)])
def test_worker_pool_never_takes_every_cpu(cpus, requested, shards, workers):
    plan = plan_workers({"CPU": float(cpus)}, requested, shards)
    assert plan.workers == workers
    assert plan.workers * plan.cpus_per_worker < cpus
    assert plan.cpus_per_worker <= 1.0


def test_gpu_workers_are_limited_by_gpus():
    plan = plan_workers({"CPU": 16.0, "GPU": 2.0}, "auto", 10, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert plan.workers == 2 and plan.gpus_per_worker == 1.0


def test_rechunk_gives_exact_work_shards():
    tables = [pa.table({"x": list(range(i * 7, i * 7 + 7))}) for i in range(5)]  # 35 rows in uneven pieces
    chunks = list(_rechunk(iter(tables), 10))
    assert [c.num_rows for c in chunks] == [10, 10, 10, 5]
    assert sum((c.column("x").to_pylist() for c in chunks), []) == list(range(35))


def make_work_shard(path: Path, sizes: list[int]) -> Path:
    rows = [{"key": f"{path.stem}{i:04x}", "kind": "pair", "image_meta": [{"num_bytes": size}]}
            for i, size in enumerate(sizes)]
    pq.write_table(schema.from_rows(rows), path)
    return path


def test_output_shards_cut_by_rows_and_bytes_deterministically(tmp_path):
    files = [make_work_shard(tmp_path / "a.parquet", [100] * 5), make_work_shard(tmp_path / "b.parquet", [100] * 6)]
    by_rows = plan_output_shards(files, shard_rows=4, shard_bytes=None)
    assert [s.rows for s in by_rows] == [4, 4, 3]
    assert [(Path(g.file).name, g.start, g.stop) for g in by_rows[1].segments] == [("a.parquet", 4, 5),
                                                                                 ("b.parquet", 0, 3)]
    by_bytes = plan_output_shards(files, shard_rows=None, shard_bytes=250)
    assert [s.rows for s in by_bytes] == [3, 3, 3, 2]
    assert plan_output_shards(files, 4, None) == by_rows


def test_a_stage_that_removes_rows_is_refused():
    stage = registry.import_target("stages_for_tests:RowEatingStage")(registry.import_target(
        "stages_for_tests:RowEatingStage").Params())
    batch = schema.from_rows([{"key": "a", "kind": "pair"}, {"key": "b", "kind": "pair"}])
    with pytest.raises(RuntimeError, match="must mark drops"):
        apply_stages([stage], batch, {})


@pytest.fixture
def ray_with_test_stages(monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS}:{REPO}"}})
    monkeypatch.setitem(registry.STAGES, "explode", "stages_for_tests:ExplodingStage")
    yield
    ray.shutdown()


@pytest.fixture
def exploding_run(tmp_path, ray_with_test_stages):
    """Run fetch + the exploding stage over 10 rows (work shards of 3); row 5's caption explodes."""
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(image, "JPEG")
    with LoopbackServer({"/a.jpg": Route(body=image.getvalue())}) as server:
        captions = ["a red square"] * 5 + ["please explode now"] + ["a red square"] * 4
        url_list = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url("/a.jpg")] * 10, "caption": captions}), url_list)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(
            "source: {type: url_list, path: urls.parquet}\n"
            "stages:\n  fetch: {allow_private_addresses: true, host_rate: null}\n  explode: {}\n"
            "output: {path: out}\nengine: {rows_per_work_shard: 3}\n"
        )

        def run(*overrides: str) -> dict:
            plan = compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}", *overrides]))
            return execute(plan, Console(file=io.StringIO()), progress=False, overwrite=True)

        yield run, RunLayout(tmp_path / "out")


def test_a_failing_sample_is_dropped_with_stage_error_by_default(exploding_run):
    run, layout = exploding_run
    manifest = run()
    assert manifest["reconciliation"] == {**manifest["reconciliation"], "input_rows": 10, "output_rows": 9,
                                          "dropped_rows": 1, "ok": True}
    drops = pq.read_table(layout.drops).to_pylist()
    assert [(d["stage"], d["reason"]) for d in drops] == [("explode", "stage_error")]
    assert "cannot handle caption" in drops[0]["detail"]


def test_with_raise_policy_a_failure_stops_the_run_naming_the_work_shard(exploding_run):
    run, layout = exploding_run
    with pytest.raises(StageFailure) as caught:
        run("engine.on_sample_error=raise")
    message = str(caught.value)
    assert "work shard 00001" in message and "phase 'prepare'" in message and "explode" in message
    assert not layout.manifest.exists()
    assert not layout.marker("prepare", 1).exists()


def test_a_stage_failing_on_every_row_stops_the_run(exploding_run):
    run, layout = exploding_run
    with pytest.raises(StageFailure, match=r"phase .prepare., work shard 0000[0-3]: ValueError"):
        run("stages.explode.trigger=red")
    assert not layout.manifest.exists()



def test_top_fraction_threshold_follows_datacomp():
    from curate.ops.top_fraction import top_fraction_threshold

    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6])
    # descending: .9 .8 .7 .6 .5 .5 ...; int(10 * 0.3) = 3 -> the 4th score, 0.6
    assert top_fraction_threshold(scores, 0.3) == 0.6
    assert top_fraction_threshold(scores, 1.0) == float("-inf")
    assert top_fraction_threshold(np.array([]), 0.3) == float("-inf")


@pytest.fixture(scope="module")
def scored_web(tmp_path_factory):
    from curate.demo.web import build_synthetic_web, write_url_list

    folder = tmp_path_factory.mktemp("scored")
    web = build_synthetic_web(n_images=120, seed=3)
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, folder / "urls.parquet")
        yield folder


@pytest.mark.parametrize("rows_per_shard, shards", [(1000, 1), (18, 7)])
def test_top_fraction_keeps_exactly_numpys_corpus_wide_top(scored_web, ray_with_test_stages, monkeypatch,
                                                           rows_per_shard, shards):
    from stages_for_tests import hash_score

    monkeypatch.setitem(registry.STAGES, "hash_score", "stages_for_tests:HashScoreStage")
    recipe = scored_web / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, backoff_base: 0.01}\n"
        "  basic_filter: {min_side: 32}\n"
        "  hash_score: {}\n  top_fraction: {score: clip_score, fraction: 0.3}\n"
        "output: {path: out, formats: [parquet]}\nengine: {rows_per_work_shard: 1000}\n")
    output = scored_web / f"out-{shards}"
    plan = compile_plan(load_recipe(recipe, [f"output.path={output}",
                                             f"engine.rows_per_work_shard={rows_per_shard}"]))
    manifest = execute(plan, Console(file=io.StringIO()), progress=False, overwrite=True)
    assert manifest["reconciliation"]["ok"]
    assert len(list((output / "parquet").glob("*.parquet"))) >= 1

    kept = set(pq.read_table(output / "parquet", columns=["key"]).column("key").to_pylist())
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    ranked = kept | {d["key"] for d in drops if d["stage"] == "top_fraction"}
    scores = {key: hash_score(key) for key in ranked}
    values = np.array(list(scores.values()))
    threshold = -np.sort(-values)[int(len(values) * 0.3)]
    assert kept == {key for key, score in scores.items() if score >= threshold}
    assert len(kept) >= int(len(values) * 0.3)
    assert manifest["decisions"]["top_fraction"]["threshold"] == pytest.approx(threshold)
    assert {d["reason"] for d in drops if d["stage"] == "top_fraction"} == {"below_top_fraction"}
    funnel = {s["name"]: s for s in manifest["stages"]}
    assert funnel["top_fraction"]["rows_out"] == len(kept)
