"""Model stages split in two: `annotate` computes, `select` decides from the annotations alone.

For each stage: `select` over the annotated batch with every image's bytes removed drops exactly
what `process` drops over the full batch; a changed threshold changes the drops on a stage that
never loaded its model; faces blur in `transform`, never in `select`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image
from test_safety import table_of as batch_of  # pair samples with one image each and an `alt` caption

from curate import schema
from curate.models.clip import TINY_CLIP, ClipSpec
from curate.ops.aesthetic import AestheticParams, AestheticStage
from curate.ops.clip_score import ClipScoreParams, ClipScoreStage
from curate.ops.edit_direction import EditDirection
from curate.ops.image_text_assignment import ImageTextAssignment
from curate.safety.faces import FacesStage
from curate.safety.nsfw import NsfwParams, NsfwStage
from curate.safety.watermark import WatermarkParams, WatermarkStage
from curate.stage import Stage

DATA = Path(__file__).resolve().parent / "data"
SAFETY = DATA / "safety"
FACE_PHOTO = SAFETY / "000000497558.jpg"  # one frontal face
TENNIS_PHOTO = SAFETY / "000000419173.jpg"  # one frontal face; NudeNet finds FACE_FEMALE
JETS_PHOTO = SAFETY / "000000040870.jpg"  # no person
TINY = {"model": "curate-tiny"}
TINY_HEAD = {"head": "tiny"}
ADDRESS = re.compile(r"0x[0-9a-f]+")
SPLIT_STAGES = (ClipScoreStage, AestheticStage, WatermarkStage, NsfwStage, FacesStage, EditDirection)


def captioned_photos() -> pa.Table:
    """Real photos with their own captions, the same photos with another one's caption, and a broken image."""
    records = [json.loads(line) for line in (DATA / "captioned-images" / "captions.jsonl").read_text().splitlines()]
    images = [(DATA / "captioned-images" / r["file_name"]).read_bytes() for r in records]
    captions = [r["caption"] for r in records]
    images += [p.read_bytes() for p in (FACE_PHOTO, TENNIS_PHOTO, JETS_PHOTO)]
    captions += ["a woman sitting in a chair reading a magazine", "a woman in purple holding a tennis racquet",
                 "two jets tied down at an airport"]
    shuffled = captions[1:] + captions[:1]
    broken = images[0][: len(images[0]) // 3]
    return batch_of([*images, *images, broken], [*captions, *shuffled, captions[0]])


def without_bytes(batch: pa.Table) -> pa.Table:
    """`batch` with every `images[].bytes` null, as the engine hands it to `select`."""
    images = [[{**image, "bytes": None} if image else image for image in row or []] if row is not None else None
              for row in batch.column("images").to_pylist()]
    field = schema.SAMPLE_SCHEMA.field("images")
    return batch.set_column(batch.schema.get_field_index("images"), field, pa.array(images, field.type))


def drops(table: pa.Table) -> list[tuple[str | None, str | None]]:
    """(reason, detail) per row; object addresses in decoder errors blanked."""
    details = [ADDRESS.sub("0x", d) if d else d for d in table.column("drop_detail").to_pylist()]
    return list(zip(table.column("drop_reason").to_pylist(), details))


def scores(table: pa.Table, name: str) -> list[float | None]:
    return [(s or {}).get(name) for s in table.column("scores").to_pylist()]


def median_score(table: pa.Table, name: str) -> float:
    return float(np.median([s for s in scores(table, name) if s is not None]))


def build(cls: type[Stage], **params) -> Stage:
    return cls(cls.Params.model_validate(params))


def check_select_matches_process(cls: type[Stage], batch: pa.Table, annotated: pa.Table, **params) -> list:
    """`select` (a stage that never loaded its model) over `annotated` without bytes drops as `process` does."""
    expected = drops(build(cls, **params).process(batch))
    selector = build(cls, **params)
    selected = selector.select(without_bytes(annotated))
    assert drops(selected) == expected
    assert not hasattr(selector, "model") and getattr(selector, "detector", None) is None
    return expected


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("cls", [*SPLIT_STAGES, ImageTextAssignment])
def test_every_param_is_an_annotation_or_a_selection_param(cls):
    fields = set(cls.Params.model_fields)
    assert cls.annotation_params | cls.selection_params == fields
    assert not cls.annotation_params & cls.selection_params
    columns = set(schema.SAMPLE_SCHEMA.names) - {"key"}
    assert cls.reads <= columns and cls.provides <= columns and cls.provides
    assert cls.reads_images and cls.version == 1


def test_which_stages_split_their_steps():
    assert all(cls.splits_steps() for cls in SPLIT_STAGES)
    assert not ImageTextAssignment.splits_steps()  # removes images from documents: one step
    assert [cls.name for cls in (*SPLIT_STAGES, ImageTextAssignment) if cls.write_transform] == ["faces"]
    assert {"scores", "embeddings"} <= ClipScoreStage.provides


@pytest.mark.parametrize("stage", [
    ClipScoreStage(ClipScoreParams(model=TINY_CLIP)),
    AestheticStage(AestheticParams.model_validate({"clip": TINY, "head": TINY_HEAD})),
    WatermarkStage(WatermarkParams.model_validate({"clip": TINY, "head": TINY_HEAD})),
    NsfwStage(NsfwParams()),
], ids=lambda stage: stage.name)
def test_model_info_has_sha256_and_precision_before_any_model_loads(stage):
    fingerprint = stage.fingerprint()
    assert all(len(m["sha256"]) == 64 and m["precision"] == "fp32" for m in stage.model_info())
    assert fingerprint["precision"] == ["fp32"] and all(len(w) == 64 for w in fingerprint["weights"])
    assert not hasattr(stage, "model") and getattr(stage, "detector", None) is None


def test_model_info_of_unavailable_weights_is_partial_not_an_error(tmp_path):
    missing = ClipSpec(model="curate-tiny", checkpoint=str(tmp_path / "missing.pt"), precision="bf16")
    (info,) = ClipScoreStage(ClipScoreParams(model=missing)).model_info()
    assert info["sha256"] is None and info["precision"] == "bf16"


# --------------------------------------------------------------------------- CLIP score, aesthetic, watermark


@pytest.fixture(scope="module")
def photos() -> pa.Table:
    return captioned_photos()


def test_clip_score_select_from_annotations_drops_as_process(photos):
    annotated = build(ClipScoreStage, model=TINY).annotate(photos)
    assert set(annotated.column("drop_reason").to_pylist()) == {None, "corrupt"}  # hard drops only
    assert annotated.column("embeddings").null_count == 1  # the broken image's
    threshold = median_score(annotated, "clip_score")
    low = check_select_matches_process(ClipScoreStage, photos, annotated, model=TINY, min_score=threshold)
    high = check_select_matches_process(ClipScoreStage, photos, annotated, model=TINY, max_score=threshold)
    assert {r for r, _ in low} == {None, "corrupt", "clip_score_low"}
    assert {r for r, _ in high} == {None, "corrupt", "clip_score_high"}
    assert low != high


def test_aesthetic_select_from_annotations_drops_as_process(photos):
    annotated = build(AestheticStage, clip=TINY, head=TINY_HEAD).annotate(photos)
    assert set(annotated.column("drop_reason").to_pylist()) == {None, "corrupt"}
    threshold = median_score(annotated, "aesthetic")
    low = check_select_matches_process(AestheticStage, photos, annotated, clip=TINY, head=TINY_HEAD,
                                       min_score=threshold)
    high = check_select_matches_process(AestheticStage, photos, annotated, clip=TINY, head=TINY_HEAD,
                                        max_score=threshold)
    assert "aesthetic_low" in {r for r, _ in low} and "aesthetic_high" in {r for r, _ in high}


def test_watermark_select_from_annotations_drops_as_process(photos):
    annotated = build(WatermarkStage, clip=TINY, head=TINY_HEAD).annotate(photos)
    assert set(annotated.column("drop_reason").to_pylist()) == {None, "corrupt"}
    values = sorted({s for s in scores(annotated, "watermark") if s is not None})
    strict = check_select_matches_process(WatermarkStage, photos, annotated, clip=TINY, head=TINY_HEAD,
                                          max_score=float(np.median(values)))
    lenient = check_select_matches_process(WatermarkStage, photos, annotated, clip=TINY, head=TINY_HEAD,
                                           max_score=(values[-1] + values[-2]) / 2)
    assert sum(r == "watermark" for r, _ in strict) > sum(r == "watermark" for r, _ in lenient) >= 1


# --------------------------------------------------------------------------- nsfw


def test_nsfw_annotate_records_the_caption_screen_and_select_drops_as_process():
    data = [p.read_bytes() for p in (FACE_PHOTO, TENNIS_PHOTO, JETS_PHOTO)]
    captions = ["a photo", "a photo", "a photo", "Free XXX-rated clips here", "a photo"]
    batch = batch_of([*data, data[2], data[2][:200]], captions)
    params = {"classes": ["FACE_FEMALE"], "max_score": 0.5}
    annotated = build(NsfwStage, **params).annotate(batch)
    assert annotated.column("drop_reason").to_pylist() == [None, None, None, None, "corrupt"]  # hard drops only
    metas = [json.loads(m) if m else None for m in annotated.column("meta").to_pylist()]
    assert set(metas[3]) == {"nsfw_caption"} and metas[3]["nsfw_caption"]["list"] == "bundled list"
    assert "xxx" not in json.dumps(metas[3]).lower()  # the list and entry, never the text
    assert scores(annotated, "nsfw")[3] is None  # screened: the detector was skipped
    assert metas[1]["nsfw"] == {"class": "FACE_FEMALE", "image": 0}
    strict = check_select_matches_process(NsfwStage, batch, annotated, **params)
    assert [r for r, _ in strict] == [None, "nsfw", None, "nsfw_caption", "corrupt"]
    assert "FACE_FEMALE, image 0" in strict[1][1]
    lenient = check_select_matches_process(NsfwStage, batch, annotated, **{**params, "max_score": 0.99})
    assert [r for r, _ in lenient] == [None, None, None, "nsfw_caption", "corrupt"]


# --------------------------------------------------------------------------- faces


def png_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def face_batch() -> pa.Table:
    return batch_of([png_bytes(FACE_PHOTO), png_bytes(JETS_PHOTO), png_bytes(TENNIS_PHOTO), b"broken"],
                    ["a photo"] * 4, fmt="png")


def test_faces_select_from_annotations_drops_as_process(face_batch):
    annotated = build(FacesStage).annotate(face_batch)
    assert annotated.column("drop_reason").to_pylist() == [None, None, None, "corrupt"]
    boxes = [json.loads(m)["faces"] if m else None for m in annotated.column("meta").to_pylist()]
    assert len(boxes[0][0]) == 1 and boxes[1] == [[]] and boxes[3] is None
    sizes = [(m[0]["width"], m[0]["height"]) for m in annotated.column("image_meta").to_pylist()[:3]]
    assert sizes[0] == Image.open(FACE_PHOTO).size
    counted = check_select_matches_process(FacesStage, face_batch, annotated, max_faces=0)
    assert [r for r, _ in counted] == ["faces", None, "faces", "corrupt"]
    covering = check_select_matches_process(FacesStage, face_batch, annotated, max_face_fraction=0.01)
    assert covering[0][0] == "faces" and "a face covers" in covering[0][1]
    loose = check_select_matches_process(FacesStage, face_batch, annotated, max_face_fraction=0.9)
    assert [r for r, _ in loose] == [None, None, None, "corrupt"]


def test_faces_blur_at_transform_only(face_batch):
    stage = build(FacesStage, blur=True, max_faces=1)
    annotated = stage.annotate(face_batch)
    selected = stage.select(annotated)
    assert selected.column("images").to_pylist() == face_batch.column("images").to_pylist()  # select blurs nothing
    assert all("faces_blurred" not in (m or "") for m in selected.column("meta").to_pylist())
    kept = selected.filter(pc.is_null(selected.column("drop_reason"))).drop_columns(
        ["drop_reason", "drop_detail"])
    writer = build(FacesStage, blur=True, max_faces=1)  # at the write: a stage that never loaded its detector
    written = writer.transform(kept)
    assert writer.detector is None
    before, after = kept.column("images").to_pylist(), written.column("images").to_pylist()
    metas = [json.loads(m) for m in written.column("meta").to_pylist()]
    for old, new, meta, image_meta in zip(before, after, metas, written.column("image_meta").to_pylist()):
        found = bool(meta["faces"][0])
        assert (new[0]["bytes"] != old[0]["bytes"]) == found
        assert meta["faces_blurred"] == int(found)
        assert image_meta[0]["num_bytes"] == len(new[0]["bytes"])
    assert sum(m["faces_blurred"] for m in metas) == 2
    assert writer.take_counters() == {"images_blurred": 2}
    processed = build(FacesStage, blur=True, max_faces=1).process(face_batch)
    kept_processed = processed.filter(pc.is_null(processed.column("drop_reason")))
    assert kept_processed.column("images").to_pylist() == after
    assert kept_processed.column("meta").to_pylist() == written.column("meta").to_pylist()


# --------------------------------------------------------------------------- edit direction


def test_edit_direction_select_from_annotations_drops_as_process():
    rows = []
    for index, folder in enumerate(sorted((DATA / "edit-triplets" / "ip2p").iterdir())):
        if not folder.is_dir():
            continue
        source, target = sorted(folder.glob("*_[01].jpg"))
        instruction = json.loads((folder / "prompt.json").read_text())["edit"]
        rows.append({"key": f"edit-{index}", "kind": "edit",
                     "images": [{"bytes": p.read_bytes(), "path": None} for p in (source, target)],
                     "image_meta": [{"format": "jpg"}] * 2,
                     "segments": [{"text": None, "image": 0}, {"text": instruction, "image": None},
                                  {"text": None, "image": 1}]})
    rows.append({**rows[0], "key": "broken", "images": [rows[0]["images"][0], {"bytes": b"broken", "path": None}]})
    batch = schema.from_rows(rows)
    annotated = build(EditDirection, model=TINY).annotate(batch)
    assert annotated.column("drop_reason").to_pylist()[-1] == "corrupt"
    values = [s for s in scores(annotated, "clip_direction") if s is not None]
    assert len(values) == len(rows) - 1
    over = check_select_matches_process(EditDirection, batch, annotated, model=TINY, min_score=max(values) + 0.01)
    under = check_select_matches_process(EditDirection, batch, annotated, model=TINY, min_score=min(values) - 0.01)
    assert [r for r, _ in over] == ["edit_inconsistent"] * (len(rows) - 1) + ["corrupt"]
    assert [r for r, _ in under] == [None] * (len(rows) - 1) + ["corrupt"]
