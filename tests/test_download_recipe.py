"""pipelines/download.yaml: compiles with every resize mode; one real run on loopback (fetch, checks, WebDataset)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "download.yaml"
PHOTOS = Path(__file__).resolve().parent / "data" / "captioned-images"
MODES = ("keep_ratio", "center_crop", "border", "none")


def write_list(path: Path, urls: list[str], captions: list[str | None]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": pa.array(captions, pa.string())}), path)
    return path


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", MODES)
def test_recipe_compiles_with_each_resize_mode(mode, tmp_path):
    url_list = write_list(tmp_path / "urls.parquet", ["http://example.com/a.jpg"], ["a caption"])
    loaded = load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}",
                                  "stages.fetch.resize.size=200", f"stages.fetch.resize.mode={mode}"])
    plan = compile_plan(loaded)
    assert [stage.name for stage in plan.stages] == ["fetch", "basic_filter", "roles"]  # roles: the recipe's
    assert [group.name for group in plan.groups] == ["prepare"]
    resize = plan.stages[0].params.resize
    assert (resize.mode, resize.size) == (mode, 200)
    assert [sink.name for sink in plan.sinks] == ["webdataset"]


def test_recipe_rejects_an_unknown_resize_mode(tmp_path):
    url_list = write_list(tmp_path / "urls.parquet", ["http://example.com/a.jpg"], ["a caption"])
    with pytest.raises(Exception, match="mode"):
        load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}",
                             "stages.fetch.resize.mode=stretch"])


def test_recipe_runs_on_loopback_and_writes_resized_webdataset(local_ray, tmp_path):
    import webdataset

    captions = {json.loads(line)["file_name"]: json.loads(line)["caption"]
                for line in (PHOTOS / "captions.jsonl").read_text().splitlines()}
    photos = sorted(captions)
    routes = {f"/{name}": Route(body=(PHOTOS / name).read_bytes()) for name in photos}
    routes["/tiny.jpg"] = Route(body=jpeg(20, 20))
    routes["/strip.jpg"] = Route(body=jpeg(1100, 100))
    with LoopbackServer(routes) as server:
        paths = [f"/{name}" for name in photos] + ["/tiny.jpg", "/strip.jpg", "/missing.jpg"]
        url_list = write_list(tmp_path / "urls.parquet", [server.url(p) for p in paths],
                              [captions[name] for name in photos[:-1]] + [None, "tiny", "strip", "gone"])
        loaded = load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}",
                                      "stages.fetch.allow_private_addresses=true",
                                      "stages.fetch.resize.size=128", "stages.fetch.resize.mode=center_crop"])
        manifest = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)

    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(paths)
    assert totals["output_rows"] == len(photos)  # the photo without a caption is kept
    assert manifest["drop_log"]["by_reason"] == {"too_small": 1, "aspect_ratio": 1, "http_404": 1}
    assert manifest["outputs"]["formats"] == ["webdataset"]
    assert not (tmp_path / "out" / "parquet").exists()

    tars = sorted(str(p) for p in (tmp_path / "out" / "webdataset").glob("*.tar"))
    samples = list(webdataset.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == len(photos)
    for sample in samples:
        assert sample["jpg"].size == (128, 128)
        meta = sample["json"]["image_meta"][0]
        name = meta["url"].rsplit("/", 2)[-2] + "/" + meta["url"].rsplit("/", 1)[-1]
        with Image.open(PHOTOS / name) as original:
            assert (meta["original_width"], meta["original_height"]) == original.size
        assert sample.get("txt", "") == (captions[name] if name != photos[-1] else "")


def test_recipe_skips_fingerprints_and_refuses_a_stage_that_reads_them(tmp_path):
    url_list = write_list(tmp_path / "urls.parquet", ["http://example.com/a.jpg"], ["a caption"])
    plan = compile_plan(load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}"]))
    assert plan.stages[0].params.fingerprints is False  # img2dataset's job needs no dedup hashes

    dedup = load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}",
                                 "stages.dedup_exact={}"])
    with pytest.raises(RecipeError, match="fingerprints") as refused:
        compile_plan(dedup)
    assert refused.value.path == "stages.fetch.fingerprints"

    with_hashes = load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={tmp_path / 'out'}",
                                       "stages.dedup_exact={}", "stages.fetch.fingerprints=true"])
    assert [stage.name for stage in compile_plan(with_hashes).stages][-2:] == ["dedup_exact", "roles"]
