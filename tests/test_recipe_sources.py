"""Every bundled recipe against every kind of input its docs say it takes: the plan compiles before any work
(as `--dry-run` does, reading the input's first rows), and the input's rows come out as samples of the right
kind. Settings that cannot work with an input are refused at that point, not at write time."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.engine.run import compile_plan
from curate.recipe import load_recipe
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
PAIR_RECIPES = ["demo", "download", "laion", "datacomp", "pairs_datacomp_basic", "pairs_generation_hq"]
ROWS = [{"url": f"http://images.example/{i}.jpg", "caption": f"a photo of thing number {i}"} for i in range(3)]


def url_list(folder: Path, fmt: str) -> Path:
    """The three ROWS as a URL list in `fmt` (parquet, csv, tsv, jsonl, with .gz for the text ones)."""
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        path = folder / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
        return path
    if base == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in ROWS)
    else:
        sep = "," if base == "csv" else "\t"
        text = f"url{sep}caption\n" + "".join(f"{r['url']}{sep}{r['caption']}\n" for r in ROWS)
    path = folder / f"urls.{fmt}"
    path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    return path


def image_folder(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir()
    for i, photo in enumerate(sorted((DATA / "dedup").glob("*.jpg"))[:2]):
        shutil.copy(photo, images / f"{i}.jpg")
        (images / f"{i}.txt").write_text(f"a photo number {i}")
    return images


def edit_parquet(folder: Path) -> Path:
    def png(colour: tuple[int, int, int]) -> dict:
        out = io.BytesIO()
        Image.new("RGB", (80, 80), colour).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"original_image": png((10, 20, 30)), "edited_image": png((200, 20, 30)), "edit_prompt": "make it red"}]
    path = folder / "edits.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("original_image", image), ("edited_image", image),
                                                               ("edit_prompt", pa.string())])), path)
    return path


def first_rows(recipe: str, source: list[str], tmp_path: Path) -> tuple[list[dict], list[str]]:
    loaded = load_recipe(recipe, [*source, f"output.path={tmp_path / 'out'}"])
    plan = compile_plan(loaded, require_weights=False, peek_rows=5)
    batch = next(iter(plan.source.iter_batches(5)))
    return batch.to_pylist(), plan.warnings


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "csv.gz", "tsv.gz", "jsonl.gz"])
@pytest.mark.parametrize("recipe", PAIR_RECIPES)
def test_pair_recipes_take_url_lists_in_every_documented_format(recipe, fmt, tmp_path):
    rows, warnings = first_rows(recipe, [f"source.path={url_list(tmp_path, fmt)}"], tmp_path)
    assert [r["image_meta"][0]["url"] for r in rows] == [r["url"] for r in ROWS]
    assert [r["captions"][0]["text"] for r in rows] == [r["caption"] for r in ROWS]
    assert all(r["kind"] == "pair" for r in rows)
    assert "the input has no rows" not in warnings


@pytest.mark.parametrize("recipe", PAIR_RECIPES)
@pytest.mark.parametrize("source", ["image_folder", "image_shards"])
def test_pair_recipes_on_stored_images_compile_or_say_what_is_missing(recipe, source, tmp_path):
    path = image_folder(tmp_path) if source == "image_folder" else DATA / "img2dataset" / "webdataset"
    overrides = [f"source={{type: {source}, path: {path}}}"]
    loaded = load_recipe(recipe, [*overrides, f"output.path={tmp_path / 'out'}"])
    reads_fingerprints = any(name.startswith("dedup") for name in loaded.stage_params)
    if reads_fingerprints:  # dedup needs pixel hashes that only a decode stage computes for stored images
        with pytest.raises(RecipeError, match="add a `decode` stage"):
            compile_plan(loaded, require_weights=False, peek_rows=5)
        return
    rows, _ = first_rows(recipe, overrides, tmp_path)
    assert rows and all(r["kind"] == "pair" and r["images"][0]["bytes"] for r in rows)


@pytest.mark.parametrize(("recipe", "path", "kind"), [
    ("mmc4", DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl", "interleaved"),
    ("mmc4", "gzip", "interleaved"),
    ("mmc4", DATA / "interleaved-docs" / "mmc4_shard_151.as_committed.truncated.zip", "interleaved"),
    ("obelics", DATA / "interleaved-docs" / "obelics_layout_from_mmc4.first4.parquet", "interleaved"),
    ("warc", DATA / "web-pages" / "warc" / "resiliparse_cc-main-2020-34_sample.warc.gz", "interleaved"),
    ("warc", DATA / "web-pages" / "warc" / "warcio_example.arc.gz", "interleaved"),
    ("edit", DATA / "edit-triplets" / "ip2p", "edit"),
    ("edit", "parquet", "edit"),
])
def test_document_and_edit_recipes_take_their_documented_inputs(recipe, path, kind, tmp_path):
    if path == "gzip":
        path = tmp_path / "docs.jsonl.gz"
        path.write_bytes(gzip.compress((DATA / "interleaved-docs" /
                                        "mmc4_core_ff_shard_151_v3.first12.jsonl").read_bytes()))
    elif path == "parquet":
        path = edit_parquet(tmp_path)
    rows, warnings = first_rows(recipe, [f"source.path={path}"], tmp_path)
    assert rows and all(r["kind"] == kind for r in rows)
    assert "the input has no rows" not in warnings
