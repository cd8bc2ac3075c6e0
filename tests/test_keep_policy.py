"""The dedup keep policy (`keep:`): which copy of a group is kept, why, and what fetch records for it.

The acceptance test serves a real COCO photo and four lesser copies of it (half size, JPEG
quality 40, CMYK, stored rotated with an EXIF orientation tag) over loopback, lists the
original last, runs fetch + dedup_exact + dedup_perceptual through the engine, and checks that
the original is the copy kept and that every drop says which criterion decided.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from curate import schema
from curate.dedup.decontaminate import Decontaminate
from curate.dedup.exact import DedupExact, DedupExactParams
from curate.dedup.perceptual import DedupPerceptual, DedupPerceptualParams
from curate.dedup.policy import DEFAULT_KEEP, OFFERED, Preference, keep_criteria
from curate.dedup.semantic import DedupSemantic, DedupSemanticParams
from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import process_image
from curate.sources.edit_images import probe
from curate.stage import RecipeError

# A COCO train2017 photo, CC BY 2.0 (see tests/data/captioned-images/SOURCE.txt).
PHOTO = Path(__file__).resolve().parent / "data" / "captioned-images" / "images" / "000000411958.jpg"
ORIENTATION = 0x0112


# -- copies of a real photo ----------------------------------------------------------------------------


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def rotated_with_exif(image: Image.Image, quality: int) -> bytes:
    """`image` stored turned 90 degrees counter-clockwise, tagged orientation 6 (a viewer turns it back upright)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return jpeg(image.transpose(Image.Transpose.ROTATE_90), quality=quality, exif=exif.tobytes())


