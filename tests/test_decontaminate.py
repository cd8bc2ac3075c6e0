"""Decontamination: samples copying evaluation images (real COCO photos) are dropped, others kept."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import schema
from curate.dedup.decontaminate import Decontaminate, DecontaminateParams, normalise_caption
from curate.dedup.semantic import TINY_CLIP_THRESHOLD
from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import process_image
from curate.models.clip import TINY_CLIP, load_clip
from curate.ops.clip_stage import model_id
from curate.stage import RecipeError, StageContext

PHOTOS = sorted((Path(__file__).parent / "data" / "dedup").glob("*.jpg"))
EVAL_PHOTOS, OTHER_PHOTOS = PHOTOS[:5], PHOTOS[5:]


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def copies(data: bytes) -> dict[str, bytes]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    return {"same": data, "q60": jpeg(image, 60), "small": jpeg(small, 85)}


@pytest.fixture(scope="module")
def clip():
    model = load_clip(TINY_CLIP, device="cpu")
    return model, model_id(TINY_CLIP, model.describe())


def sample(key: str, data: bytes, clip, caption: str = "a photo") -> dict:
    """A row as fetch + clip_score leave it: processed image, hashes, the tiny CLIP's image embedding."""
    model, name = clip
    processed = process_image(data, ResizeParams(size=256), EncodeParams(format="jpg"), 10**8)
    stored = Image.open(io.BytesIO(processed.data)).convert("RGB")
    embedding = model.encode_images(model.preprocess_images([stored]))[0].astype(np.float16)
    return {"key": key, "kind": "pair",
            "image_meta": [{"width": processed.width, "height": processed.height, "sha256": processed.sha256,
                            "pixel_sha256": processed.pixel_sha256, "phash": processed.phash}],
            "captions": [{"name": "alt", "text": caption}],
            "embeddings": {"model": name, "image": embedding.tolist(), "text": None}}


@pytest.fixture(scope="module")
def corpus(clip):
    """Three copies of each evaluation photo and one untouched sample of every other photo."""
    rows, contaminated = [], set()
    for p, path in enumerate(EVAL_PHOTOS):
        for variant, data in copies(path.read_bytes()).items():
            rows.append(sample(f"eval{p}-{variant}", data, clip))
            contaminated.add(f"eval{p}-{variant}")
    for p, path in enumerate(OTHER_PHOTOS):
        rows.append(sample(f"other{p}", path.read_bytes(), clip))
    return schema.from_rows(rows), contaminated


@pytest.fixture
def eval_folder(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    for path in EVAL_PHOTOS:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def stage(folder: Path, **params) -> Decontaminate:
    spec = {"sets": [{"name": "coco-val", "path": str(folder)}], "model": TINY_CLIP.model_dump(),
            "threshold": TINY_CLIP_THRESHOLD, **params}
    return Decontaminate(DecontaminateParams.model_validate(spec), StageContext())


def dropped(decision: pa.Table) -> dict[str, str]:
    return {r["key"]: r["detail"] for r in decision.to_pylist() if r["reason"] == "contaminated"}


def test_all_copies_of_evaluation_photos_are_dropped_and_nothing_else(corpus, eval_folder):
    table, contaminated = corpus
    decision, summary = stage(eval_folder).decide(table)
    gone = dropped(decision)
    assert set(gone) == contaminated
    assert gone["eval0-same"] == "exact match of coco-val/000000003124.jpg (same bytes)"
    assert all(detail.startswith(("perceptual match of coco-val/", "semantic match of coco-val/"))
               for key, detail in gone.items() if not key.endswith("-same"))
    for key, detail in gone.items():  # each copy names the photo it copies
        assert EVAL_PHOTOS[int(key[4])].name in detail
    assert summary["sets"]["coco-val"] == {"items": 6, "matched_samples": 15, "matched_items": 5}
    assert summary["unreadable_eval_images"] == ["coco-val/broken.jpg"]
    assert summary["matched"]["exact"] == 5 and summary["removed"] == 15


def test_semantic_matching_alone_finds_every_copy_at_the_default_threshold(corpus, eval_folder):
    """On these photos the tiny CLIP puts copies at cosine >= 0.99 and distinct photos below 0.9."""
    table, contaminated = corpus
    decision, summary = stage(eval_folder, exact=False, perceptual=False, threshold=0.95).decide(table)
    gone = dropped(decision)
    assert set(gone) == contaminated
    assert summary["matched"]["semantic"] == len(gone) and summary["model"].startswith("curate-tiny/")


def test_streamed_files_give_the_same_decision(corpus, eval_folder, tmp_path):
    table, _ = corpus
    files = []
    for n, start in enumerate(range(0, table.num_rows, 7)):
        files.append(str(tmp_path / f"part-{n}.parquet"))
        pq.write_table(table.slice(start, 7), files[-1])
    whole, _ = stage(eval_folder).decide(table)
    streamed, summary, rows = stage(eval_folder).decide_files(files, str(tmp_path))
    assert rows == table.num_rows and dropped(streamed) == dropped(whole)
    assert summary["removed"] == len(dropped(whole))


def test_parquet_evaluation_set_with_captions(corpus, clip, tmp_path):
    table, _ = corpus
    caption = "A man riding a wave on top of a surfboard."
    other = Image.new("RGB", (64, 64), (200, 30, 30))
    eval_rows = [{"image": {"bytes": jpeg(other, 90), "path": None}, "id": "c1", "captions": [caption, "short"]}]
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(eval_rows), path)
    same_caption = sample("same-caption", OTHER_PHOTOS[0].read_bytes(), clip, caption="a man riding a WAVE on top "
                                                                                   "of a surfboard")
    short = sample("short", OTHER_PHOTOS[1].read_bytes(), clip, caption="Short")
    rows = pa.concat_tables([table, schema.from_rows([same_caption, short])])
    params = {"sets": [{"name": "capset", "path": str(path), "id_column": "id", "caption_column": "captions"}],
              "model": TINY_CLIP.model_dump(), "threshold": TINY_CLIP_THRESHOLD, "captions": True}
    decision, summary = Decontaminate(DecontaminateParams.model_validate(params)).decide(rows)
    assert dropped(decision) == {"same-caption": "caption match of capset/c1 (same caption)"}
    assert normalise_caption(caption) == "a man riding a wave on top of a surfboard"


