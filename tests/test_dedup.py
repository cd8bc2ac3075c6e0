"""Dedup: keep policies, hashes, FAISS searches, determinism, precision/recall on planted copies, one engine run.

Precision and recall are measured per method against that method's own ground truth
(printed; run with -s to see them):
- exact: byte copies and pixel copies (same pixels, other bytes) of real photos;
- perceptual: every copy of a real photo (also re-encoded at other JPEG qualities and resized);
- semantic: near-duplicates of synthetic scenes embedded by the tiny CLIP, with hard
  negatives (another drawing of the same caption).
A removal is correct when the sample it was removed for (its group) is a copy of the
same original; recall = correct removals / (copies - 1 per original).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import registry, schema
from curate.dedup.exact import DedupExact
from curate.dedup.perceptual import DedupPerceptual, DedupPerceptualParams
from curate.dedup.policy import components_keep, preference_order, semdedup_keep
from curate.dedup.search import binary_pairs, phash_codes
from curate.dedup.semantic import TINY_CLIP_THRESHOLD, DedupSemantic, DedupSemanticParams
from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import phash, process_image

PHOTOS = sorted((Path(__file__).parent / "data" / "dedup").glob("*.jpg"))


# -- policy --------------------------------------------------------------------------------------


def test_semdedup_keeps_both_ends_of_a_chain_components_merge_it():
    chain = [(0, 1, "a~b"), (1, 2, "b~c")]  # A ~ B ~ C, A !~ C; ranks are the preference order
    assert [(r.rank, r.kept) for r in semdedup_keep(3, chain)] == [(1, 0)]
    removals = components_keep(3, chain)
    assert [(r.rank, r.kept, r.via) for r in removals] == [(1, 0, 0), (2, 0, 1)]


def test_semdedup_removed_samples_remove_nothing():
    edges = [(0, 2, "x"), (2, 3, "y"), (1, 3, "z")]
    assert [(r.rank, r.kept) for r in semdedup_keep(4, edges)] == [(2, 0), (3, 1)]


def test_preference_order_score_then_pixels_then_key():
    keys = ["d", "c", "b", "a", "e"]
    scores = np.array([0.5, 0.9, np.nan, 0.5, 0.5])
    pixels = np.array([100, 10, 10_000, 100, 400])
    assert [keys[i] for i in preference_order(keys, scores, pixels)] == ["c", "e", "a", "d", "b"]


# -- hashes and searches ---------------------------------------------------------------------------


def dct_by_fft(x: np.ndarray) -> np.ndarray:
    """Unnormalised 1-D DCT-II along axis 0 through an FFT (Makhoul), independent of the matrix form."""
    n = x.shape[0]
    v = np.concatenate([x[0::2], x[1::2][::-1]], axis=0)
    k = np.arange(n).reshape(-1, *([1] * (x.ndim - 1)))
    return np.real(np.exp(-1j * np.pi * k / (2 * n)) * np.fft.fft(v, axis=0))


def test_phash_is_the_dct_hash_of_the_32px_grayscale():
    image = Image.open(PHOTOS[0]).convert("RGB")
    pixels = np.asarray(image.resize((32, 32), Image.Resampling.BOX, reducing_gap=2.0).convert("L"), np.float64)
    low = dct_by_fft(dct_by_fft(pixels).T).T[:8, :8]
    expected = int("".join("1" if b else "0" for b in (low > np.median(low)).ravel()), 2)
    assert phash(image) == expected - (1 << 64 if expected >= 1 << 63 else 0)


def test_binary_hash_index_finds_the_same_pairs_as_the_flat_one():
    rng = np.random.default_rng(0)
    base = rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)
    masks = np.zeros((300, 64), dtype=bool)
    for mask, d in zip(masks, rng.integers(0, 9, 300)):
        mask[rng.choice(64, size=d, replace=False)] = True
    flips = np.packbits(masks, axis=1).view(">i8").ravel().astype(np.int64)
    codes = phash_codes(np.concatenate([base, base ^ flips]))
    flat = binary_pairs(codes, 6, exact_below=10**9)
    hashed = binary_pairs(codes, 6, exact_below=0)
    assert flat[3] == "IndexBinaryFlat" and hashed[3].startswith("IndexBinaryMultiHash")
    assert len(flat[0]) >= 200 and flat[2].max() == 6
    for a, b in zip(flat[:3], hashed[:3]):
        assert np.array_equal(a, b)


# -- tables ------------------------------------------------------------------------------------------


ORIGINAL_FIELDS = ("original_width", "original_height", "original_mode", "exif_orientation", "original_num_bytes")


def row(key: str, processed=None, clip_score=None, embedding=None, meta=None) -> dict:
    image_meta = None
    if processed is not None:
        image_meta = [{"width": processed.width, "height": processed.height, "sha256": processed.sha256,
                       "pixel_sha256": processed.pixel_sha256, "phash": processed.phash,
                       **{name: getattr(processed, name) for name in ORIGINAL_FIELDS}}]
    embeddings = None if embedding is None else {"model": "curate-tiny", "image": embedding.tolist(), "text": None}
    return {"key": key, "kind": "pair", "image_meta": image_meta, "scores": {"clip_score": clip_score},
            "embeddings": embeddings, "meta": meta}


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def with_comment(data: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, the same decoded pixels."""
    comment = b"copied from elsewhere"
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def photo_copies(data: bytes) -> dict[str, bytes]:
    """The planted copies of one photo, by variant; `exact` variants decode to the original's pixels."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    three_quarters = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    return {"original": data, "bytes": data, "comment": with_comment(data), "png": png(image),
            "q50": jpeg(image, 50), "q75_small": jpeg(three_quarters, 75), "half": jpeg(half, 90),
            "half_png": png(half)}


EXACT_VARIANTS = ("original", "bytes", "comment", "png")


@pytest.fixture(scope="module")
def photo_corpus():
    """Rows for every copy of every test photo, and per key (photo, variant)."""
    assert len(PHOTOS) >= 12
    rows, truth = [], {}
    resize, encode = ResizeParams(size=256), EncodeParams(format="jpg")
    for p, path in enumerate(PHOTOS):
        for variant, data in photo_copies(path.read_bytes()).items():
            key = f"{p:02d}-{variant}"
            rows.append(row(key, process_image(data, resize, encode, 10**8)))
            truth[key] = (p, variant)
    return schema.from_rows(rows), truth


def precision_recall(decision: pa.Table, groups: dict[str, object]) -> tuple[float, float, int]:
    """(precision, recall, removed) of a decision against ground-truth groups (key -> group id)."""
    removed = correct = 0
    for r in decision.to_pylist():
        if r["reason"] is None:
            continue
        removed += 1
        method, entry = next(iter(json.loads(r["annotation"])["dedup"].items()))
        correct += groups[r["key"]] == groups[entry["group"]]
    sizes: dict[object, int] = {}
    for group in groups.values():
        sizes[group] = sizes.get(group, 0) + 1
    planted = sum(size - 1 for size in sizes.values())
    return (correct / removed if removed else 1.0), (correct / planted if planted else 1.0), removed


def exact_groups(truth: dict) -> dict[str, object]:
    return {key: (p if variant in EXACT_VARIANTS else key) for key, (p, variant) in truth.items()}


def test_exact_finds_byte_and_pixel_copies_only(photo_corpus):
    table, truth = photo_corpus
    # the input order keeps the original, so its byte copy is removed as "same bytes" (by default the PNG,
    # with the most bytes, would be kept and every other copy linked to it by "same pixels")
    decision, summary = DedupExact(DedupExact.Params(keep=["source_order"])).decide(table)
    precision, recall, removed = precision_recall(decision, exact_groups(truth))
    print(f"\nexact: precision {precision:.3f} recall {recall:.3f} removed {removed} {summary['index']}")
    assert precision >= 0.99 and recall == 1.0
    assert summary["removed"] == removed == 3 * len(PHOTOS) and summary["groups"] == len(PHOTOS)
    details = {r["key"]: r["detail"] for r in decision.to_pylist() if r["reason"]}
    assert {r["reason"] for r in decision.to_pylist() if r["reason"]} == {"duplicate_exact"}
    assert any("same pixels" in d for d in details.values()) and any("same bytes" in d for d in details.values())


@pytest.mark.parametrize("policy", ["semdedup", "components"])
def test_perceptual_finds_reencoded_and_resized_copies(photo_corpus, policy):
    table, truth = photo_corpus
    stage = DedupPerceptual(DedupPerceptualParams(policy=policy))
    decision, summary = stage.decide(table)
    precision, recall, removed = precision_recall(decision, {key: p for key, (p, _) in truth.items()})
    print(f"\nperceptual ({policy}): precision {precision:.3f} recall {recall:.3f} removed {removed} "
          f"{summary['index']} {summary['threshold']}")
    assert precision >= 0.99 and recall >= 0.95
    assert summary["index"] == "IndexBinaryFlat" and summary["groups"] >= len(PHOTOS) * 0.9
    assert 1 <= len(summary["examples"]) <= 5


def test_union_of_exact_and_perceptual_recalls_the_real_photo_copies(photo_corpus):
    table, truth = photo_corpus
    exact, _ = DedupExact(DedupExact.Params()).decide(table)
    gone = {r["key"] for r in exact.to_pylist() if r["reason"]}
    rest = table.filter(pa.array([key not in gone for key in table.column("key").to_pylist()]))
    perceptual, _ = DedupPerceptual(DedupPerceptualParams()).decide(rest)
    correct = 0
    for decision in (exact, perceptual):
        for r in decision.to_pylist():
            group = next(iter(json.loads(r["annotation"])["dedup"].values()))["group"]
            correct += r["reason"] is not None and truth[r["key"]][0] == truth[group][0]
    planted = len(table) - len(PHOTOS)
    print(f"\nexact + perceptual: recall {correct / planted:.3f} of {planted} planted copies")
    assert correct / planted >= 0.95


def test_an_unrelated_photo_is_never_grouped(photo_corpus):
    table, truth = photo_corpus
    originals = table.filter(pa.array([truth[k][1] == "original" for k in table.column("key").to_pylist()]))
    for stage in (DedupExact(DedupExact.Params()), DedupPerceptual(DedupPerceptualParams())):
        decision, summary = stage.decide(originals)
        assert decision.num_rows == 0 and summary["removed"] == 0


# -- determinism -------------------------------------------------------------------------------------


def keep_set(decision: pa.Table, table: pa.Table) -> set[str]:
    gone = {r["key"] for r in decision.to_pylist() if r["reason"]}
    return set(table.column("key").to_pylist()) - gone


def test_input_order_and_reruns_do_not_change_the_decision(photo_corpus):
    """Where the keep criteria tell every copy apart (here distinct scores), the input order plays no part."""
    table, _ = photo_corpus
    rng = np.random.default_rng(5)
    scores = pa.array([{"clip_score": float(s)} for s in rng.permutation(len(table)) / len(table)], schema.SCORES)
    table = table.set_column(table.schema.get_field_index("scores"), "scores", scores)
    keep = ["clip_score"]
    for stage in (DedupExact(DedupExact.Params(keep=keep)), DedupPerceptual(DedupPerceptualParams(keep=keep)),
                  DedupPerceptual(DedupPerceptualParams(policy="components", exact_below=0, keep=keep))):
        reference, summary = stage.decide(table)
        assert summary["removed"] > 0
        for seed in range(3):
            shuffled = table.take(np.random.default_rng(seed).permutation(len(table)))
            again, _ = stage.decide(shuffled)
            assert keep_set(again, shuffled) == keep_set(reference, table)
            assert sorted(again.to_pylist(), key=lambda r: r["key"]) == sorted(reference.to_pylist(),
                                                                               key=lambda r: r["key"])


def test_a_full_size_copy_is_kept_by_default_the_best_scored_when_asked(photo_corpus):
    table, truth = photo_corpus
    scores = pa.array([{"clip_score": 0.9 if truth[k][1] == "half" else 0.1} for k in table.column("key").to_pylist()],
                      schema.SCORES)
    table = table.set_column(table.schema.get_field_index("scores"), "scores", scores)
    decision, summary = DedupPerceptual(DedupPerceptualParams()).decide(table)
    kept = {truth[k][1] for k in keep_set(decision, table)}
    assert kept <= {"original", "bytes", "comment", "png", "q50"} and summary["kept_because"]["original_pixels"] > 0
    decision, _ = DedupPerceptual(DedupPerceptualParams(keep=["clip_score", "original_pixels"])).decide(table)
    assert {truth[k][1] for k in keep_set(decision, table)} == {"half"}


def test_annotations_keep_earlier_methods_and_details_name_the_kept_key(photo_corpus):
    table, _ = photo_corpus
    first = table.slice(0, 8)
    metas = pa.array([json.dumps({"dedup": {"exact": {"group": "x"}}, "language": "en"})] * 8, pa.string())
    first = first.set_column(first.schema.get_field_index("meta"), "meta", metas)
    decision, _ = DedupPerceptual(DedupPerceptualParams()).decide(first)
    for r in decision.to_pylist():
        dedup = json.loads(r["annotation"])["dedup"]
        assert dedup["exact"] == {"group": "x"} and set(dedup) == {"exact", "perceptual"}
        if r["reason"]:
            assert r["detail"].startswith(f"duplicate of {dedup['perceptual']['group']} (hamming ")


# -- semantic ------------------------------------------------------------------------------------------


def size(rng: random.Random) -> tuple[int, int]:
    width = rng.randint(96, 400)
    return width, min(640, max(96, round(width * rng.uniform(0.6, 1.6))))


@pytest.fixture(scope="module")
def scene_corpus():
    """Synthetic scenes (seed 7, not the calibration seed), a near-duplicate and a same-caption negative each.

    Sizes follow the demo web (aspect 0.6..1.6): the CLIP sees a center crop, and two very
    wide drawings can crop to the same plain background, which no image embedding separates.
    """
    from curate.demo.web import all_scenes, draw_scene
    from curate.models.clip import TINY_CLIP, load_clip

    model = load_clip(TINY_CLIP, device="cpu")
    rng = random.Random(7)
    scenes = all_scenes()
    rng.shuffle(scenes)
    images, groups = [], {}
    for n, scene in enumerate(scenes[:120]):
        width, height = size(rng)
        seed = rng.getrandbits(32)
        original = draw_scene(scene, width, height, seed)
        if n % 3 == 0:
            copy = Image.open(io.BytesIO(jpeg(original, 60))).convert("RGB")
        elif n % 3 == 1:
            copy = original.resize((width * 3 // 4, height * 3 // 4), Image.Resampling.LANCZOS)
        else:
            copy = draw_scene(scene, width, height, seed, (max(2, width // 30), max(2, height // 30)))
        negative = draw_scene(scene, *size(rng), rng.getrandbits(32))
        for variant, image in (("original", original), ("copy", copy), ("negative", negative)):
            key = f"{n:03d}-{variant}"
            images.append((key, image))
            groups[key] = n if variant != "negative" else key
    vectors = model.encode_images(model.preprocess_images([image for _, image in images])).astype(np.float16)
    rows = [row(key, clip_score=0.8, embedding=vector) for (key, _), vector in zip(images, vectors)]
    return schema.from_rows(rows), groups


@pytest.mark.parametrize("exact_below", [100_000, 0])
def test_semantic_precision_with_the_tiny_clip(scene_corpus, exact_below):
    table, groups = scene_corpus
    stage = DedupSemantic(DedupSemanticParams(threshold=TINY_CLIP_THRESHOLD, exact_below=exact_below, nprobe=4))
    decision, summary = stage.decide(table)
    precision, recall, removed = precision_recall(decision, groups)
    print(f"\nsemantic: precision {precision:.3f} recall {recall:.3f} removed {removed} {summary['index']} "
          f"{summary['threshold']}")
    assert precision >= 0.99 and recall >= 0.3
    assert summary["models"] == ["curate-tiny"]
    assert summary["index"].startswith("IndexFlatIP" if exact_below else "IndexIVFFlat")


def test_semantic_at_the_real_clip_default_merges_same_caption_drawings(scene_corpus):
    """The tiny CLIP embeds the caption's scene: at 0.95 different drawings of one caption collide."""
    table, groups = scene_corpus
    decision, _ = DedupSemantic(DedupSemanticParams()).decide(table)
    precision, _, _ = precision_recall(decision, groups)
    assert precision < 0.9