def photo_copies(data: bytes) -> dict[str, bytes]:
    """The original and four lesser copies of it.

    The CMYK and rotated copies are saved at quality 98 so that they have more bytes than the
    original: `original_bytes` alone would keep them, `rgb_upright` (before it) must not.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    return {
        "half": jpeg(half, quality=90),
        "q40": jpeg(image, quality=40),
        "cmyk": jpeg(image.convert("CMYK"), quality=98),
        "rotated": rotated_with_exif(image, quality=98),
        "original": data,
    }


# (criterion that prefers the original, how the original shows, how the copy shows)
EXPECTED_WHY = {
    "half": ("original_pixels", "500x360", "250x180"),
    "q40": ("original_bytes", None, None),
    "cmyk": ("rgb_upright", "RGB, upright", "CMYK"),
    "rotated": ("rgb_upright", "RGB, upright", "EXIF orientation 6"),
}


@pytest.fixture(scope="module")
def copies() -> dict[str, bytes]:
    return photo_copies(PHOTO.read_bytes())


def test_the_copies_are_what_they_claim(copies):
    original = copies["original"]
    assert len(copies["cmyk"]) > len(original) and len(copies["rotated"]) > len(original) > len(copies["q40"])
    processed = {name: process_image(data, ResizeParams(), EncodeParams(), 10**8) for name, data in copies.items()}
    assert (processed["original"].original_mode, processed["original"].exif_orientation) == ("RGB", 1)
    assert processed["cmyk"].original_mode == "CMYK"
    assert processed["rotated"].exif_orientation == 6
    assert (processed["rotated"].original_width, processed["rotated"].original_height) == (500, 360)
    assert (processed["half"].original_width, processed["half"].original_height) == (250, 180)


# -- what fetch and the sources record --------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "GIF"), ("CMYK", "JPEG")])
def test_fetch_and_the_header_probe_record_the_mode_as_served(mode, fmt):
    data = encoded(Image.new(mode, (40, 30)), fmt)
    assert process_image(data, ResizeParams(), EncodeParams(), 10**8).original_mode == mode
    assert probe(data)["original_mode"] == mode


def test_fetch_and_the_header_probe_record_the_exif_orientation(copies):
    for data, orientation in ((copies["rotated"], 6), (copies["original"], 1)):
        assert process_image(data, ResizeParams(), EncodeParams(), 10**8).exif_orientation == orientation
        assert probe(data)["exif_orientation"] == orientation


def test_the_new_image_meta_fields_are_in_the_schemas():
    assert schema.IMAGE_META.field("original_mode").type == pa.string()
    assert schema.IMAGE_META.field("exif_orientation").type == pa.int32()
    assert schema.WDS_IMAGE_META.field("exif_orientation").type == pa.int64()


def test_the_decode_stage_fills_the_new_fields(copies):
    from curate.ops.decode import DecodeParams, DecodeStage

    rows = [{"key": "k", "kind": "pair", "images": [{"bytes": copies["rotated"], "path": None}],
             "image_meta": [{"url": None}]}]
    out = DecodeStage(DecodeParams()).process(schema.from_rows(rows))
    meta = out.column("image_meta").to_pylist()[0][0]
    assert (meta["original_mode"], meta["exif_orientation"]) == ("RGB", 6)


# -- the order of preference, criterion by criterion -------------------------------------------------------


def image(width=640, height=427, mode="RGB", orientation=1, num_bytes=50_000, phash=7) -> dict:
    return {"original_width": width, "original_height": height, "original_mode": mode,
            "exif_orientation": orientation, "original_num_bytes": num_bytes, "phash": phash,
            "sha256": "same", "pixel_sha256": "same"}


def sample(key: str, images: list[dict] | None = None, clip_score=None, aesthetic=None) -> dict:
    return {"key": key, "kind": "pair", "image_meta": [image()] if images is None else images,
            "scores": {"clip_score": clip_score, "aesthetic": aesthetic}}


def first(rows: list[dict], keep=DEFAULT_KEEP) -> str:
    """The key of the most preferred row."""
    table = schema.from_rows(rows)
    ranked = Preference(table, keep_criteria(list(keep))).order(np.arange(table.num_rows))
    return table.column("key")[int(ranked[0])].as_py()


@pytest.mark.parametrize("criterion, better, worse", [
    ("original_pixels", sample("big", [image(640, 427)]), sample("small", [image(320, 213)])),
    ("original_pixels", sample("big", [image(100, 100), image(640, 427)]), sample("small", [image(320, 213)])),
    ("original_pixels", sample("big", [image(10, 10)]), sample("small", [image(None, None)])),
    ("rgb_upright", sample("rgb", [image(mode="RGB")]), sample("cmyk", [image(mode="CMYK")])),
    ("rgb_upright", sample("rgba", [image(mode="RGBA")]), sample("grey", [image(mode="L")])),
    ("rgb_upright", sample("upright", [image(orientation=1)]), sample("turned", [image(orientation=6)])),
    ("rgb_upright", sample("known", [image(mode="CMYK")]), sample("unknown", [image(mode=None)])),
    ("rgb_upright", sample("rgb", [image(), image()]), sample("one_palette", [image(), image(mode="P")])),
    ("original_bytes", sample("big", [image(num_bytes=9_000)]), sample("small", [image(num_bytes=3_000)])),
    ("clip_score", sample("high", clip_score=0.4), sample("low", clip_score=0.2)),
    ("clip_score", sample("low", clip_score=0.01), sample("none")),
    ("aesthetic", sample("high", aesthetic=6.0), sample("low", aesthetic=4.5)),
])
def test_each_criterion_prefers_the_better_copy_in_either_position(criterion, better, worse):
    for rows in ([better, worse], [worse, better]):
        assert first(rows, [criterion]) == better["key"]


def test_source_order_prefers_the_earlier_row():
    rows = [sample("b"), sample("a"), sample("c")]
    assert first(rows, ["source_order"]) == "b"
    assert first(rows[::-1], ["source_order"]) == "c"


def test_ties_fall_through_to_the_next_criterion():
    small = sample("small", [image(320, 213, num_bytes=99_000)])
    cmyk = sample("cmyk", [image(mode="CMYK", num_bytes=90_000)])
    light = sample("light", [image(num_bytes=10_000)])
    heavy = sample("heavy", [image(num_bytes=20_000)])
    assert first([small, cmyk, light, heavy]) == "heavy"  # pixels tie (but small), rgb_upright ties, then bytes
    twin = sample("twin", [image(num_bytes=20_000)])
    assert first([twin, heavy]) == "twin" and first([heavy, twin]) == "heavy"  # all tie: source order


def test_clip_score_first_restores_the_score_first_order():
    original = sample("original", [image(640, 427)], clip_score=0.20)
    copy = sample("copy", [image(320, 213)], clip_score=0.25)
    assert first([copy, original]) == "original"
    assert first([copy, original], ["clip_score", "original_pixels", "source_order"]) == "copy"
    params = DedupPerceptualParams(keep=["clip_score", "original_pixels", "source_order"])
    decision, summary = DedupPerceptual(params).decide(schema.from_rows([original, copy]))
    assert {r["key"]: r["reason"] for r in decision.to_pylist()} == {"copy": None, "original": "duplicate_perceptual"}
    assert summary["kept_because"] == {"clip_score": 1, "original_pixels": 0, "source_order": 0}


# -- the keep list as a parameter -----------------------------------------------------------------------------


@pytest.mark.parametrize("Params", [DedupExactParams, DedupPerceptualParams, DedupSemanticParams])
def test_the_default_keep_list_and_the_implied_source_order(Params):
    assert Params().keep == list(DEFAULT_KEEP) == ["original_pixels", "rgb_upright", "original_bytes", "source_order"]
    assert Params(keep=["aesthetic"]).keep == ["aesthetic", "source_order"]
    assert Params(keep=[]).keep == ["source_order"]
    assert Params(keep=["source_order", "clip_score"]).keep == ["source_order", "clip_score"]


@pytest.mark.parametrize("Params", [DedupExactParams, DedupPerceptualParams, DedupSemanticParams])
def test_an_unknown_criterion_is_refused_naming_the_allowed_ones(Params):
    with pytest.raises(ValidationError) as caught:
        Params(keep=["original_pixels", "sharpness"])
    assert "'sharpness'" in str(caught.value) and ", ".join(OFFERED) in str(caught.value)
    with pytest.raises(ValidationError, match="listed twice"):
        Params(keep=["clip_score", "clip_score"])


def test_a_recipe_with_an_unknown_criterion_names_the_key(tmp_path):
    from curate.recipe import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("source: {type: url_list, path: urls.parquet}\nstages:\n  fetch: {}\n"
                      "  dedup_perceptual: {keep: [original_pixels, newest]}\noutput: {path: out}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert caught.value.path == "stages.dedup_perceptual.keep"
    assert "newest" in caught.value.message and "source_order" in caught.value.message


# -- determinism ---------------------------------------------------------------------------------------------


def varied_rows(n: int, seed: int) -> list[dict]:
    """Rows of one perceptual group that differ on the default criteria, with some ties on the first ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        side = int(rng.choice([200, 300, 400]))
        rows.append(sample(f"k{k:02d}", [image(side, side, mode=str(rng.choice(["RGB", "CMYK"])),
                                               orientation=int(rng.choice([1, 6])), num_bytes=1_000 + k)]))
    return rows


