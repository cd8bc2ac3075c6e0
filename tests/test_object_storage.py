"""Object storage: URL lists, work area and outputs on S3 (moto's server on loopback) and fsspec stores.

The S3 run must give the same shards as the local run, `curate verify` must check them in the
bucket, and a run killed after a prepare shard and after a write shard must resume in the bucket
to the same shards. Credentials stay in the environment: never in a manifest or in the output.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from moto_s3 import moto_bucket
from rich.console import Console

from curate import storage
from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.files import RunLayout, read_json, sha256_file, write_json
from curate.recipe import load_recipe
from curate.sources.url_list import UrlListParams, UrlListSource
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "pipelines" / "demo.yaml"
BUCKET = "corpus"
SECRET = "s3cr3t-value-that-must-never-be-written"
# fetch + basic_filter only (the model and dedup stages have tests of their own); 5 work shards, 2-3 output shards.
SETTINGS = ("stages.clip_score=false", "stages.aesthetic=false", "stages.watermark=false", "stages.dedup_exact=false",
            "stages.dedup_perceptual=false", "engine.rows_per_work_shard=24", "output.shard_rows=40")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "curate-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a loopback port, a bucket in it, and AWS credentials in the environment.

    Ray is (re)started after the credentials are set, so its workers inherit them as a node would.
    """
    with moto_bucket(BUCKET, AWS_ENV) as (endpoint, filesystem):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            yield endpoint, filesystem
        finally:
            ray.shutdown()


def s3_keys(filesystem: pafs.S3FileSystem, prefix: str) -> list[str]:
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return sorted(i.path for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File)


# --------------------------------------------------------------------------- the storage layer


@pytest.fixture(params=["memory", "s3"])
def store_root(request, monkeypatch):
    """A fresh folder in an fsspec store (memory://) or in the S3 bucket; plain URLs reach the same store."""
    if request.param == "memory":
        root = storage.StoragePath(f"memory://curate-tests/{request.node.originalname}")
    else:
        endpoint, _ = request.getfixturevalue("s3")
        root = storage.StoragePath(f"s3://{BUCKET}/unit/{request.node.originalname}", storage.StorageConfig(endpoint))
    monkeypatch.setattr(storage, "_current", root.config)  # as the engine's storage.configure does
    yield root
    storage.remove_tree(root)


def test_a_store_folder_reads_writes_lists_and_removes_like_a_local_one(store_root):
    layout = RunLayout(store_root)
    assert not store_root.exists()
    write_json(layout.marker("prepare", 3), {"rows_in": 7})
    write_json(layout.marker("prepare", 1), {"rows_in": 5})
    table = pa.table({"key": ["a", "b", "c"]})
    with storage.atomic_output(layout.shard_file("prepare", 1)) as temporary:
        pq.write_table(table, temporary)
    assert read_json(layout.marker("prepare", 3)) == {"rows_in": 7}
    assert storage.read_table(layout.shard_file("prepare", 1)).equals(table)
    assert storage.parquet_file(str(layout.shard_file("prepare", 1))).metadata.num_rows == 3  # a URL string works
    assert [p.name for p in sorted(layout.phase_dir("prepare").glob("*.done.json"))] == ["00001.done.json",
                                                                                         "00003.done.json"]
    assert layout.shard_file("prepare", 1).relative_to(store_root).as_posix() == "_work/prepare/00001.parquet"
    with storage.local_copy(layout.marker("prepare", 1)) as local:
        assert sha256_file(local) == sha256_file(layout.marker("prepare", 1))
    storage.remove_tree(layout.work)
    assert not layout.marker("prepare", 3).exists() and not layout.work.exists()


