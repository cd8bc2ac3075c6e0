"""WebDataset layout of samples with several images: packed per sample, read back whole by webdataset and datasets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.web import COLOURS, SHAPES, Scene, draw_scene
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe
from curate.sinks.parquet import ParquetSink
from curate.sinks.wds_record import row_from_record
from curate.sinks.webdataset import WebDatasetSink, packed_features

REPO = Path(__file__).resolve().parent.parent
EDIT_RECIPE = REPO / "pipelines" / "edit.yaml"


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def scene_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    """A drawn scene, different for every seed."""
    colours = [c for c in COLOURS if c != "white"]
    scene = Scene(1 + seed % 3, colours[seed % len(colours)], SHAPES[seed % len(SHAPES)], "white")
    out = io.BytesIO()
    draw_scene(scene, *size, layout_seed=seed).save(out, fmt)
    return out.getvalue()


def multi_image_sample(i: int, kind: str, n_images: int) -> dict:
    """A sample of `kind` with `n_images` images (jpg and png alternating) between text segments."""
    images, metas, segments = [], [], []
    for j in range(n_images):
        fmt = "jpg" if j % 2 == 0 else "png"
        data = scene_bytes(100 * i + j, {"jpg": "JPEG", "png": "PNG"}[fmt])
        images.append({"bytes": data, "path": None})
        metas.append({"width": 48, "height": 40, "format": fmt, "num_bytes": len(data)})
        if j:
            segments.append({"text": f"step {j} of sample {i}", "image": None})
        segments.append({"text": None, "image": j})
    return {
        "key": f"{i:016x}",
        "kind": kind,
        "images": images,
        "image_meta": metas,
        "segments": segments,
        "captions": [],
        "scores": None,
        "roles": [],
        "source": {"dataset": "layout-test", "id": str(i), "url": None, "license": None},
        "meta": json.dumps({"row": i}),
    }


def pair_sample(i: int) -> dict:
    data = scene_bytes(i, "JPEG")
    return {
        "key": f"{1000 + i:016x}",
        "kind": "pair",
        "images": [{"bytes": data, "path": None}],
        "image_meta": [{"width": 48, "height": 40, "format": "jpg", "num_bytes": len(data)}],
        "segments": [{"text": None, "image": 0}, {"text": f"pair {i}", "image": None}],
        "captions": [{"name": "alt", "text": f"pair {i}"}],
        "scores": None,
        "roles": [],
        "source": {"dataset": "layout-test", "id": str(i), "url": None, "license": None},
        "meta": None,
    }


def write_tar(path: Path, rows: list[dict], **params) -> int:
    return WebDatasetSink(WebDatasetSink.Params(**params)).write([schema.from_rows(rows)], str(path))


def stored_row(row: dict) -> dict:
    """`row` as Parquet stores it, without embeddings; NaN scores read as not computed."""
    stored = schema.from_rows([row]).to_pylist()[0]
    del stored["embeddings"]
    if stored["scores"] is not None:
        stored["scores"] = {k: None if v is None or np.isnan(v) else v for k, v in stored["scores"].items()}
        if all(v is None for v in stored["scores"].values()):
            stored["scores"] = None
    return stored


def rebuilt(record: dict, images: list[bytes]) -> dict:
    """The sample row a `.json` record and the image bytes stand for."""
    return row_from_record(record, images)


def load_hf_webdataset(path: Path | list[str], tmp_path: Path, **kwargs) -> datasets.Dataset:
    files = [str(path)] if isinstance(path, Path) else path
    return datasets.load_dataset("webdataset", data_files=files, split="train",
                                 cache_dir=str(tmp_path / "hf"), **kwargs)


# ---------------------------------------------------------------- sink level


@pytest.mark.parametrize("kind", ["edit", "interleaved"])
def test_sixth_sample_with_more_images_reads_back_whole(tmp_path, kind):
    rows = [multi_image_sample(i, kind, 2) for i in range(5)] + [multi_image_sample(5, kind, 5)]
    path = tmp_path / "shard.tar"
    assert write_tar(path, rows) == 6

    from_hf = load_hf_webdataset(path, tmp_path)
    assert len(from_hf) == 6
    assert from_hf.features["images.mp"] == datasets.List(datasets.Value("binary"))
    from_wds = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode())
    assert len(from_wds) == 6
    for row, hf_sample, wds_sample in zip(rows, from_hf, from_wds):
        written = [image["bytes"] for image in row["images"]]
        assert hf_sample["__key__"] == wds_sample["__key__"] == row["key"]
        assert hf_sample["images.mp"] == written
        assert wds_sample["images.mp"] == written
        assert hf_sample["json"] == wds_sample["json"]
        assert rebuilt(wds_sample["json"], written) == stored_row(row)
        texts = [s["text"] for s in row["segments"] if s["text"]]
        expected_text = "\n\n".join(texts) if kind == "interleaved" else texts[0]
        assert hf_sample["txt"] == wds_sample["txt"] == expected_text
    sixth = from_wds[5]
    decoded = [Image.open(io.BytesIO(data)) for data in sixth["images.mp"]]
    assert [im.format for im in decoded] == [m["format"].replace("jpg", "jpeg").upper()
                                             for m in sixth["json"]["image_meta"]]


def test_member_layout_refuses_a_varying_image_count_and_names_the_fix(tmp_path):
    rows = [multi_image_sample(i, "edit", 2) for i in range(5)] + [multi_image_sample(5, "edit", 3)]
    with pytest.raises(ValueError, match=f"{5:016x}.*layout: packed"):
        write_tar(tmp_path / "shard.tar", rows, layout="members")


def test_pairs_keep_the_member_layout_that_clip_loaders_read(tmp_path):
    rows = [pair_sample(i) for i in range(3)]
    auto, members = tmp_path / "auto.tar", tmp_path / "members.tar"
    write_tar(auto, rows)
    write_tar(members, rows, layout="members")
    assert auto.read_bytes() == members.read_bytes()
    with tarfile.open(auto) as tar:
        assert tar.getnames()[:3] == [f"{1000:016x}.jpg", f"{1000:016x}.json", f"{1000:016x}.txt"]
    loader = wds.WebDataset(str(auto), shardshuffle=False, empty_check=False).decode("pil").rename(
        image="jpg;png;jpeg;webp", text="txt").to_tuple("image", "text")
    loaded = list(loader)
    assert [text for _, text in loaded] == ["pair 0", "pair 1", "pair 2"]
    assert all(image.size == (48, 40) for image, _ in loaded)


def test_auto_layout_refuses_mixed_kinds_and_packed_takes_them(tmp_path):
    rows = [pair_sample(0), multi_image_sample(1, "edit", 2), pair_sample(2), multi_image_sample(3, "interleaved", 3)]
    with pytest.raises(ValueError, match="layout: packed"):
        write_tar(tmp_path / "auto.tar", rows)
    path = tmp_path / "packed.tar"
    assert write_tar(path, rows, layout="packed") == 4
    from_hf = load_hf_webdataset(path, tmp_path)
    assert [s["images.mp"] for s in from_hf] == [[i["bytes"] for i in row["images"]] for row in rows]
    assert [s["txt"] for s in from_hf] == ["pair 0", "step 1 of sample 1", "pair 2",
                                           "step 1 of sample 3\n\nstep 2 of sample 3"]
    assert WebDatasetSink(WebDatasetSink.Params()).count_rows(str(path)) == 4


def test_fields_first_set_after_the_fifth_sample_read_with_and_without_features(tmp_path):
    rows = [multi_image_sample(i, "edit", 2) for i in range(6)]
    rows[5]["captions"] = [{"name": "source", "text": "a drawing"}]
    rows[5]["source"]["license"] = "cc-by-4.0"
    rows[5]["scores"] = {"clip_direction": 0.25}
    rows[5]["roles"] = ["editing"]
    path = tmp_path / "shard.tar"
    write_tar(path, rows)
    inferred = load_hf_webdataset(path, tmp_path / "inferred")
    declared = load_hf_webdataset(path, tmp_path / "declared", features=packed_features())
    assert inferred.features == declared.features
    for from_hf in (inferred, declared):
        assert len(from_hf) == 6
        sixth = rebuilt(from_hf[5]["json"], from_hf[5]["images.mp"])
        assert sixth["captions"] == [{"name": "source", "text": "a drawing"}]
        assert sixth["source"]["license"] == "cc-by-4.0"
        assert sixth["roles"] == ["editing"]
        assert sixth["scores"]["clip_direction"] == pytest.approx(0.25)
        assert from_hf[0]["json"]["scores"]["clip_direction"] == schema.EMPTY_SCORE
        assert [s["images.mp"] for s in from_hf] == [[i["bytes"] for i in row["images"]] for row in rows]


def test_packed_json_stands_for_the_parquet_row_without_image_bytes(tmp_path):
    rows = [multi_image_sample(i, "edit", 2 + i) for i in range(3)]
    rows[1]["scores"] = {"clip_score": float("nan"), "clip_direction": 0.5}
    ParquetSink(ParquetSink.Params()).write([schema.from_rows(rows)], str(tmp_path / "shard.parquet"))
    write_tar(tmp_path / "shard.tar", rows)
    parquet_rows = pq.read_table(tmp_path / "shard.parquet").to_pylist()
    with tarfile.open(tmp_path / "shard.tar") as tar:
        for row, stored in zip(rows, parquet_rows):
            record = json.loads(tar.extractfile(f"{stored['key']}.json").read())
            images = msgpack.unpackb(tar.extractfile(f"{stored['key']}.images.mp").read())
            assert images == [image["bytes"] for image in stored["images"]]
            assert rebuilt(record, images) == stored_row(row)
    assert parquet_rows[1]["scores"]["clip_direction"] == 0.5


def test_packed_sample_without_image_bytes_is_refused(tmp_path):
    row = multi_image_sample(0, "edit", 2)
    row["images"][1] = {"bytes": None, "path": None}
    with pytest.raises(ValueError, match="image 1 has no bytes"):
        write_tar(tmp_path / "shard.tar", [row])


# ---------------------------------------------------------------- through the engine


def hf_image(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def mask_png(seed: int) -> bytes:
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (seed % 20, 5, seed % 20 + 20, 30))
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


def magicbrush_parquet(path: Path) -> list[dict]:
    """Six MagicBrush-style sessions: five of one turn, then one of three turns; every turn has a mask."""
    rows = []
    for session in range(6):
        current = scene_bytes(10 * session)
        for turn in range(1, (3 if session == 5 else 1) + 1):
            target = scene_bytes(10 * session + turn)
            rows.append({"img_id": f"{900000 + session}", "turn_index": turn, "source_img": hf_image(current),
                         "mask_img": hf_image(mask_png(10 * session + turn)),
                         "instruction": f"session {session} turn {turn}: change the shapes",
                         "target_img": hf_image(target)})
            current = target
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", image), ("mask_img", image),
        ("instruction", pa.string()), ("target_img", image)]))
    pq.write_table(table, path)
    return rows


@pytest.fixture(scope="module")
def chain_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chains")
    rows = magicbrush_parquet(folder / "magicbrush.parquet")
    loaded = load_recipe(EDIT_RECIPE, [f"source.path={folder / 'magicbrush.parquet'}", "source.layout=magicbrush",
                                       f"output.path={folder / 'out'}", "stages.edit_direction=false",
                                       "stages.basic_filter.min_side=16"])
    manifest = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)
    return folder / "out", manifest, rows


def test_engine_writes_chains_that_every_reader_gets_whole(chain_run, tmp_path):
    output, manifest, rows = chain_run
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["input_rows"] == 6
    assert manifest["kinds"] == {"edit": 6}
    # five sessions of source + target + mask, one of source + 3 targets + 3 masks
    assert manifest["images"] == {"total": 5 * 3 + 7, "by_kind": {"edit": 22}}
    assert manifest["statistics"]["images_per_sample"]["quantiles"]["p100"] == 7

    parquet = pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()
    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    from_hf = list(load_hf_webdataset(tars, tmp_path))
    from_wds = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in from_hf] == [s["__key__"] for s in from_wds] == [r["key"] for r in parquet]
    assert [len(s["images.mp"]) for s in from_hf] == [3, 3, 3, 3, 3, 7]
    for stored, hf_sample, wds_sample in zip(parquet, from_hf, from_wds):
        written = [image["bytes"] for image in stored["images"]]
        assert hf_sample["images.mp"] == wds_sample["images.mp"] == written
        assert hf_sample["json"] == wds_sample["json"]
        assert rebuilt(wds_sample["json"], written) == stored_row(stored)

    chain = parquet[5]
    session = [r for r in rows if r["img_id"] == "900005"]
    chain_images = [session[0]["source_img"]["bytes"]] + [r["target_img"]["bytes"] for r in session]
    masks = [r["mask_img"]["bytes"] for r in session]
    assert [image["bytes"] for image in chain["images"]] == chain_images + masks
    assert [(s["image"], s["text"]) for s in chain["segments"]] == [
        (0, None), (None, session[0]["instruction"]), (1, None), (None, session[1]["instruction"]),
        (2, None), (None, session[2]["instruction"]), (3, None)]
    turns = json.loads(chain["meta"])["edit"]["turns"]
    assert [(t["input"], t["output"], t["mask"], t["turn"]) for t in turns] == [(0, 1, 4, 1), (1, 2, 5, 2),
                                                                                (2, 3, 6, 3)]
    assert all(t["change"] > 1.0 for t in turns)
    assert chain["source"]["id"] == "900005"

    from_parquet = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (output / "parquet").glob("*")),
                                         split="train", cache_dir=str(tmp_path / "hf-parquet"))
    assert [len(row["images"]) for row in from_parquet] == [3, 3, 3, 3, 3, 7]
    assert from_parquet[5]["images"][6].size == (48, 40)
