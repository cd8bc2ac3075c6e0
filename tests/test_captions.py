"""Caption variants: joining external caption files, the captioner stage with the tiny model, one engine run."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.server import Route
from curate.engine.run import compile_plan, execute
from curate.models.tiny_captioner import TinyCaptioner
from curate.ops.caption_join import CaptionJoin, CaptionJoinParams
from curate.ops.caption_table import CaptionTable, build_table, read_pairs
from curate.ops.captioner import Captioner, CaptionerParams
from curate.recipe import load_recipe
from curate.stage import RecipeError, StageContext


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample(key: str, url: str | None = None, sha256: str | None = None, source_id: str | None = None,
           captions: dict[str, str] | None = None, image: bytes | None = b"", kind: str = "pair") -> dict:
    return {
        "key": key, "kind": kind, "images": [{"bytes": image or None, "path": None}],
        "image_meta": [{"url": url, "sha256": sha256}],
        "captions": [{"name": n, "text": t} for n, t in (captions or {"alt": f"alt of {key}"}).items()],
        "roles": [], "source": {"dataset": "d", "id": source_id, "url": None, "license": None},
    }


def variants(table: pa.Table) -> list[dict[str, str]]:
    return [{c["name"]: c["text"] for c in captions} for captions in table.column("captions").to_pylist()]


def join_stage(tmp_path: Path, work: bool = True, **params) -> CaptionJoin:
    stage = CaptionJoin(CaptionJoinParams(**params),
                        StageContext(recipe_dir=str(tmp_path), work_dir=str(tmp_path / "work") if work else ""))
    stage.preflight()
    stage.setup()
    return stage


# --------------------------------------------------------------------------- caption_join


def test_join_by_key_from_parquet(tmp_path):
    pq.write_table(pa.table({
        "key": ["k1", "k2", "k2", "k3", "k4", None],
        "caption": ["dense one", "dense two", "a later duplicate", None, "   ", "no key"],
    }), tmp_path / "captions.parquet")
    stage = join_stage(tmp_path, path="captions.parquet", on="key")
    batch = schema.from_rows([sample("k1"), sample("k2", captions={"alt": "a", "dense": "old"}), sample("k3"),
                              sample("k4"), sample("k5")])
    result = variants(stage.process(batch))
    assert result[0] == {"alt": "alt of k1", "dense": "dense one"}
    assert result[1] == {"alt": "a", "dense": "dense two"}  # replaced; the file's first caption of k2 wins
    assert result[2:] == [{"alt": "alt of k3"}, {"alt": "alt of k4"}, {"alt": "alt of k5"}]  # null/blank/missing
    assert [c["name"] for c in stage.process(batch).column("captions").to_pylist()[0]] == ["alt", "dense"]
    info = stage.model_info()[0]
    assert info["sha256"] == hashlib.sha256((tmp_path / "captions.parquet").read_bytes()).hexdigest()
    assert info["rows_read"] == 3 and info["keys"] == 2  # k1, k2, k2 had text; k2 once


def test_keep_leaves_an_existing_variant_alone(tmp_path):
    pq.write_table(pa.table({"key": ["k1", "k2"], "caption": ["new", "new"]}), tmp_path / "c.parquet")
    stage = join_stage(tmp_path, path="c.parquet", on_existing="keep")
    result = variants(stage.process(schema.from_rows([sample("k1", captions={"alt": "a", "dense": "old"}),
                                                      sample("k2")])))
    assert result == [{"alt": "a", "dense": "old"}, {"alt": "alt of k2", "dense": "new"}]


def test_join_by_url_from_gzipped_jsonl_with_bad_lines(tmp_path):
    lines = [json.dumps({"URL": "http://a.example/1.jpg", "top_caption": "first image", "other": 1}),
             "not json at all", "[1, 2]", "",
             json.dumps({"URL": "http://a.example/2.jpg", "top_caption": "second image"}),
             json.dumps({"URL": "http://a.example/3.jpg"})]
    with gzip.open(tmp_path / "coco.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    stage = join_stage(tmp_path, path="coco.jsonl.gz", on="url", column="URL", text_column="top_caption",
                       name="coco")
    batch = schema.from_rows([sample("a", url="http://a.example/2.jpg"), sample("b", url="http://a.example/3.jpg"),
                              sample("c", url=None), sample("d", url="http://a.example/1.jpg")])
    assert [v.get("coco") for v in variants(stage.process(batch))] == ["second image", None, None, "first image"]
    assert stage.model_info()[0]["skipped_lines"] == 2


def test_join_by_image_sha256_and_by_source_id(tmp_path):
    digest = hashlib.sha256(b"image zero").hexdigest()
    pq.write_table(pa.table({"sha256": [digest.upper()], "caption": ["by hash"]}), tmp_path / "h.parquet")
    (tmp_path / "ids.jsonl").write_text(json.dumps({"uid": 123, "text": "by id"}) + "\n")
    by_hash = join_stage(tmp_path, path="h.parquet", on="sha256")
    batch = schema.from_rows([sample("a", sha256=digest), sample("b", sha256=None), sample("c", source_id="123")])
    assert [v.get("dense") for v in variants(by_hash.process(batch))] == ["by hash", None, None]
    by_id = join_stage(tmp_path, path="ids.jsonl", on="id", column="uid", text_column="text", work=False)
    assert [v.get("dense") for v in variants(by_id.process(batch))] == [None, None, "by id"]


def test_the_table_is_built_once_and_shared_through_the_work_area(tmp_path):
    pq.write_table(pa.table({"key": ["k1"], "caption": ["c"]}), tmp_path / "c.parquet")
    join_stage(tmp_path, path="c.parquet")
    built = list((tmp_path / "work" / "caption_join").glob("*.arrow"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = join_stage(tmp_path, path="c.parquet")
    assert list((tmp_path / "work" / "caption_join").glob("*.arrow")) == built and built[0].stat().st_mtime_ns == stamp
    assert variants(second.process(schema.from_rows([sample("k1")])))[0]["dense"] == "c"


def test_lookups_agree_with_a_dictionary_for_unicode_keys(tmp_path):
    rng = random.Random(5)
    alphabet = "abcXYZ019_/.:éüß日本語😀 -"
    keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(4000)]
    pairs = pa.table({"key": pa.array(keys, pa.large_string()),
                      "text": pa.array([f"caption {i}" for i in range(len(keys))], pa.large_string())})
    table = CaptionTable(build_table(pairs))
    expected: dict[str, str] = {}
    for index, key in enumerate(keys):
        expected.setdefault(key, f"caption {index}")
    assert len(table) == len(expected)
    probes = list(expected) + ["".join(rng.choice(alphabet) for _ in range(13)) for _ in range(500)] + ["", "zzz"]
    assert all(table.get(probe) == expected.get(probe) for probe in probes)


@pytest.mark.parametrize("params, path, message", [
    ({"path": "missing.parquet"}, "stages.caption_join.path", "no such file"),
    ({"path": "c.parquet", "on": "url"}, "stages.caption_join.column", "has no url"),
    ({"path": "c.parquet", "text_column": "top_caption"}, "stages.caption_join.column", "has no top_caption"),
    ({"path": "c.jsonl", "column": "id"}, "stages.caption_join.column", "has no id"),
    ({"path": "broken.jsonl"}, "stages.caption_join.column", "line 1 is not a JSON object"),
    ({"path": "c.txt"}, "stages.caption_join.path", "cannot tell the format"),
    ({"path": "empty"}, "stages.caption_join.path", "no jsonl files"),
])
def test_join_preflight_errors(tmp_path, params, path, message):
    pq.write_table(pa.table({"key": ["k"], "caption": ["c"]}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text(json.dumps({"key": "k", "caption": "c"}) + "\n")
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    (tmp_path / "c.txt").write_text("k\tc\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError) as caught:
        CaptionJoin(CaptionJoinParams(**params), StageContext(recipe_dir=str(tmp_path))).preflight()
    assert caught.value.path == path and message in caught.value.message


def test_read_pairs_reads_a_folder_of_parquet_files(tmp_path):
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.table({"key": ["b"], "caption": ["B"]}), tmp_path / "parts" / "1.parquet")
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["A", "B2"]}), tmp_path / "parts" / "0.parquet")
    stage = join_stage(tmp_path, path="parts")
    assert [v.get("dense") for v in variants(stage.process(schema.from_rows([sample("a"), sample("b")])))] == [
        "A", "B2"]  # files in name order: 0.parquet's b comes first
    pairs, skipped = read_pairs(sorted((tmp_path / "parts").glob("*.parquet")), "parquet", "key", "caption")
    assert pairs.num_rows == 3 and skipped == 0


# --------------------------------------------------------------------------- captioner


def test_the_tiny_captioner_is_deterministic_in_its_seed():
    images = [Image.new("RGB", (60, 40), colour) for colour in ((220, 40, 40), (40, 80, 220), (250, 250, 250))]
    first, again, other = TinyCaptioner(0), TinyCaptioner(0), TinyCaptioner(1)
    assert first.sha256 == again.sha256 != other.sha256
    captions = first.generate(images)
    assert captions == again.generate(images) and len(captions) == 3
    assert all(3 <= len(c.split()) <= 12 for c in captions)
    assert first.generate(images[1:2]) == captions[1:2]  # a caption does not depend on its batch


def test_captioner_stage_writes_a_variant_and_drops_undecodable_images():
    stage = Captioner(CaptionerParams(model={"type": "tiny", "seed": 0}, name="generated", batch_size=2))
    stage.preflight()
    good = [jpeg((220, 40, 40)), jpeg((40, 160, 70)), jpeg((40, 80, 220))]
    batch = schema.from_rows([
        sample("a", image=good[0]), sample("b", image=good[1]), sample("c", image=b"not an image"),
        sample("d", image=None), sample("e", image=good[2], kind="interleaved"),
        sample("f", image=good[2], captions={"alt": "x", "generated": "old"}),
    ])
    result = stage.process(batch)
    expected = TinyCaptioner(0).generate([Image.open(io.BytesIO(b)) for b in (good[0], good[1], good[2])])
    texts = [v.get("generated") for v in variants(result)]
    assert texts == [expected[0], expected[1], None, None, None, expected[2]]
    assert result.column("drop_reason").to_pylist() == [None, None, "corrupt", None, None, None]
    keep = Captioner(CaptionerParams(model={"type": "tiny"}, on_existing="keep"))
    assert variants(keep.process(batch))[5]["generated"] == "old"
    info = stage.model_info()[0]
    assert info["role"] == "captioner" and info["sha256"] == TinyCaptioner(0).sha256


def test_a_transformers_captioner_without_transformers_is_refused_at_plan_time(tmp_path):
    stage = Captioner(CaptionerParams(model={"type": "transformers", "path": "model", "sha256": "0" * 64}),
                      StageContext(recipe_dir=str(tmp_path)))
    with pytest.raises(RecipeError) as caught:
        stage.preflight()
    assert caught.value.path == "stages.captioner.model" and "transformers" in caught.value.message


# --------------------------------------------------------------------------- engine run


@pytest.fixture(scope="module")
def caption_run(local_ray, _loopback_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions-run")
    colours = [(220, 40, 40), (40, 160, 70), (40, 80, 220), (245, 215, 40), (135, 55, 175), (20, 20, 20)]
    bodies = {f"/img{i}.jpg": jpeg(colour, (80 + 8 * i, 64)) for i, colour in enumerate(colours)}
    _loopback_server.routes.clear()
    _loopback_server.routes.update({path: Route(body=body) for path, body in bodies.items()})
    urls = [_loopback_server.url(path) for path in bodies]
    pq.write_table(pa.table({"url": urls, "caption": [f"a picture number {i}" for i in range(len(urls))]}),
                   folder / "urls.parquet")
    joined = {hashlib.sha256(body).hexdigest(): f"a dense caption of image {path}"
              for path, body in list(bodies.items())[::2]}
    pq.write_table(pa.table({"sha256": list(joined), "caption": list(joined.values())}), folder / "dense.parquet")
    recipe = {
        "name": "captions-run",
        "source": {"type": "url_list", "path": "urls.parquet", "url_column": "url", "caption_column": "caption"},
        "stages": {
            "fetch": {"allow_private_addresses": True, "host_rate": None, "retries": 0},
            "caption_join": {"path": "dense.parquet", "on": "sha256", "name": "dense"},
            "captioner": {"model": {"type": "tiny", "seed": 3}, "name": "generated", "batch_size": 4},
        },
        "output": {"path": str(folder / "out"), "formats": ["parquet", "webdataset"]},
        "engine": {"rows_per_work_shard": 4},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    try:
        manifest = execute(compile_plan(load_recipe(folder / "recipe.yaml")), Console(file=io.StringIO()),
                           progress=False)
    finally:
        _loopback_server.routes.clear()
    return folder / "out", manifest, joined, folder


def test_engine_run_joins_and_generates_caption_variants(caption_run):
    output, manifest, joined, folder = caption_run
    assert manifest["reconciliation"]["ok"] and manifest["outputs"]["rows"] == 6
    rows = pq.read_table(output / "parquet").to_pylist()
    model = TinyCaptioner(seed=3)
    for row in rows:
        captions = {c["name"]: c["text"] for c in row["captions"]}
        assert captions.get("dense") == joined.get(row["image_meta"][0]["sha256"])
        image = Image.open(io.BytesIO(row["images"][0]["bytes"]))
        assert captions["generated"] == model.generate([image])[0]
        assert [c["name"] for c in row["captions"]][0] == "alt"
    assert manifest["captions"] == {"alt": 6, "dense": 3, "generated": 6}
    models = {m["stage"]: m for m in manifest["models"]}
    assert models["captioner"]["sha256"] == model.sha256
    assert models["caption_join"]["sha256"] == hashlib.sha256((folder / "dense.parquet").read_bytes()).hexdigest()
    funnel = {s["name"]: s for s in manifest["stages"]}
    assert funnel["caption_join"]["phase"] == "prepare" and funnel["captioner"]["phase"] == "model"