def test_semantic_is_order_independent_with_ivf(scene_corpus):
    table, _ = scene_corpus
    scores = pa.array([{"clip_score": float(s)} for s in np.random.default_rng(2).permutation(len(table))],
                      schema.SCORES)
    table = table.set_column(table.schema.get_field_index("scores"), "scores", scores)
    stage = DedupSemantic(DedupSemanticParams(threshold=0.995, exact_below=0, nprobe=2, keep=["clip_score"]))
    reference, summary = stage.decide(table)
    assert summary["removed"] > 0
    shuffled = table.take(np.random.default_rng(1).permutation(len(table)))
    assert keep_set(stage.decide(shuffled)[0], shuffled) == keep_set(reference, table)


# -- one engine run ------------------------------------------------------------------------------------


def test_engine_run_drops_exact_and_perceptual_duplicates_of_the_demo_web(tmp_path):
    import ray
    from rich.console import Console

    from curate.demo.server import LoopbackServer
    from curate.demo.web import build_synthetic_web, write_url_list
    from curate.engine.run import compile_plan, execute
    from curate.recipe import load_recipe

    assert {"dedup_exact", "dedup_perceptual", "dedup_semantic"} <= set(registry.STAGES)
    web = build_synthetic_web(n_images=120, seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "source: {type: url_list, path: urls.parquet}\n"
        "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, backoff_base: 0.01}\n"
        "  dedup_exact: {}\n  dedup_perceptual: {max_distance: 6}\n"
        "output: {path: out, formats: [parquet]}\nengine: {rows_per_work_shard: 25}\n")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        with LoopbackServer(web.routes) as server:
            write_url_list(web, server.base_url, tmp_path / "urls.parquet")
            plan = compile_plan(load_recipe(recipe, [f"output.path={tmp_path / 'out'}"]))
            manifest = execute(plan, Console(file=io.StringIO()), progress=False, overwrite=True)
            base = server.base_url.rstrip("/")
    finally:
        ray.shutdown()
    assert manifest["reconciliation"]["ok"]
    drops = pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()
    expect = {base + r["path"]: r["expect"] for r in web.rows if r["expect"] != "duplicate_url"}
    by_stage = {stage: [d for d in drops if d["stage"] == stage] for stage in ("dedup_exact", "dedup_perceptual")}
    assert {d["reason"] for d in by_stage["dedup_exact"]} == {"duplicate_exact"}
    assert len(by_stage["dedup_exact"]) == sum(r["expect"] == "duplicate_url" for r in web.rows)
    assert {d["reason"] for d in by_stage["dedup_perceptual"]} == {"duplicate_perceptual"}
    perceptual_urls = [d["url"] for d in by_stage["dedup_perceptual"]]
    near = sum(r["expect"] == "near_duplicate" for r in web.rows)
    print(f"\nengine: exact drops {len(by_stage['dedup_exact'])}, perceptual drops "
          f"{[expect[u] for u in perceptual_urls]} of {near} near duplicates")
    assert perceptual_urls and all(d["detail"].startswith("duplicate of ") for d in drops if d["stage"] != "fetch")
    decisions = manifest["decisions"]
    assert decisions["dedup_exact"]["method"] == "exact" and decisions["dedup_exact"]["removed"] == len(
        by_stage["dedup_exact"])
    assert decisions["dedup_perceptual"]["removed"] == len(perceptual_urls)
    assert decisions["dedup_perceptual"]["index"] == "IndexBinaryFlat"
    kept = pq.read_table(tmp_path / "out" / "parquet", columns=["key", "meta", "image_meta"]).to_pylist()
    url_of = {r["key"]: r["image_meta"][0]["url"] for r in kept}
    family = {base + r["path"]: base + (r["duplicate_of"] or r["path"]) for r in web.rows}
    for d in by_stage["dedup_perceptual"]:  # the kept sample is the same drawing (either may be the original)
        kept_key = d["detail"].removeprefix("duplicate of ").split(" ")[0]
        assert family[d["url"]] == family[url_of[kept_key]]
    grouped = [json.loads(r["meta"])["dedup"] for r in kept if r["meta"] and "dedup" in json.loads(r["meta"])]
    assert any("exact" in g for g in grouped) and any("perceptual" in g for g in grouped)
