"""Safety stages: NSFW (NudeNet), watermark head, faces, blocklists; presets; one engine run on the loopback web."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.server import LoopbackServer, Route
from curate.demo.watermark import WATERMARK_KINDS, watermark_examples
from curate.demo.web import Scene, build_synthetic_web, draw_scene, encode, planted_counts, write_url_list
from curate.engine.run import compile_plan, execute
from curate.fetch.config import FetchParams
from curate.fetch.image import phash, process_image
from curate.models.clip import TINY_CLIP, load_clip
from curate.models.watermark import TINY_WATERMARK, WatermarkSpec, check_watermark_available, load_watermark
from curate.models.weights import ModelUnavailable
from curate.recipe import load_recipe
from curate.safety.blocklist import Blocklist, BlocklistHashes, BlocklistHashesParams, BlocklistParams
from curate.safety.captions import BUNDLED_WORDS, read_terms
from curate.safety.faces import FaceDetector, FacesParams, FacesStage, cascade_file
from curate.safety.lists import normalise_url
from curate.safety.nsfw import LABELS, NsfwParams, NsfwStage
from curate.safety.watermark import WatermarkParams, WatermarkStage
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "safety"
FACE_PHOTO = DATA / "000000497558.jpg"  # one frontal face, checked by eye at about x 165-235, y 212-282
TENNIS_PHOTO = DATA / "000000419173.jpg"  # one frontal face; NudeNet finds FACE_FEMALE
JETS_PHOTO = DATA / "000000040870.jpg"  # no person
PHOTOS = (FACE_PHOTO, TENNIS_PHOTO, JETS_PHOTO)


def table_of(images: list[bytes | None], captions: list[str] | None = None, fmt: str = "jpg") -> pa.Table:
    """A batch of pair samples with the given image bytes and captions."""
    captions = captions or ["a photo"] * len(images)
    rows = []
    for index, (data, caption) in enumerate(zip(images, captions)):
        url = f"https://images.example.org/{index}.{fmt}"
        rows.append({"key": schema.sample_key("test", index, url), "kind": "pair",
                     "images": [{"bytes": data, "path": None}],
                     "image_meta": [{"url": url, "format": fmt, "num_bytes": len(data) if data else None}],
                     "segments": [{"image": 0, "text": None}, {"image": None, "text": caption}],
                     "captions": [{"name": "alt", "text": caption}],
                     "source": {"dataset": "test", "id": str(index), "url": url, "license": None}})
    return schema.from_rows(rows)


def with_column(batch: pa.Table, name: str, values: list) -> pa.Table:
    """`batch` with column `name` replaced by `values` (typed as in the sample schema)."""
    return batch.set_column(batch.schema.get_field_index(name), name,
                            pa.array(values, schema.SAMPLE_SCHEMA.field(name).type))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def iou(a: list[int], b: list[int]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(a[0], b[0])) * max(0, min(ay1, by1) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def grown(box: list[int], margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The region faces blurs for `box` (as FacesStage: grown by margin of its size per side, clipped)."""
    x, y, w, h = box
    gx, gy = round(w * margin), round(h * margin)
    return max(0, x - gx), max(0, y - gy), min(size[0], x + w + gx), min(size[1], y + h + gy)


# --------------------------------------------------------------------------- nsfw


@pytest.fixture(scope="module")
def nsfw_stage():
    stage = NsfwStage(NsfwParams(max_score=0.5))
    stage.preflight()
    stage.setup()
    return stage


def test_nudenet_scores_real_photos_offline_as_nudenet_itself_does(nsfw_stage):
    from nudenet import NudeDetector

    reference = NudeDetector()  # the package's own pre- and post-processing, reading the files itself
    class_scores = nsfw_stage.detector.class_scores([decoded(p.read_bytes()).astype(np.uint8) for p in PHOTOS])
    assert class_scores.shape == (len(PHOTOS), len(LABELS))
    assert np.all((class_scores >= 0) & (class_scores <= 1))
    found_any = False
    for path, scores in zip(PHOTOS, class_scores):
        detections = reference.detect(str(path))
        for detection in detections:  # every box NudeNet reports is at most our per-class maximum
            assert detection["score"] <= scores[LABELS.index(detection["class"])] + 1e-5
        if detections:  # and its best box is our best class score (non-maximum suppression keeps the top box)
            found_any = True
            assert max(d["score"] for d in detections) == pytest.approx(float(scores.max()), abs=1e-5)
    assert found_any
    assert class_scores[1, LABELS.index("FACE_FEMALE")] > 0.5  # the tennis player's face