def decided(stage, rows: list[dict]) -> dict[str, str | None]:
    return {r["key"]: r["detail"] for r in stage.decide(schema.from_rows(rows))[0].to_pylist()}


def test_the_decision_does_not_depend_on_row_order_when_the_criteria_decide():
    rows = varied_rows(12, seed=3)
    for stage in (DedupExact(DedupExactParams()), DedupPerceptual(DedupPerceptualParams()),
                  DedupPerceptual(DedupPerceptualParams(policy="components"))):
        reference = decided(stage, rows)
        assert sum(detail is not None for detail in reference.values()) == 11
        for seed in range(3):
            shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
            assert decided(stage, shuffled) == reference


def test_only_source_order_follows_the_row_position():
    rows = [sample("a"), sample("b"), sample("c")]
    stage = DedupPerceptual(DedupPerceptualParams())
    for order in (rows, rows[::-1]):
        kept = [key for key, detail in decided(stage, order).items() if detail is None]
        assert kept == [order[0]["key"]]


# -- drop details and the summary ------------------------------------------------------------------------------


def test_details_name_the_kept_key_the_criterion_and_both_values():
    rows = [sample("half", [image(320, 213)]), sample("cmyk", [image(mode="CMYK")]),
            sample("q40", [image(num_bytes=9_000)]), sample("twin", [image()]), sample("best", [image()])]
    decision, summary = DedupPerceptual(DedupPerceptualParams()).decide(schema.from_rows(rows))
    details = {r["key"]: r["detail"] for r in decision.to_pylist()}
    assert details == {
        "twin": None,
        "half": "duplicate of twin (hamming 0); kept for original_pixels: 640x427 vs 320x213",
        "cmyk": "duplicate of twin (hamming 0); kept for rgb_upright: RGB, upright vs CMYK",
        "q40": "duplicate of twin (hamming 0); kept for original_bytes: 50000 bytes vs 9000 bytes",
        "best": "duplicate of twin (hamming 0); kept for source_order: row 3 vs row 4",
    }
    assert summary["keep"] == list(DEFAULT_KEEP)
    assert summary["kept_because"] == {"original_pixels": 1, "rgb_upright": 1, "original_bytes": 1, "source_order": 1}


def test_a_components_detail_names_the_link_and_compares_with_the_kept_sample():
    rows = [sample("kept", [image(640, 427, phash=0)]), sample("middle", [image(500, 300, phash=0b111)]),
            sample("far", [image(400, 200, phash=0b111111)])]
    decision, _ = DedupPerceptual(DedupPerceptualParams(policy="components", max_distance=3)).decide(
        schema.from_rows(rows))
    details = {r["key"]: r["detail"] for r in decision.to_pylist()}
    assert details["far"] == "duplicate of kept (hamming 3 to middle); kept for original_pixels: 640x427 vs 400x200"