def test_embeddings_of_another_model_are_refused(corpus, eval_folder):
    table, _ = corpus
    column = table.column("embeddings").to_pylist()
    renamed = [{**e, "model": "ViT-B-32/openai"} for e in column]
    table = table.set_column(table.schema.get_field_index("embeddings"), schema.SAMPLE_SCHEMA.field("embeddings"),
                             pa.array(renamed, schema.EMBEDDINGS))
    with pytest.raises(ValueError, match="clip_score model"):
        stage(eval_folder, exact=False, perceptual=False).decide(table)


def test_missing_evaluation_set_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        stage(tmp_path / "nowhere").preflight()
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(RecipeError, match="neither a folder nor"):
        stage(tmp_path / "list.txt").preflight()


def test_engine_run_drops_copies_of_evaluation_images(tmp_path, local_ray):
    """fetch -> clip_score -> decontaminate on the demo web, the evaluation set made of some served images."""
    from rich.console import Console

    from curate.demo.server import LoopbackServer
    from curate.demo.web import build_synthetic_web, write_url_list
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe

    web = build_synthetic_web(n_images=40, seed=5)
    served = [r for r in web.rows if r["expect"] == "ok"][:4]
    folder = tmp_path / "eval"
    folder.mkdir()
    for n, r in enumerate(served):
        (folder / f"item{n}.img").with_suffix(".png").write_bytes(web.routes[r["path"]].body)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, backoff_base: 0.01}\n"
        "  clip_score: {}\n"
        f"  decontaminate: {{sets: [{{name: heldout, path: eval}}], threshold: {TINY_CLIP_THRESHOLD}}}\n"
        "output: {path: out, formats: [parquet]}\nengine: {rows_per_work_shard: 20}\n")
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, tmp_path / "urls.parquet")
        plan = compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}"]))
        manifest = execute(plan, Console(file=io.StringIO()), progress=False, overwrite=True)
        base = server.base_url.rstrip("/")
    assert manifest["reconciliation"]["ok"]
    drops = [d for d in pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist() if d["stage"] == "decontaminate"]
    assert {base + r["path"] for r in served} <= {d["url"] for d in drops}
    summary = manifest["decisions"]["decontaminate"]
    assert summary["sets"]["heldout"]["matched_items"] == 4 and summary["removed"] == len(drops)
    kept = pq.read_table(tmp_path / "out" / "parquet", columns=["image_meta"]).to_pylist()
    assert not {base + r["path"] for r in served} & {r["image_meta"][0]["url"] for r in kept}
    assert json.dumps(manifest)  # the summary is plain JSON