def test_nsfw_stage_scores_safe_photos_low_and_keeps_them(nsfw_stage):
    out = nsfw_stage.process(table_of([p.read_bytes() for p in PHOTOS]))
    scores = [s["nsfw"] for s in out.column("scores").to_pylist()]
    assert all(0.0 <= s < 0.1 for s in scores), scores
    assert out.column("drop_reason").to_pylist() == [None, None, None]


def test_nsfw_threshold_drops_by_the_chosen_classes():
    stage = NsfwStage(NsfwParams(classes=["FACE_FEMALE"], max_score=0.5, caption_screen=False))
    out = stage.process(table_of([p.read_bytes() for p in PHOTOS]))
    reasons = out.column("drop_reason").to_pylist()
    assert reasons == [None, "nsfw", None]
    assert "FACE_FEMALE" in out.column("drop_detail").to_pylist()[1]


def test_nsfw_sample_score_is_the_max_over_its_images(nsfw_stage):
    stage = NsfwStage(NsfwParams(classes=["FACE_FEMALE"], caption_screen=False))
    singles = stage.process(table_of([p.read_bytes() for p in PHOTOS]))
    expected = max(s["nsfw"] for s in singles.column("scores").to_pylist())
    pair = table_of([JETS_PHOTO.read_bytes()])
    images = [[{"bytes": p.read_bytes(), "path": None} for p in PHOTOS]]
    pair = with_column(pair, "images", images)
    assert stage.process(pair).column("scores").to_pylist()[0]["nsfw"] == pytest.approx(expected)


def test_caption_screen_matches_whole_listed_terms_only(nsfw_stage, tmp_path):
    captions = ["Free XXX-rated clips here", "an Essex tape measure on a bench", "grenade, nudenet, pornographer",
                "Hentai wallpaper", "a red sports car"]
    out = nsfw_stage.process(table_of([JETS_PHOTO.read_bytes()] * len(captions), captions))
    assert out.column("drop_reason").to_pylist() == ["nsfw_caption", None, None, "nsfw_caption", None]
    details = out.column("drop_detail").to_pylist()
    assert "bundled list" in details[0] and "xxx" not in details[0].lower()  # names the list, never the text
    terms = read_terms(BUNDLED_WORDS)
    assert details[0] == f"a text matches entry {terms.index('xxx') + 1} of the bundled list"
    assert out.column("scores").to_pylist()[0]["nsfw"] is None  # screened rows skip the detector
    extra = tmp_path / "more-terms.txt"
    extra.write_text("# house rules\ngrenade\n")
    custom = NsfwStage(NsfwParams(bundled_words=False, caption_words=["sports car"], caption_word_files=[str(extra)]))
    out = custom.process(table_of([JETS_PHOTO.read_bytes()] * len(captions), captions))
    assert out.column("drop_reason").to_pylist() == [None, None, "nsfw_caption", None, "nsfw_caption"]
    assert out.column("drop_detail").to_pylist()[2] == "a text matches entry 1 of the more-terms.txt"