# -- stage declarations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [DedupExact, DedupPerceptual, DedupSemantic, Decontaminate])
def test_every_param_is_either_annotation_or_selection(stage):
    fields = set(stage.Params.model_fields)
    assert not stage.annotation_params & stage.selection_params
    assert stage.annotation_params | stage.selection_params == fields
    assert stage.scope == "corpus" and stage.reads_images is False
    assert set(stage.columns) - {"key"} == stage.reads
    if stage is not Decontaminate:
        assert "keep" in stage.selection_params and stage.provides == frozenset({"meta"})
    else:
        assert stage.annotation_params == {"sets", "model", "semantic"} and stage.provides == frozenset()


# -- the acceptance test: real copies through the engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def copies_run(copies, tmp_path_factory, local_ray):
    from rich.console import Console

    from curate.demo.server import LoopbackServer, Route
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe

    folder = tmp_path_factory.mktemp("keep")
    names = list(copies)  # the original last: source order alone would keep the half-size copy
    assert names[-1] == "original"
    routes = {f"/{name}.jpg": Route(body=data) for name, data in copies.items()}
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, backoff_base: 0.01}\n"
        "  dedup_exact: {}\n  dedup_perceptual: {max_distance: 8}\n"
        "output: {path: out, formats: [parquet]}\nengine: {rows_per_work_shard: 2}\n")
    with LoopbackServer(routes) as server:
        urls = {name: server.url(f"/{name}.jpg") for name in names}
        pq.write_table(pa.table({"url": list(urls.values()), "caption": [f"a copy: {n}" for n in names]}),
                       folder / "urls.parquet")
        plan = compile_plan(load_recipe(recipe, [f"output.path={folder / 'out'}"]))
        manifest = execute(plan, Console(file=io.StringIO()), progress=False, overwrite=True)
    return folder / "out", manifest, urls


def test_the_original_is_kept_over_its_lesser_copies(copies_run):
    output, manifest, urls = copies_run
    assert manifest["reconciliation"]["ok"]
    kept = pq.read_table(sorted((output / "parquet").glob("*.parquet")), columns=["key", "image_meta", "meta"])
    kept = kept.to_pylist()
    assert [row["image_meta"][0]["url"] for row in kept] == [urls["original"]]
    original = kept[0]
    assert original["image_meta"][0]["original_mode"] == "RGB" and original["image_meta"][0]["exif_orientation"] == 1
    assert json.loads(original["meta"])["dedup"]["perceptual"]["group"] == original["key"]
    drops = {row["url"]: row for row in pq.read_table(output / "drops.parquet").to_pylist()}
    assert set(drops) == {url for name, url in urls.items() if name != "original"}
    for name, (criterion, shown_original, shown_copy) in EXPECTED_WHY.items():
        drop = drops[urls[name]]
        assert drop["stage"] == "dedup_perceptual" and drop["reason"] == "duplicate_perceptual"
        assert drop["detail"].startswith(f"duplicate of {original['key']} (hamming ")
        assert f"; kept for {criterion}: " in drop["detail"]
        if shown_original:
            assert drop["detail"].endswith(f"{criterion}: {shown_original} vs {shown_copy}")


def test_the_summary_counts_the_deciding_criteria(copies_run):
    _, manifest, _ = copies_run
    exact, perceptual = manifest["decisions"]["dedup_exact"], manifest["decisions"]["dedup_perceptual"]
    assert exact["removed"] == 0  # no copy has the original's bytes or decoded pixels
    assert perceptual["keep"] == exact["keep"] == list(DEFAULT_KEEP)
    assert perceptual["kept_because"] == {"original_pixels": 1, "rgb_upright": 2, "original_bytes": 1,
                                          "source_order": 0}


def test_the_report_shows_why_copies_were_kept(copies_run):
    from curate.report.html import build_report
    from curate.report.reader import open_output

    output, _, _ = copies_run
    page = build_report(open_output(output), kept=2, per_reason=2)
    assert "kept because" in page and "original_pixels 1, rgb_upright 2, original_bytes 1" in page


def test_a_recorded_original_leaves_its_mode_and_orientation_unknown(copies):
    from curate.sources.stored_images import header_meta

    assert header_meta(copies["rotated"], {})["exif_orientation"] == 6
    recorded = header_meta(copies["rotated"], {"original_width": 1000, "original_height": 720, "sha256": "ab" * 32})
    assert recorded["original_width"] == 1000
    assert recorded["original_mode"] is None and recorded["exif_orientation"] is None
