"""The pool: images stored once, annotation tables per stage, gates, selection without bytes, keep_pool, clean."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


IMAGES = {f"/{i}.jpg": jpeg((64 + 8 * i, 48 + 4 * i), (40 * i % 255, 90, 200 - 10 * i)) for i in range(6)}
IMAGES["/tiny.jpg"] = jpeg((10, 10), (250, 10, 10))


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool-web")
    with LoopbackServer({path: Route(body=body) for path, body in IMAGES.items()}) as server:
        paths = list(IMAGES)
        pq.write_table(pa.table({"url": [server.url(p) for p in paths],
                                 "caption": [f"a coloured rectangle number {i}" for i in range(len(paths))]}),
                       folder / "urls.parquet")
        yield server, folder / "urls.parquet"


def recipe(folder: Path, url_list: Path, output: Path, gates: list[str] | None = None, **engine) -> Path:
    data = {
        "source": {"type": "url_list", "path": str(url_list), "url_column": "url", "caption_column": "caption"},
        "stages": {"fetch": {"allow_private_addresses": True, "host_rate": None},
                   "basic_filter": {"min_side": 32},
                   "clip_score": {"model": {"model": "curate-tiny"}, "min_score": -1.0}},
        "output": {"path": str(output), "formats": ["parquet", "webdataset"]},
        "engine": {"rows_per_work_shard": 3, **engine},
    }
    if gates is not None:
        data["gates"] = gates
    file = folder / f"{output.name}.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def run(file: Path) -> dict:
    return execute(compile_plan(load_recipe(file)), Console(file=io.StringIO()), progress=False)


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def annotated(output: Path, stage_name: str) -> dict[str, bool]:
    table = pq.read_table(sorted((output / "_pool" / "annotations" / stage_name).glob("[0-9]*.parquet")))
    return dict(zip(table.column("key").to_pylist(), table.column("_annotated").to_pylist()))


def key_of(manifest_output: Path, url_suffix: str) -> str:
    drops = pq.read_table(manifest_output / "drops.parquet").to_pylist()
    return next(row["key"] for row in drops if row["url"].endswith(url_suffix))


def test_a_gate_keeps_a_10_pixel_image_from_the_model(web, tmp_path):
    _, url_list = web
    gated = run(recipe(tmp_path, url_list, tmp_path / "gated", gates=["basic_filter"]))
    open_ = run(recipe(tmp_path, url_list, tmp_path / "open"))
    tiny_gated, tiny_open = key_of(tmp_path / "gated", "/tiny.jpg"), key_of(tmp_path / "open", "/tiny.jpg")

    # the model computed 6 rows behind the gate, 7 without it; the tiny image is the difference
    assert stage(gated, "clip_score")["annotated"] == len(IMAGES) - 1
    assert stage(open_, "clip_score")["annotated"] == len(IMAGES)
    assert annotated(tmp_path / "gated", "clip_score")[tiny_gated] is False
    assert annotated(tmp_path / "open", "clip_score")[tiny_open] is True
    # either way, the selection drops it under basic_filter, the first criterion it fails, and the outputs agree
    for manifest, output in ((gated, tmp_path / "gated"), (open_, tmp_path / "open")):
        assert stage(manifest, "basic_filter")["dropped"] == {"too_small": 1}
        assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["output_rows"] == len(IMAGES) - 1
    assert [s["sha256"] for s in gated["outputs"]["shards"]] == [s["sha256"] for s in open_["outputs"]["shards"]]


def test_the_pool_holds_image_bytes_once_and_outlives_the_run(web, tmp_path):
    _, url_list = web
    output = tmp_path / "kept"
    manifest = run(recipe(tmp_path, url_list, output))
    pool = output / "_pool"
    def holds_bytes(path: Path) -> bool:
        if "images" not in pq.read_schema(path).names:
            return False
        rows = pq.read_table(path, columns=["images"]).column("images").to_pylist()
        return any(image["bytes"] for row in rows if row for image in row)

    with_images = sorted({path.parent.name for path in pool.rglob("*.parquet") if holds_bytes(path)})
    assert with_images == ["fetch"]  # the split holds URLs; basic_filter and clip_score tables hold no bytes
    fetched = sorted((pool / "annotations" / "fetch").glob("[0-9]*.parquet"))
    stored = pq.read_table(fetched, columns=["key", "images"])
    keys, images = stored.column("key").to_pylist(), stored.column("images").to_pylist()
    pool_bytes = {key: row[0]["bytes"] for key, row in zip(keys, images)}
    assert len(pool_bytes) == len(IMAGES) and all(pool_bytes.values())  # every fetched image, once
    written = pq.read_table(output / "parquet", columns=["key", "images"]).to_pylist()
    assert written and all(row["images"][0]["bytes"] == pool_bytes[row["key"]] for row in written)
    assert manifest["pool"]["kept"] is True and manifest["pool"]["images_in"] == "fetch"
    assert manifest["pool"]["bytes"] == sum(p.stat().st_size for p in pool.rglob("*") if p.is_file())
    assert not (output / "_work").exists()


def test_keep_pool_false_deletes_it_and_gives_the_same_shards(web, tmp_path):
    _, url_list = web
    kept = run(recipe(tmp_path, url_list, tmp_path / "kept"))
    gone = run(recipe(tmp_path, url_list, tmp_path / "gone", keep_pool=False))
    assert not (tmp_path / "gone" / "_pool").exists() and gone["pool"]["kept"] is False
    assert [s["sha256"] for s in gone["outputs"]["shards"]] == [s["sha256"] for s in kept["outputs"]["shards"]]


def test_curate_clean_pool_deletes_the_pool_and_the_output_stays_valid(web, tmp_path):
    _, url_list = web
    output = tmp_path / "cleaned"
    run(recipe(tmp_path, url_list, output))
    before = sum(p.stat().st_size for p in (output / "_pool").rglob("*") if p.is_file())

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True,
                              timeout=120)

    cleaned = cli("clean", str(output), "--pool")
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"({before:,} bytes)" in cleaned.stdout and not (output / "_pool").exists()
    assert cli("verify", str(output)).returncode == 0
    assert "nothing to delete" in cli("clean", str(output), "--pool").stdout
    refused = cli("clean", str(tmp_path), "--pool")
    assert refused.returncode == 2 and "not a curate output" in refused.stderr
    assert cli("clean", str(output)).returncode == 2  # nothing named


def test_selection_reads_no_image_bytes(web, tmp_path):
    _, url_list = web
    output = tmp_path / "kept-work"
    run(recipe(tmp_path, url_list, output, keep_work=True))
    files = sorted((output / "_work" / "select").glob("[0-9]*[0-9].parquet"))
    images = pq.read_table(files, columns=["images"]).column("images").to_pylist()
    assert len(images) == len(IMAGES) - 1  # every kept row, each with its one image's placeholder
    assert all(len(row) == 1 and row[0]["bytes"] is None for row in images)
    manifest = json.loads((output / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["source", "fetch", "basic_filter", "clip_score"]


def test_selection_as_ray_tasks_gives_the_same_shards(web, tmp_path, monkeypatch):
    from curate.engine import run as engine_run

    _, url_list = web
    in_driver = run(recipe(tmp_path, url_list, tmp_path / "driver"))
    monkeypatch.setattr(engine_run, "SELECT_IN_DRIVER_UP_TO", 0)  # what a run of many work shards does
    as_tasks = run(recipe(tmp_path, url_list, tmp_path / "tasks"))
    assert [s["sha256"] for s in as_tasks["outputs"]["shards"]] == [s["sha256"] for s in in_driver["outputs"]["shards"]]
    assert as_tasks["drop_log"]["sha256"] == in_driver["drop_log"]["sha256"]