def test_nsfw_drops_undecodable_images_as_corrupt(nsfw_stage):
    data = JETS_PHOTO.read_bytes()
    out = nsfw_stage.process(table_of([data[: len(data) // 3], b"not an image", None, data]))
    assert out.column("drop_reason").to_pylist() == ["corrupt", "corrupt", "corrupt", None]


def test_nsfw_refuses_unknown_classes_and_a_wrong_model_pin():
    with pytest.raises(ValueError, match="unknown NudeNet classes"):
        NsfwParams(classes=["NOT_A_CLASS"])
    with pytest.raises(ModelUnavailable, match="sha256"):
        NsfwStage(NsfwParams(sha256="0" * 64)).preflight()


# --------------------------------------------------------------------------- watermark


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_CLIP, device="cpu")


def test_tiny_watermark_head_separates_held_out_synthetic_images(tiny_clip):
    images, kinds = watermark_examples(300, seed=7)  # training used seed 0, calibration seed 1
    head = load_watermark(TINY_WATERMARK, tiny_clip.embed_dim)
    scores = head(tiny_clip.encode_images(tiny_clip.preprocess_images(images)))
    truth = np.array([k is not None for k in kinds])
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.mean((scores > 0.5) == truth) >= 0.90
    for kind in WATERMARK_KINDS:  # both overlay kinds are found, not just one
        assert np.mean(scores[np.array(kinds) == kind] > 0.5) >= 0.85


def test_watermark_stage_reuses_stored_embeddings_without_loading_clip(tiny_clip):
    images, kinds = watermark_examples(24, seed=11)
    table = table_of([png_bytes(image) for image in images], fmt="png")
    computing = WatermarkStage(WatermarkParams(max_score=0.5))
    computed = computing.process(table)
    assert hasattr(computing, "model")  # no embeddings stored: CLIP was loaded to embed the images
    embeddings = tiny_clip.encode_images(tiny_clip.preprocess_images(images)).astype(np.float16)
    name = f"curate-tiny/{TINY_CLIP.sha256[:12]}"
    stored = with_column(table, "embeddings", [{"model": name, "image": e.tolist(), "text": e.tolist()}
                                               for e in embeddings])
    reusing = WatermarkStage(WatermarkParams(max_score=0.5))
    reused = reusing.process(stored)
    assert not hasattr(reusing, "model")
    first = [s["watermark"] for s in computed.column("scores").to_pylist()]
    second = [s["watermark"] for s in reused.column("scores").to_pylist()]
    assert np.allclose(first, second, atol=0.02)
    flagged = [reason == "watermark" for reason in reused.column("drop_reason").to_pylist()]
    assert np.mean(np.array(flagged) == np.array([k is not None for k in kinds])) >= 0.9


def test_watermark_heads_load_from_a_file_with_a_sha256_pin(tmp_path, tiny_clip):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "linear.safetensors"
    save_file({"weight": torch.ones((1, tiny_clip.embed_dim)), "bias": torch.zeros(1)}, str(path))
    pin = hashlib.sha256(path.read_bytes()).hexdigest()
    head = load_watermark(WatermarkSpec(head="linear", path=str(path), sha256=pin), tiny_clip.embed_dim)
    vector = np.full((1, tiny_clip.embed_dim), 1 / np.sqrt(tiny_clip.embed_dim), dtype=np.float32)
    assert head(vector)[0] == pytest.approx(1 / (1 + np.exp(-np.sqrt(tiny_clip.embed_dim))), rel=1e-5)
    with pytest.raises(ModelUnavailable, match="sha256"):
        check_watermark_available(WatermarkSpec(head="linear", path=str(path), sha256="f" * 64))
    with pytest.raises(ModelUnavailable, match="expects 64-d"):
        load_watermark(WatermarkSpec(head="linear", path=str(path)), 512)
    with pytest.raises(ModelUnavailable, match="does not exist") as missing:
        WatermarkStage(WatermarkParams(head=WatermarkSpec(head="mlp", path=str(tmp_path / "missing.pt")))).preflight()
    assert missing.value.path == "stages.watermark.head"


# --------------------------------------------------------------------------- faces


def test_haar_cascade_finds_the_face_in_a_real_photo():
    detector = FaceDetector(cascade_file("haarcascade_frontalface_default.xml"), FacesParams())
    face = detector.detect(Image.open(FACE_PHOTO).convert("RGB"))
    assert len(face) == 1 and iou(face[0], [165, 212, 70, 70]) > 0.5
    assert detector.detect(Image.open(JETS_PHOTO).convert("RGB")) == []


def test_faces_stage_blurs_inside_the_boxes_only_and_updates_num_bytes():
    lossless = png_bytes(Image.open(FACE_PHOTO).convert("RGB"))
    stage = FacesStage(FacesParams(blur=True, margin=0.1))
    out = stage.process(table_of([lossless, png_bytes(Image.open(JETS_PHOTO).convert("RGB"))], fmt="png"))
    metas = [json.loads(m) for m in out.column("meta").to_pylist()]
    assert metas[1] == {"faces": [[]], "faces_blurred": 0}
    (box,) = metas[0]["faces"][0]
    assert metas[0]["faces_blurred"] == 1
    blurred = out.column("images").to_pylist()[0][0]["bytes"]
    assert out.column("image_meta").to_pylist()[0][0]["num_bytes"] == len(blurred) != len(lossless)
    before, after = decoded(lossless), decoded(blurred)
    x0, y0, x1, y1 = grown(box, 0.1, (before.shape[1], before.shape[0]))
    inside = np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean()
    outside = np.ones(before.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert inside > 4.0
    assert np.array_equal(after[outside], before[outside])  # PNG: untouched pixels are exactly the same


def test_faces_limits_drop_samples():
    photo = FACE_PHOTO.read_bytes()
    out = FacesStage(FacesParams(max_faces=0)).process(table_of([photo, JETS_PHOTO.read_bytes()]))
    assert out.column("drop_reason").to_pylist() == ["faces", None]
    out = FacesStage(FacesParams(max_face_fraction=0.01)).process(table_of([photo]))
    assert out.column("drop_reason").to_pylist() == ["faces"]  # 70 x 70 of 640 x 480 is 1.6%
    out = FacesStage(FacesParams(max_face_fraction=0.05)).process(table_of([photo, b"broken"]))
    assert out.column("drop_reason").to_pylist() == [None, "corrupt"]
    with pytest.raises(RecipeError, match="no Haar cascade"):
        FacesStage(FacesParams(cascade="no-such-cascade.xml")).preflight()


# --------------------------------------------------------------------------- blocklists


def test_url_and_domain_lists_match_normalised_urls_and_subdomains(tmp_path):
    (tmp_path / "urls.txt").write_text("# takedowns\n\nHTTPS://Images.Example.org:443/1.jpg#frag\n")
    pq.write_table(pa.table({"site": ["other.test", "blocked.example"]}), tmp_path / "domains.parquet")
    stage = Blocklist(BlocklistParams(urls=["urls.txt"], domains=[{"path": "domains.parquet", "column": "site"}]),
                      context=_context(tmp_path))
    stage.preflight()
    urls = ["https://images.example.org/0.jpg", "https://images.example.org/1.jpg",
            "http://cdn.blocked.example/a.png", "http://notblocked.example/b.png", "http://blocked.example./c.png"]
    batch = table_of([None] * len(urls))
    batch = with_column(batch, "image_meta", [[{"url": url}] for url in urls])
    batch = with_column(batch, "source", [None] * len(urls))
    out = stage.process(batch)
    assert out.column("drop_reason").to_pylist() == [None, "blocklist", "blocklist", None, "blocklist"]
    details = out.column("drop_detail").to_pylist()
    assert details[1] == "urls list urls.txt, entry 1"
    assert details[2] == details[4] == "domains list domains.parquet, entry 2"
    redacted = out.column("image_meta").to_pylist()
    assert redacted[1][0]["url"] is None and redacted[0][0]["url"] == urls[0]  # dropped rows lose their URLs
    assert normalise_url("HTTP://A.example:80/x?q=1#f") == "http://a.example/x?q=1"


def test_hash_lists_match_sha256_pixels_and_near_perceptual_hashes(tmp_path):
    photo = Image.open(JETS_PHOTO).convert("RGB")
    copy = photo.resize((480, 250), Image.Resampling.LANCZOS)
    meta = [{"sha256": "a" * 64, "pixel_sha256": "b" * 64, "phash": phash(photo)},
            {"sha256": "c" * 64, "pixel_sha256": "d" * 64, "phash": phash(copy)},
            {"sha256": "e" * 64, "pixel_sha256": "f" * 64, "phash": phash(Image.open(FACE_PHOTO).convert("RGB"))},
            {"sha256": "1" * 64, "pixel_sha256": "2" * 64, "phash": None}]
    pa_csv_text = "name,sha\nx," + "B" * 64 + "\ny,sha256:" + "1" * 64 + "\n"
    (tmp_path / "hashes.csv").write_text(pa_csv_text)
    unsigned = phash(photo) & ((1 << 64) - 1)
    (tmp_path / "phash.txt").write_text(f"{unsigned:016x}\n")
    batch = with_column(table_of([None] * 4), "image_meta", [[m] for m in meta])
    exact = BlocklistHashes(BlocklistHashesParams(sha256=[{"path": "hashes.csv", "column": "sha"}],
                                                  phash=["phash.txt"]), context=_context(tmp_path))
    near = BlocklistHashes(BlocklistHashesParams(phash=["phash.txt"], max_distance=8), context=_context(tmp_path))
    assert exact.process(batch).column("drop_detail").to_pylist() == [
        "sha256 list hashes.csv, entry 1", None, None, "sha256 list hashes.csv, entry 2"]
    details = near.process(batch).column("drop_detail").to_pylist()
    assert details[0] == "phash list phash.txt, entry 1 (distance 0)"
    assert details[1] is not None and details[1].startswith("phash list phash.txt, entry 1 (distance ")
    assert details[2] is None and details[3] is None


def test_list_errors_name_the_file_and_entry(tmp_path):
    (tmp_path / "bad.txt").write_text("0123\n")
    stage = BlocklistHashes(BlocklistHashesParams(sha256=["bad.txt"]), context=_context(tmp_path))
    with pytest.raises(RecipeError, match=r"sha256 list bad.txt, entry 1: not a sha256"):
        stage.preflight()
    with pytest.raises(RecipeError, match="does not exist"):
        Blocklist(BlocklistParams(urls=["missing.txt"]), context=_context(tmp_path)).preflight()
    with pytest.raises(ValueError, match="at least one"):
        BlocklistParams()
    (tmp_path / "ok.txt").write_text("f" * 64 + "\n")
    misplaced = BlocklistHashes(BlocklistHashesParams(sha256=["ok.txt"]), context=_context(tmp_path))
    batch = table_of([None])
    batch = with_column(batch, "image_meta", [[{"url": "https://x.test/a.jpg"}]])
    with pytest.raises(RecipeError, match="after fetch"):
        misplaced.process(batch)


def _context(folder: Path):
    from curate.stage import StageContext

    return StageContext(recipe_dir=str(folder))


# --------------------------------------------------------------------------- web, presets


def test_the_demo_web_plants_watermarked_rows_only_when_asked():
    plain = build_synthetic_web(60, seed=3)
    assert "watermarked" not in planted_counts(60) and all(r["watermark"] is None for r in plain.rows)
    web = build_synthetic_web(60, seed=3, watermarked=0.2)
    marked = [r for r in web.rows if r["expect"] == "watermarked"]
    assert len(marked) == planted_counts(60, 0.2)["watermarked"] == 12
    assert {r["watermark"] for r in marked} == set(WATERMARK_KINDS)
    assert all(r["watermark"] is None for r in web.rows if r["expect"] != "watermarked")
    assert all(r["caption"] == r["true_caption"] and r["path"] in web.routes for r in marked)


def test_presets_put_the_safety_stages_in_their_own_phase_after_dedup(tmp_path):
    recipe = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    recipe["stages"].pop("watermark")  # the demo's own tiny watermark filter; the presets bring theirs
    recipe["include"] = ["safe_generation"]
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.jpg"], "caption": ["a red circle"]}),
                   tmp_path / "urls.parquet")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    plan = compile_plan(load_recipe(tmp_path / "recipe.yaml"))
    # nsfw and watermark ask for a GPU, faces does not: the phase is split so faces never holds one
    assert [g.name for g in plan.groups][-2:] == ["safety", "safety-cpu"]
    assert [s.name for s in plan.groups[-2].stages] == ["nsfw", "watermark"]
    assert [s.name for s in plan.groups[-1].stages] == ["faces"]
    assert [s.name for s in plan.segments[-1].stages] == ["nsfw", "watermark", "faces", "roles"]  # demo's roles last
    resolved = plan.loaded.resolved()["stages"]
    assert resolved["nsfw"]["max_score"] == 0.3 and resolved["faces"]["blur"] is True
    recipe["include"] = ["laion_safety"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    plan = compile_plan(load_recipe(tmp_path / "recipe.yaml"), require_weights=False)
    assert plan.loaded.resolved()["stages"]["watermark"]["max_score"] == 0.8
    assert any("ViT-L-14" in warning for warning in plan.warnings)  # no CLIP weights here: a warning, no crash


# --------------------------------------------------------------------------- one engine run


@pytest.fixture(scope="module")
def safety_run(local_ray, tmp_path_factory):
    """blocklist -> fetch (PNG) -> blocklist_hashes -> clip_score -> nsfw, watermark, faces on the loopback web."""
    folder = tmp_path_factory.mktemp("safety-run")
    web = build_synthetic_web(60, seed=5, watermarked=0.2)
    copied = {r["duplicate_of"] for r in web.rows}
    ok = [r for r in web.rows if r["expect"] == "ok" and r["path"] not in copied]  # rows nobody copies
    routes = dict(web.routes)
    photo_paths = {"face": "/real/face.jpg", "jets": "/real/jets.jpg", "tennis": "/real/tennis.jpg"}
    for name, path in (("face", FACE_PHOTO), ("jets", JETS_PHOTO), ("tennis", TENNIS_PHOTO)):
        routes[photo_paths[name]] = Route(body=path.read_bytes())
    by_phash_original = ok[1]["path"]
    near_copy = Image.open(io.BytesIO(web.routes[by_phash_original].body)).convert("RGB")
    near_copy = near_copy.resize((round(near_copy.width * 0.8), round(near_copy.height * 0.8)))
    routes["/copies/near.jpg"] = Route(body=encode(near_copy, "JPEG", 80))
    elsewhere = Scene(2, "white", "star", "black")  # an image that is nowhere else on the web
    routes["/local/only.jpg"] = Route(body=encode(draw_scene(elsewhere, 300, 200, 12345), "JPEG", 90))
    with LoopbackServer(routes) as server:
        base = server.base_url
        write_url_list(web, base, folder / "web.parquet")
        table = pq.read_table(folder / "web.parquet").to_pylist()
        local = base.replace("127.0.0.1", "localhost")
        table += [{"url": base + p, "caption": c, "expect": e} for p, c, e in (
            (photo_paths["face"], "a woman sitting in a chair reading a magazine", "face"),
            (photo_paths["jets"], "two jets tied down at an airport", "blocked_sha256"),
            (photo_paths["tennis"], "a woman in purple holding a tennis racquet", "real"),
            ("/copies/near.jpg", ok[1]["caption"], "blocked_phash_copy"))]
        table.append({"url": local + "/local/only.jpg", "caption": elsewhere.caption(), "expect": "blocked_domain"})
        for row in table:
            if row["url"] == base + by_phash_original:
                row["expect"] = "blocked_phash"
        blocked_url = base + ok[0]["path"]
        for row in table:
            if row["url"] == blocked_url:
                row["expect"] = "blocked_url"
        pq.write_table(pa.Table.from_pylist(table), folder / "urls.parquet")
        (folder / "blocked-urls.txt").write_text(f"# takedown requests\n{blocked_url}\n")
        (folder / "blocked-domains.txt").write_text("*.localhost\nlocalhost\n")
        jets_sha = hashlib.sha256(JETS_PHOTO.read_bytes()).hexdigest()
        pq.write_table(pa.table({"sha256": [jets_sha]}), folder / "blocked-sha256.parquet")
        original = Image.open(io.BytesIO(web.routes[by_phash_original].body)).convert("RGB")
        (folder / "blocked-phash.txt").write_text(f"{phash(original)}\n")
        demo = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
        fetch = {**demo["stages"]["fetch"], "encode": {"format": "png"}}
        recipe = {
            "name": "safety-test",
            "source": {"type": "url_list", "path": "urls.parquet", "url_column": "url", "caption_column": "caption"},
            "stages": {
                "blocklist": {"urls": ["blocked-urls.txt"], "domains": ["blocked-domains.txt"]},
                "fetch": fetch,
                "blocklist_hashes": {"sha256": ["blocked-sha256.parquet"], "phash": ["blocked-phash.txt"],
                                     "max_distance": 6},
                "clip_score": {"model": {"model": "curate-tiny"}},
                "nsfw": {"max_score": 0.5},
                "watermark": {},  # scores only: the tiny head knows drawn scenes, not photographs
                "faces": {"blur": True},
            },
            "output": {"path": str(folder / "out"), "formats": ["parquet", "webdataset"], "shard_rows": 25},
            "engine": {"rows_per_work_shard": 30},
        }
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        manifest = execute(compile_plan(load_recipe(folder / "recipe.yaml")), Console(file=io.StringIO()),
                           progress=False)
        hits = {path: route.hits for path, route in server.routes.items()}
    expect: dict[str, str] = {}
    for row in table:
        expect.setdefault(row["url"], row["expect"])  # a repeated URL keeps its first row's condition
    return SimpleNamespace(folder=folder, manifest=manifest, expect=expect, rows=len(table), hits=hits, routes=routes,
                           fetch=fetch)


def output_files(out: Path) -> list[Path]:
    return [p for p in sorted(out.rglob("*")) if p.is_file()]


def kept_rows(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "parquet").glob("*.parquet"))).to_pylist()


def stored_png(data: bytes, fetch: dict) -> bytes:
    """The bytes the run's fetch stage stores for the served `data` (PNG, the demo recipe's resize)."""
    params = FetchParams.model_validate(fetch)
    return process_image(data, params.resize, params.encode, params.max_pixels).data


def test_run_reconciles_and_blocked_urls_are_never_downloaded(safety_run):
    folder, manifest, expect, hits = safety_run.folder, safety_run.manifest, safety_run.expect, safety_run.hits
    assert manifest["reconciliation"]["ok"]
    assert manifest["reconciliation"]["input_rows"] == safety_run.rows
    drops = pq.read_table(folder / "out" / "drops.parquet").to_pylist()
    blocked = [d for d in drops if d["reason"] == "blocklist"]
    assert sorted(d["stage"] for d in blocked) == ["blocklist", "blocklist", "blocklist_hashes",
                                                   "blocklist_hashes", "blocklist_hashes"]
    assert all(d["url"] is None for d in blocked)  # redacted: the drop log keeps only the key
    assert {d["detail"] for d in blocked} >= {"urls list blocked-urls.txt, entry 1",
                                              "domains list blocked-domains.txt, entry 1",
                                              "sha256 list blocked-sha256.parquet, entry 1"}
    blocked_url = next(url for url, what in expect.items() if what == "blocked_url")
    assert hits["/" + blocked_url.split("/", 3)[3]] == 0
    assert hits["/local/only.jpg"] == 0  # blocked by domain before fetch
    assert hits["/real/jets.jpg"] == 1  # hash lists need the bytes: fetched, then dropped


def test_blocked_images_and_urls_appear_in_no_output_file(safety_run):
    folder, expect, routes = safety_run.folder, safety_run.expect, safety_run.routes
    out = folder / "out"
    blocked_urls = [url for url, what in expect.items() if what.startswith("blocked")]
    assert len(blocked_urls) == 5
    blocked_paths = ["/" + url.split("/", 3)[3] for url in blocked_urls]
    blocked_bytes = [routes[path].body for path in blocked_paths]
    stored = [stored_png(body, safety_run.fetch) for body in blocked_bytes]
    needles = [url.encode() for url in blocked_urls] + blocked_bytes + stored
    needles.append(hashlib.sha256(JETS_PHOTO.read_bytes()).hexdigest().encode())
    files = output_files(out)
    assert {p.name for p in files} >= {"manifest.json", "drops.parquet"}
    everything = b"".join(p.read_bytes() for p in files)
    for needle in needles:
        assert needle not in everything
    kept_url = next(url for url, what in expect.items() if what == "face")
    assert kept_url.encode() in everything  # the search does find what was kept (WebDataset JSON is plain)
    rows = kept_rows(out)
    kept_urls = {m["url"] for r in rows for m in r["image_meta"]}
    assert not kept_urls & set(blocked_urls)
    assert not {r["image_meta"][0]["sha256"] for r in rows} & {hashlib.sha256(b).hexdigest() for b in blocked_bytes}
    drop_text = json.dumps(pq.read_table(out / "drops.parquet").to_pylist())
    assert not any(url in drop_text for url in blocked_urls)


def test_faces_are_blurred_in_the_written_shards(safety_run):
    folder, expect = safety_run.folder, safety_run.expect
    rows = kept_rows(folder / "out")
    face_url = next(url for url, what in expect.items() if what == "face")
    (row,) = [r for r in rows if r["image_meta"][0]["url"] == face_url]
    meta = json.loads(row["meta"])
    assert meta["faces_blurred"] == 1 and len(meta["faces"][0]) == 1
    blurred = sum(json.loads(r["meta"]).get("faces_blurred", 0) for r in rows if r["meta"])
    faces_stage = next(s for s in safety_run.manifest["stages"] if s["name"] == "faces")
    assert faces_stage["counters"] == {"images_blurred": blurred} and blurred >= 1  # the count in the manifest
    box = meta["faces"][0][0]
    assert iou(box, [165, 212, 70, 70]) > 0.5
    written = row["images"][0]["bytes"]
    assert row["image_meta"][0]["num_bytes"] == len(written) and row["image_meta"][0]["format"] == "png"
    unblurred = stored_png(FACE_PHOTO.read_bytes(), safety_run.fetch)
    before, after = decoded(unblurred), decoded(written)
    x0, y0, x1, y1 = grown(box, FacesParams().margin, (before.shape[1], before.shape[0]))
    outside = np.ones(before.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean() > 4.0
    assert np.array_equal(after[outside], before[outside])
    tar = b"".join(p.read_bytes() for p in sorted((folder / "out" / "webdataset").glob("*.tar")))
    assert written in tar and unblurred not in tar


def test_scores_and_watermark_filter_in_the_run(safety_run):
    folder, manifest, expect = safety_run.folder, safety_run.manifest, safety_run.expect
    rows = kept_rows(folder / "out")
    assert rows and all(0.0 <= r["scores"]["nsfw"] <= 1.0 for r in rows)
    assert all(0.0 <= r["scores"]["watermark"] <= 1.0 for r in rows)
    assert all("faces" in json.loads(r["meta"]) for r in rows)
    watermark = {r["image_meta"][0]["url"]: r["scores"]["watermark"] for r in rows}
    marked = [score for url, score in watermark.items() if expect[url] == "watermarked"]
    plain = [score for url, score in watermark.items() if expect[url] == "ok"]
    assert len(marked) == 12 and len(plain) >= 15
    assert np.mean(np.array(marked) > 0.5) >= 0.9 and np.mean(np.array(plain) <= 0.5) >= 0.9
    assert [p["name"] for p in manifest["phases"]][1:4] == ["prepare", "model", "safety"]
    embeddings = pq.read_table(sorted((folder / "out" / "parquet").glob("*.parquet")), columns=["embeddings"])
    assert embeddings.column("embeddings").null_count == embeddings.num_rows  # reused from the work area only
    roles = {m["role"] for m in manifest["models"]}
    assert {"nsfw_detector", "watermark_head", "face_detector"} <= roles