def test_a_store_object_appears_only_when_complete_and_never_half_written(store_root):
    target = store_root / "parquet" / "part-00000.parquet"
    with storage.atomic_output(target) as temporary:
        temporary.write_bytes(b"x" * 1000)
        assert not target.exists()  # written locally first; the key appears in one piece
    assert target.read_bytes() == b"x" * 1000
    with pytest.raises(RuntimeError):
        with storage.atomic_output(store_root / "failed.tar") as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("the sink failed")
    assert not (store_root / "failed.tar").exists()
    with storage.atomic_output(target) as temporary:  # a re-written key is replaced whole
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_url_lists_in_a_store_are_read_in_each_format(store_root):
    rows = b"url,caption\nhttp://127.0.0.1/1.jpg,one\n,no url\n"
    (store_root / "urls.csv.gz").write_bytes(gzip.compress(rows))
    assert gzip.decompress((store_root / "urls.csv.gz").read_bytes()) == rows  # stored as given, not compressed again
    (store_root / "urls.jsonl").write_bytes(b'{"url": "http://127.0.0.1/1.jpg", "caption": "one"}\nnot json\n')
    with storage.atomic_output(store_root / "urls.parquet") as temporary:
        pq.write_table(pa.table({"url": ["http://127.0.0.1/1.jpg", None], "caption": ["one", "two"]}), temporary)
    for name, reason in (("urls.csv.gz", "missing_url"), ("urls.jsonl", "bad_input_row"),
                         ("urls.parquet", "missing_url")):
        source = UrlListSource(UrlListParams(path=str(store_root / name)), recipe_dir="/elsewhere")
        source.preflight()
        table = pa.concat_tables(source.iter_batches(10))
        assert table.column("drop_reason").to_pylist() == [None, reason], name
        assert table.column("captions").to_pylist()[0] == [{"name": "alt", "text": "one"}]
        assert source.describe()["path"] == str(store_root / name)
        assert source.describe()["size_bytes"] == (store_root / name).stat().st_size
    with pytest.raises(RecipeError, match="not found"):
        UrlListSource(UrlListParams(path=str(store_root / "missing.parquet"))).preflight()


@pytest.mark.parametrize("url", ["s3://AKIAKEY:" + SECRET + "@corpus/out", "s3://corpus/out?secret=" + SECRET])
def test_a_url_with_credentials_is_refused_without_repeating_them(url, tmp_path):
    with pytest.raises(ValueError) as caught:
        storage.StoragePath(url)
    assert SECRET not in str(caught.value)
    loaded = load_recipe(DEMO_RECIPE, [f"output.path={url}", f"source.path={tmp_path / 'urls.parquet'}"])
    with pytest.raises(RecipeError) as refused:
        compile_plan(loaded)
    assert SECRET not in str(refused.value) and "environment" in str(refused.value)


def test_the_storage_section_and_output_url_are_left_out_of_the_recipe_hash(tmp_path):
    base = [f"source.path={tmp_path / 'urls.parquet'}"]
    local = load_recipe(DEMO_RECIPE, [*base, f"output.path={tmp_path / 'out'}"])
    remote = load_recipe(DEMO_RECIPE, [*base, "output.path=s3://corpus/out", "storage.endpoint_url=http://127.0.0.1:9",
                                       "storage.region=eu-west-1"])
    assert remote.recipe.output.path == "s3://corpus/out"  # not turned into a local path
    assert remote.output_path() == storage.StoragePath("s3://corpus/out")
    assert local.sha256() == remote.sha256()
    other_source = load_recipe(DEMO_RECIPE, ["source.path=s3://corpus/in/urls.parquet", "output.path=s3://corpus/o"])
    assert other_source.recipe.source["path"] == "s3://corpus/in/urls.parquet"
    assert other_source.sha256() != local.sha256()


# --------------------------------------------------------------------------- runs in the bucket


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The same recipe twice: local URL list into a local folder, and URL list and output in the bucket."""
    endpoint, filesystem = s3
    folder = tmp_path_factory.mktemp("storage-runs")
    web = build_synthetic_web(n_images=120, seed=5)
    with LoopbackServer(web.routes) as server:
        url_list = folder / "urls.parquet"
        write_url_list(web, server.base_url, str(url_list))
        pafs.copy_files(str(url_list), f"{BUCKET}/input/urls.parquet", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)
        local = execute(compile_plan(load_recipe(DEMO_RECIPE, [
            f"source.path={url_list}", f"output.path={folder / 'local'}", *SETTINGS])),
            Console(file=io.StringIO()), progress=False)
        remote = execute(compile_plan(load_recipe(DEMO_RECIPE, [
            f"source.path=s3://{BUCKET}/input/urls.parquet", f"output.path=s3://{BUCKET}/runs/whole",
            f"storage.endpoint_url={endpoint}", *SETTINGS])),
            Console(file=io.StringIO()), progress=False)
        yield server, folder, local, remote


def shard_digests(manifest: dict) -> list[tuple[str, int, str]]:
    return [(s["path"], s["rows"], s["sha256"]) for s in manifest["outputs"]["shards"]]


def cli(*args: str, endpoint: str, crash_after: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, reaching the bucket through AWS_ENDPOINT_URL (the recipe names no endpoint)."""
    environment = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
    if crash_after:
        environment["CURATE_TEST_CRASH_AFTER"] = crash_after
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True,
                          timeout=300, env=environment)


