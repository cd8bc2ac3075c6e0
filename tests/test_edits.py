"""Edit triplets: sources of every cell kind and layout, the edit checks, the CLIP direction score, and a
real InstructPix2Pix round trip through the engine."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.server import Route
from curate.demo.web import Scene, draw_scene
from curate.edit_sample import read_turns, turns_from_segments
from curate.engine.run import compile_plan, execute
from curate.fetch.config import FetchParams
from curate.fetch.stage import FetchStage
from curate.ops.edit_checks import EditChecks
from curate.ops.edit_direction import EditDirection
from curate.recipe import load_recipe
from curate.sinks.wds_record import row_from_record
from curate.sources.edits import EditTripletSource
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
IP2P = Path(__file__).resolve().parent / "data" / "edit-triplets" / "ip2p"
EDIT_RECIPE = REPO / "pipelines" / "edit.yaml"
REAL = {  # id -> (source file, edited file, instruction), from tests/data/edit-triplets
    "0000132/127380018": ("0000132/127380018_0.jpg", "0000132/127380018_1.jpg", "Make it look like a painting"),
    "0000145/1696064930": ("0000145/1696064930_0.jpg", "0000145/1696064930_1.jpg",
                           "make the painting into a mosaic"),
}
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def real(name: str) -> bytes:
    return (IP2P / name).read_bytes()


def source(path: Path, **params) -> EditTripletSource:
    src = EditTripletSource(EditTripletSource.Params(path=str(path), **params))
    src.preflight()
    return src


def read_all(src: EditTripletSource, batch_rows: int = 3) -> list[dict]:
    return pa.concat_tables(list(src.iter_batches(batch_rows))).to_pylist()


def kept(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["drop_reason"] is None]


def images_of(row: dict) -> list[bytes]:
    return [image["bytes"] for image in row["images"]]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def jpeg(data: bytes, quality: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def as_samples(rows: list[dict]) -> pa.Table:
    return schema.from_rows([{k: v for k, v in row.items() if k in schema.SAMPLE_SCHEMA.names} for row in rows])


def run_checks(rows: list[dict], **params) -> list[dict]:
    stage = EditChecks(EditChecks.Params(**params))
    try:
        return stage.process(as_samples(rows)).to_pylist()
    finally:
        stage.teardown()


# ---------------------------------------------------------------- sources


def test_ip2p_folders_become_edit_triplets_with_the_instruction_intact():
    rows = read_all(source(IP2P, layout="instructpix2pix"))
    assert [row["source"]["id"] for row in rows] == list(REAL)
    for row in rows:
        source_file, edited_file, instruction = REAL[row["source"]["id"]]
        assert row["kind"] == "edit" and row["drop_reason"] is None
        assert images_of(row) == [real(source_file), real(edited_file)]
        assert row["segments"] == [{"text": None, "image": 0}, {"text": instruction, "image": None},
                                   {"text": None, "image": 1}]
        assert [m["sha256"] for m in row["image_meta"]] == [hashlib.sha256(real(f)).hexdigest()
                                                            for f in (source_file, edited_file)]
        assert [(m["format"], m["width"], m["height"]) for m in row["image_meta"]] == [("jpg", 512, 512)] * 2
        meta = json.loads(row["meta"])
        assert meta["edit"]["turns"] == [{"input": 0, "output": 1, "mask": None, "instructions": [instruction]}]
        assert meta["prompt_dir"] == source_file.split("/")[0]


def test_image_cells_as_hf_structs_bytes_paths_and_urls(tmp_path):
    (tmp_path / "imgs").mkdir()
    shutil.copy(IP2P / "0000132/127380018_0.jpg", tmp_path / "imgs" / "a.jpg")
    source_bytes, target_bytes = real("0000132/127380018_0.jpg"), real("0000132/127380018_1.jpg")
    table = pa.table({
        "src_img": pa.array([{"bytes": source_bytes, "path": None}, {"bytes": None, "path": "imgs/a.jpg"},
                             {"bytes": None, "path": str(tmp_path / "imgs" / "a.jpg")},
                             {"bytes": None, "path": "https://example.org/a.jpg"}], HF_IMAGE),
        "edited_img": pa.array([{"bytes": target_bytes, "path": "x.jpg"}] * 4, HF_IMAGE),
        "edited_prompt_list": [["make it a painting", "paint it"], ["paint it"], ["  "," paint it "], ["paint it"]],
        "omni_edit_id": ["a", "b", "c", "d"],
        "task": ["style"] * 4,
    })
    pq.write_table(table, tmp_path / "omni.parquet")
    rows = read_all(source(tmp_path / "omni.parquet", layout="omniedit"))
    assert [row["drop_reason"] for row in rows] == [None] * 4
    assert [images_of(row)[0] for row in rows[:3]] == [source_bytes] * 3
    assert rows[3]["images"][0]["bytes"] is None and rows[3]["image_meta"][0]["url"] == "https://example.org/a.jpg"
    assert [json.loads(row["meta"])["edit"]["turns"][0]["instructions"] for row in rows] == [
        ["make it a painting", "paint it"], ["paint it"], ["paint it"], ["paint it"]]
    assert rows[0]["segments"][1]["text"] == "make it a painting"
    assert [row["source"]["id"] for row in rows] == ["a", "b", "c", "d"]
    assert json.loads(rows[0]["meta"])["task"] == "style"

    raw = pa.table({"before": [source_bytes], "after": [target_bytes], "text": ["paint it"]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    columns = {"source_image": "before", "target_image": "after", "instruction": "text"}
    [row] = read_all(source(tmp_path / "raw.parquet", columns=columns))
    assert images_of(row) == [source_bytes, target_bytes]


def test_seeds_json_lists_the_ip2p_seeds_to_read(tmp_path):
    shutil.copytree(IP2P, tmp_path / "ip2p")
    (tmp_path / "ip2p" / "seeds.json").write_text(json.dumps([["0000145", ["1696064930", "404"]]]))
    rows = read_all(source(tmp_path / "ip2p", layout="instructpix2pix"))
    assert [(row["source"]["id"], row["drop_reason"]) for row in rows] == [
        ("0000145/1696064930", None), ("0000145/404", "edit_missing_image")]


def test_url_cells_are_left_to_the_fetch_stage(tmp_path, loopback):
    source_bytes, target_bytes = real("0000145/1696064930_0.jpg"), real("0000145/1696064930_1.jpg")
    loopback.routes["/target.jpg"] = Route(body=target_bytes)
    (tmp_path / "src.jpg").write_bytes(source_bytes)
    line = {"src": "src.jpg", "tgt": loopback.url("/target.jpg"), "edit": "make the painting into a mosaic"}
    (tmp_path / "edits.jsonl").write_text(json.dumps(line) + "\n")
    columns = {"source_image": "src", "target_image": "tgt", "instruction": "edit"}
    rows = read_all(source(tmp_path / "edits.jsonl", columns=columns))
    assert rows[0]["images"][1]["bytes"] is None
    assert run_checks(rows)[0]["drop_reason"] == "edit_missing_image"
    fetch = FetchStage(FetchParams(allow_private_addresses=True, threads=2, retries=0,
                                   resize={"mode": "none"}, encode={"format": "png"}))
    try:
        fetched = fetch.process(as_samples(rows)).to_pylist()
    finally:
        fetch.teardown()
    assert fetched[0]["images"][0]["bytes"] == source_bytes  # had bytes: kept as it was
    assert fetched[0]["image_meta"][1]["sha256"] == hashlib.sha256(target_bytes).hexdigest()
    assert fetched[0]["image_meta"][1]["format"] == "png"
    checked = run_checks([{k: v for k, v in fetched[0].items() if k not in ("drop_reason", "drop_detail")}])
    assert checked[0]["drop_reason"] is None


def test_datasets_saved_to_disk_with_splits(tmp_path):
    first = {"original_image": [{"bytes": real("0000132/127380018_0.jpg"), "path": None}],
             "edited_image": [{"bytes": real("0000132/127380018_1.jpg"), "path": None}],
             "edit_prompt": ["Make it look like a painting"], "original_prompt": ["a lake"],
             "edited_prompt": ["a painting of a lake"]}
    split = datasets.Dataset.from_dict(first).cast_column("original_image", datasets.Image()).cast_column(
        "edited_image", datasets.Image())
    datasets.DatasetDict({"train": split, "dev": split}).save_to_disk(str(tmp_path / "ip2p_hf"))
    with pytest.raises(RecipeError, match="train, dev"):
        source(tmp_path / "ip2p_hf", layout="instructpix2pix")
    [row] = read_all(source(tmp_path / "ip2p_hf", layout="instructpix2pix", split="dev"))
    assert images_of(row) == [real("0000132/127380018_0.jpg"), real("0000132/127380018_1.jpg")]
    assert row["captions"] == [{"name": "source", "text": "a lake"}, {"name": "target", "text": "a painting of a lake"}]
    assert row["segments"][1]["text"] == "Make it look like a painting"


def magicbrush_rows(masks: bool = True) -> list[dict]:
    """Two sessions: 7001 with turns listed 2, 1 (out of order), 7002 with one turn."""
    s0 = png(draw_scene(Scene(2, "red", "circle", "blue"), 64, 48, 1))
    s1 = png(draw_scene(Scene(2, "green", "circle", "blue"), 64, 48, 1))
    s2 = png(draw_scene(Scene(2, "green", "square", "blue"), 64, 48, 1))
    other = png(draw_scene(Scene(1, "yellow", "star", "black"), 64, 48, 2))
    other_out = png(draw_scene(Scene(1, "orange", "star", "black"), 64, 48, 2))
    mask = png(Image.new("L", (64, 48), 255)) if masks else None
    image = lambda data: None if data is None else {"bytes": data, "path": None}  # noqa: E731
    return [
        {"img_id": "7001", "turn_index": 2, "source_img": image(s1), "mask_img": image(mask),
         "instruction": "turn the circles into squares", "target_img": image(s2)},
        {"img_id": "7001", "turn_index": 1, "source_img": image(s0), "mask_img": image(mask),
         "instruction": "make the circles green", "target_img": image(s1)},
        {"img_id": "7002", "turn_index": 1, "source_img": image(other), "mask_img": image(mask),
         "instruction": "make the star orange", "target_img": image(other_out)},
    ]


def write_magicbrush(path: Path, rows: list[dict]) -> Path:
    schema_ = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", HF_IMAGE),
                         ("mask_img", HF_IMAGE), ("instruction", pa.string()), ("target_img", HF_IMAGE)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_), path)
    return path


def test_a_magicbrush_session_stays_one_chain(tmp_path):
    rows = magicbrush_rows()
    samples = read_all(source(write_magicbrush(tmp_path / "mb.parquet", rows), layout="magicbrush"))
    assert [s["source"]["id"] for s in samples] == ["7001", "7002"]
    chain = samples[0]
    first, second = rows[1], rows[0]
    assert images_of(chain) == [first["source_img"]["bytes"], first["target_img"]["bytes"],
                                second["target_img"]["bytes"], first["mask_img"]["bytes"], second["mask_img"]["bytes"]]
    assert chain["segments"] == [{"text": None, "image": 0}, {"text": "make the circles green", "image": None},
                                 {"text": None, "image": 1}, {"text": "turn the circles into squares", "image": None},
                                 {"text": None, "image": 2}]
    turns = json.loads(chain["meta"])["edit"]["turns"]
    assert [(t["input"], t["output"], t["mask"], t["turn"]) for t in turns] == [(0, 1, 3, 1), (1, 2, 4, 2)]
    assert [t.instruction for t in read_turns(chain["segments"], chain["meta"])] == [
        "make the circles green", "turn the circles into squares"]
    checked = run_checks(samples)
    assert [row["drop_reason"] for row in checked] == [None, None]
    assert all(t["change"] > 1 for t in json.loads(checked[0]["meta"])["edit"]["turns"])


def test_a_turn_whose_input_is_not_the_previous_output_keeps_its_own_input(tmp_path):
    rows = magicbrush_rows(masks=False)
    rows[0]["source_img"] = rows[2]["source_img"]  # turn 2 starts from another picture
    chain = read_all(source(write_magicbrush(tmp_path / "mb.parquet", rows), layout="magicbrush"))[0]
    assert images_of(chain) == [rows[1]["source_img"]["bytes"], rows[1]["target_img"]["bytes"],
                                rows[2]["source_img"]["bytes"], rows[0]["target_img"]["bytes"]]
    turns = json.loads(chain["meta"])["edit"]["turns"]
    assert [(t["input"], t["output"], t["mask"]) for t in turns] == [(0, 1, None), (2, 3, None)]
    assert [s["image"] for s in chain["segments"]] == [0, None, 1, 2, None, 3]


def test_broken_chains_are_dropped_with_their_reason(tmp_path):
    rows = magicbrush_rows()
    split = [rows[0], rows[2], rows[1]]  # 7001, 7002, 7001 again
    samples = read_all(source(write_magicbrush(tmp_path / "split.parquet", split), layout="magicbrush"))
    assert [(s["source"]["id"], s["drop_reason"]) for s in samples] == [
        ("7001", None), ("7002", None), ("7001", "edit_chain_broken")]
    assert "not contiguous" in samples[2]["drop_detail"]
    repeated = [rows[1], dict(rows[1]), rows[2]]
    samples = read_all(source(write_magicbrush(tmp_path / "repeat.parquet", repeated), layout="magicbrush"))
    assert [s["drop_reason"] for s in samples] == ["edit_chain_broken", None]
    assert "repeated turns" in samples[0]["drop_detail"]


def test_unusable_rows_are_source_drops(tmp_path):
    (tmp_path / "a.jpg").write_bytes(real("0000132/127380018_0.jpg"))
    (tmp_path / "b.jpg").write_bytes(real("0000132/127380018_1.jpg"))
    (tmp_path / "not-an-image.jpg").write_bytes(b"<html>no</html>")
    lines = [
        {"src": "a.jpg", "tgt": "b.jpg", "edit": "paint it"},
        {"src": "a.jpg", "tgt": None, "edit": "paint it"},
        {"src": "a.jpg", "tgt": "missing.jpg", "edit": "paint it"},
        {"src": "not-an-image.jpg", "tgt": "b.jpg", "edit": "paint it"},
        {"src": "a.jpg", "tgt": "b.jpg", "edit": "   "},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n{not json\n" + "\n".join(
        json.dumps(line) for line in lines[2:]) + "\n"
    (tmp_path / "edits.jsonl").write_text(text)
    columns = {"source_image": "src", "target_image": "tgt", "instruction": "edit"}
    rows = read_all(source(tmp_path / "edits.jsonl", columns=columns), batch_rows=2)
    assert [row["drop_reason"] for row in rows] == [None, "edit_missing_image", "bad_input_row",
                                                    "edit_missing_image", "corrupt", "edit_missing_instruction"]
    assert "target image ('tgt')" in rows[1]["drop_detail"]
    assert "missing.jpg" in rows[3]["drop_detail"]
    assert len({row["key"] for row in rows}) == len(rows)


def test_preflight_names_the_missing_column_and_the_unknown_format(tmp_path):
    pq.write_table(pa.table({"src_img": [b"x"], "edited_img": [b"y"]}), tmp_path / "omni.parquet")
    with pytest.raises(RecipeError, match="edited_prompt_list") as error:
        source(tmp_path / "omni.parquet", layout="omniedit")
    assert error.value.path == "source.columns.instruction"
    with pytest.raises(RecipeError, match="source.columns.instruction|no column for the instruction"):
        source(tmp_path / "omni.parquet", columns={"source_image": "src_img", "target_image": "edited_img"})
    (tmp_path / "edits.csv").write_text("a,b\n")
    with pytest.raises(RecipeError, match="cannot tell the format"):
        source(tmp_path / "edits.csv")
    with pytest.raises(RecipeError, match="not found"):
        source(tmp_path / "absent.parquet", layout="omniedit")


# ---------------------------------------------------------------- checks


def real_triplet(source_bytes: bytes, target_bytes: bytes | None, key: str, url: str | None = None) -> dict:
    return {"key": key, "kind": "edit",
            "images": [{"bytes": source_bytes, "path": None}, {"bytes": target_bytes, "path": None}],
            "image_meta": [{"format": "jpg"}, {"format": "jpg", "url": url}],
            "segments": [{"text": None, "image": 0}, {"text": "Make it look like a painting", "image": None},
                         {"text": None, "image": 1}],
            "captions": [], "roles": [], "meta": json.dumps({"prompt_dir": "0000132"})}


def test_identical_and_nearly_identical_targets_are_dropped():
    source_bytes = real("0000132/127380018_0.jpg")
    rows = [
        real_triplet(source_bytes, real("0000132/127380018_1.jpg"), "real"),
        real_triplet(source_bytes, source_bytes, "copy"),
        real_triplet(source_bytes, jpeg(source_bytes, 90), "reencoded"),
        real_triplet(source_bytes, png(Image.open(io.BytesIO(source_bytes))), "same-pixels"),
    ]
    checked = {row["key"]: row for row in run_checks(rows)}
    assert checked["real"]["drop_reason"] is None
    change = json.loads(checked["real"]["meta"])["edit"]["turns"][0]["change"]
    assert 15 < change < 40
    assert json.loads(checked["real"]["meta"])["prompt_dir"] == "0000132"
    for key in ("copy", "same-pixels"):
        assert checked[key]["drop_reason"] == "edit_identical"
        assert "the same pixels" in checked[key]["drop_detail"]
    assert checked["reencoded"]["drop_reason"] == "edit_identical"
    assert "min_change 1.0" in checked["reencoded"]["drop_detail"]
    assert run_checks([rows[2]], min_change=0.0)[0]["drop_reason"] is None


def test_missing_and_undecodable_images_are_dropped():
    source_bytes, target_bytes = real("0000132/127380018_0.jpg"), real("0000132/127380018_1.jpg")
    rows = [
        real_triplet(source_bytes, None, "url-only", url="https://example.org/t.jpg"),
        real_triplet(source_bytes, target_bytes[: len(target_bytes) // 3], "truncated"),
        {**real_triplet(source_bytes, target_bytes, "one-image"), "segments": [{"text": None, "image": 0}]},
        {**real_triplet(source_bytes, target_bytes, "pair"), "kind": "pair"},
    ]
    checked = {row["key"]: row for row in run_checks(rows)}
    assert checked["url-only"]["drop_reason"] == "edit_missing_image"
    assert "add the fetch stage" in checked["url-only"]["drop_detail"]
    assert checked["truncated"]["drop_reason"] == "corrupt"
    assert "target image (image 1)" in checked["truncated"]["drop_detail"]
    assert checked["one-image"]["drop_reason"] == "edit_missing_image"
    assert checked["pair"]["drop_reason"] is None and checked["pair"]["meta"] == rows[3]["meta"]


def test_turns_read_from_segments_when_meta_has_none():
    segments = [{"text": None, "image": 0}, {"text": "a", "image": None}, {"text": "b", "image": None},
                {"text": None, "image": 1}, {"text": None, "image": 2}, {"text": "c", "image": None},
                {"text": None, "image": 3}]
    turns = turns_from_segments(segments)
    assert [(t.input, t.output, t.instructions) for t in turns] == [(0, 1, ["a b"]), (2, 3, ["c"])]


# ---------------------------------------------------------------- CLIP direction


def scene_edit(key: str, before: Scene, after: Scene, captions: tuple[str, str]) -> dict:
    images = [png(draw_scene(scene, 96, 72, 3)) for scene in (before, after)]
    return {"key": key, "kind": "edit", "images": [{"bytes": data, "path": None} for data in images],
            "image_meta": [{"format": "png"}] * 2,
            "segments": [{"text": None, "image": 0}, {"text": "change it", "image": None}, {"text": None, "image": 1}],
            "captions": [{"name": "source", "text": captions[0]}, {"name": "target", "text": captions[1]}],
            "roles": [], "meta": None}


def test_clip_direction_follows_the_caption_change_and_drops_the_reverse():
    before, after = Scene(3, "white", "triangle", "purple"), Scene(3, "orange", "triangle", "purple")
    rows = [scene_edit("consistent", before, after, (before.caption(), after.caption())),
            scene_edit("reversed", before, after, (after.caption(), before.caption()))]
    stage = EditDirection(EditDirection.Params(min_score=0.0))
    stage.preflight()
    try:
        out = {row["key"]: row for row in stage.process(as_samples(rows)).to_pylist()}
    finally:
        stage.teardown()
    consistent, reversed_ = out["consistent"], out["reversed"]
    assert consistent["drop_reason"] is None and consistent["scores"]["clip_direction"] > 0.3
    assert reversed_["drop_reason"] == "edit_inconsistent"
    assert reversed_["scores"]["clip_direction"] == pytest.approx(-consistent["scores"]["clip_direction"], abs=1e-4)
    turn = json.loads(consistent["meta"])["edit"]["turns"][0]
    assert turn["clip_direction"] == pytest.approx(consistent["scores"]["clip_direction"], abs=1e-4)
    assert turn["instructions"] == ["change it"]


# ---------------------------------------------------------------- end to end, real InstructPix2Pix samples


@pytest.fixture(scope="module")
def ip2p_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip2p")
    data = folder / "ip2p"
    shutil.copytree(IP2P, data)
    (data / "9999999").mkdir()  # a triplet whose edited image is its source: must be dropped
    shutil.copy(IP2P / "0000145/1696064930_0.jpg", data / "9999999" / "42_0.jpg")
    shutil.copy(IP2P / "0000145/1696064930_0.jpg", data / "9999999" / "42_1.jpg")
    (data / "9999999" / "prompt.json").write_text(json.dumps({"edit": "do nothing"}))
    loaded = load_recipe(EDIT_RECIPE, [f"source.path={data}", f"output.path={folder / 'out'}"])
    manifest = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)
    return folder / "out", manifest


def test_real_ip2p_triplets_round_trip_through_the_engine(ip2p_run, tmp_path):
    output, manifest = ip2p_run
    totals = manifest["reconciliation"]
    assert (totals["ok"], totals["input_rows"], totals["output_rows"], totals["dropped_rows"]) == (True, 3, 2, 1)
    assert manifest["drop_log"]["by_reason"] == {"edit_identical": 1}
    [drop] = pq.read_table(output / "drops.parquet").to_pylist()
    assert (drop["stage"], drop["reason"]) == ("edit_checks", "edit_identical")
    assert manifest["kinds"] == {"edit": 2} and manifest["images"] == {"total": 4, "by_kind": {"edit": 4}}
    assert manifest["statistics"]["clip_direction"]["count"] == 2

    stored = pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()
    assert sorted(row["source"]["id"] for row in stored) == sorted(REAL)
    for row in stored:
        source_file, edited_file, instruction = REAL[row["source"]["id"]]
        assert images_of(row) == [real(source_file), real(edited_file)]
        assert row["segments"][1]["text"] == instruction
        assert row["scores"]["clip_direction"] is not None
        turn = json.loads(row["meta"])["edit"]["turns"][0]
        assert turn["instructions"] == [instruction] and turn["change"] > 15

    from_parquet = datasets.load_dataset("parquet", data_files=[str(p) for p in (output / "parquet").glob("*")],
                                         split="train", cache_dir=str(tmp_path / "hf-parquet"))
    for row, hf_row in zip(stored, from_parquet):
        assert [im.size for im in hf_row["images"]] == [(512, 512), (512, 512)]
        assert hf_row["segments"] == row["segments"] and hf_row["meta"] == row["meta"]

    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    from_wds = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode())
    from_hf = list(datasets.load_dataset("webdataset", data_files=tars, split="train",
                                         cache_dir=str(tmp_path / "hf-wds")))
    for row, wds_sample, hf_sample in zip(stored, from_wds, from_hf):
        expected = {k: v for k, v in row.items() if k != "embeddings"}
        assert wds_sample["__key__"] == hf_sample["__key__"] == row["key"]
        assert wds_sample["images.mp"] == hf_sample["images.mp"] == images_of(row)
        assert wds_sample["json"] == hf_sample["json"]
        assert row_from_record(wds_sample["json"], images_of(row)) == expected
        assert wds_sample["txt"] == hf_sample["txt"] == REAL[row["source"]["id"]][2]