def test_an_s3_run_writes_the_local_runs_shards_into_the_bucket(runs, s3):
    _, filesystem = s3
    _, folder, local, remote = runs
    totals = remote["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == 120 == totals["output_rows"] + totals["dropped_rows"]
    assert len({s["path"] for s in remote["outputs"]["shards"]}) >= 4  # >= 2 shards in each format
    assert shard_digests(remote) == shard_digests(local)
    assert remote["drop_log"]["sha256"] == local["drop_log"]["sha256"]
    assert remote["sources"][0]["path"] == f"s3://{BUCKET}/input/urls.parquet"

    keys = s3_keys(filesystem, "runs/whole")
    expected = {f"{BUCKET}/runs/whole/{s['path']}" for s in remote["outputs"]["shards"]}
    pool = {key for key in keys if key.startswith(f"{BUCKET}/runs/whole/_pool/")}  # kept in the bucket too
    assert {key.split("/_pool/", 1)[1].split("/")[0] for key in pool} == {"input", "annotations", "pool.json"}
    assert set(keys) - pool == expected | {f"{BUCKET}/runs/whole/manifest.json", f"{BUCKET}/runs/whole/drops.parquet",
                                           f"{BUCKET}/runs/whole/webdataset/sizes.json"}
    with filesystem.open_input_stream(f"{BUCKET}/runs/whole/webdataset/sizes.json") as stream:
        assert json.loads(stream.read()) == {s["path"].split("/")[-1]: s["rows"] for s in remote["outputs"]["shards"]
                                             if s["format"] == "webdataset"}
    for key in expected:  # the bytes in the bucket are the local run's bytes
        with filesystem.open_input_stream(key) as stream:
            assert stream.read() == (folder / "local" / key.split("/runs/whole/", 1)[1]).read_bytes()
    table = pq.read_table(f"{BUCKET}/runs/whole/parquet", filesystem=filesystem)
    assert table.num_rows == totals["output_rows"]
    assert sorted(table.column("key").to_pylist()) == sorted(
        pq.read_table(folder / "local" / "parquet").column("key").to_pylist())
    drops = pq.read_table(f"{BUCKET}/runs/whole/drops.parquet", filesystem=filesystem)
    assert drops.num_rows == totals["dropped_rows"]

    with filesystem.open_input_stream(f"{BUCKET}/runs/whole/manifest.json") as stream:
        manifest_text = stream.read().decode()
    assert json.loads(manifest_text) == remote
    assert SECRET not in manifest_text and "curate-test-key" not in manifest_text


def test_verify_checks_the_shards_in_the_bucket_and_catches_a_changed_one(runs, s3):
    endpoint, filesystem = s3
    _, _, _, remote = runs
    ok = cli("verify", f"s3://{BUCKET}/runs/whole", endpoint=endpoint)
    assert ok.returncode == 0, ok.stderr
    assert f"{len(remote['outputs']['shards']) + 1} files" in ok.stdout
    shard = f"{BUCKET}/runs/whole/{remote['outputs']['shards'][-1]['path']}"
    with filesystem.open_input_stream(shard) as stream:
        data = bytearray(stream.read())
    data[len(data) // 2] ^= 0xFF
    with filesystem.open_output_stream(shard) as stream:
        stream.write(bytes(data))
    bad = cli("verify", f"s3://{BUCKET}/runs/whole/manifest.json", endpoint=endpoint)
    assert bad.returncode == 1
    assert "sha256" in bad.stderr and remote["outputs"]["shards"][-1]["path"] in bad.stderr


def test_a_killed_s3_run_resumes_in_the_bucket_to_the_same_shards(runs, s3):
    endpoint, filesystem = s3
    server, _, local, remote = runs
    output = f"s3://{BUCKET}/runs/killed"
    args = ["run", str(DEMO_RECIPE), "--no-progress", "--set", f"source.path=s3://{BUCKET}/input/urls.parquet",
            "--set", f"output.path={output}", *[a for pair in SETTINGS for a in ("--set", pair)]]

    killed = cli(*args, endpoint=endpoint, crash_after="prepare:2")
    assert killed.returncode == 86, killed.stderr
    keys = s3_keys(filesystem, "runs/killed")
    assert f"{BUCKET}/runs/killed/_pool/annotations/fetch/00002.done.json" in keys
    assert f"{BUCKET}/runs/killed/manifest.json" not in keys
    assert not any("/parquet/" in key for key in keys)

    hits_before = sum(route.hits for route in server.routes.values())
    killed_again = cli(*args, endpoint=endpoint, crash_after="write:0")
    assert killed_again.returncode == 86, killed_again.stderr
    assert "resuming" in killed_again.stdout
    keys = s3_keys(filesystem, "runs/killed")
    assert f"{BUCKET}/runs/killed/_work/write/00000.done.json" in keys
    assert f"{BUCKET}/runs/killed/manifest.json" not in keys
    refetched = sum(route.hits for route in server.routes.values()) - hits_before
    assert refetched < len(server.routes)  # the prepare shards finished before the kill were not fetched again

    resumed = cli(*args, endpoint=endpoint)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    with filesystem.open_input_stream(f"{BUCKET}/runs/killed/manifest.json") as stream:
        manifest = json.loads(stream.read())
    assert manifest["reconciliation"]["ok"]
    assert shard_digests(manifest) == shard_digests(remote) == shard_digests(local)
    assert manifest["drop_log"]["sha256"] == remote["drop_log"]["sha256"]
    assert not any("/_work/" in key for key in s3_keys(filesystem, "runs/killed"))
    for process in (killed, killed_again, resumed):
        assert SECRET not in process.stdout + process.stderr
    verified = cli("verify", output, endpoint=endpoint)
    assert verified.returncode == 0, verified.stderr


def test_an_s3_output_reselects_in_the_bucket_with_no_request_and_deletes_what_it_no_longer_has(runs, s3):
    """Last in this file: it changes the bucket's output that the tests above read."""
    server, folder, _, _ = runs
    endpoint, filesystem = s3
    before = sum(route.hits for route in server.routes.values())
    fewer = [*SETTINGS, "output.formats=[parquet]", "stages.basic_filter.min_side=100"]
    local = execute(compile_plan(load_recipe(DEMO_RECIPE, [
        f"source.path={folder / 'urls.parquet'}", f"output.path={folder / 'fewer'}", *fewer])),
        Console(file=io.StringIO()), progress=False)
    hits_local = sum(route.hits for route in server.routes.values())
    again = execute(compile_plan(load_recipe(DEMO_RECIPE, [
        f"source.path=s3://{BUCKET}/input/urls.parquet", f"output.path=s3://{BUCKET}/runs/whole",
        f"storage.endpoint_url={endpoint}", *fewer])), Console(file=io.StringIO()), progress=False, judge=False)
    assert sum(route.hits for route in server.routes.values()) == hits_local  # the bucket's pool served it
    assert hits_local > before  # the local output fetched its images: the bucket's run did not need to
    assert again["reconciliation"]["ok"] and shard_digests(again) == shard_digests(local)
    keys = [key for key in s3_keys(filesystem, "runs/whole") if "/_pool/" not in key]
    assert not [key for key in keys if "/webdataset/" in key]  # the format it no longer writes is gone
    assert {key.split("/runs/whole/", 1)[1] for key in keys} == {s["path"] for s in again["outputs"]["shards"]} | {
        "manifest.json", "drops.parquet"}
