"""Sources of stored images: image_folder, image_shards (img2dataset / DataComp / HF Parquet), hf_dataset,
and the decode stage that fills their image_meta; one engine run from an image folder to Parquet."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from curate import registry
from curate.engine.apply import split_drops
from curate.engine.run import compile_plan, execute
from curate.fetch.config import ResizeParams
from curate.fetch.image import scaled_size
from curate.ops.decode import DecodeParams, DecodeStage
from curate.recipe import load_recipe
from curate.sources.hf_dataset import HfDatasetParams, HfDatasetSource
from curate.sources.image_folder import ImageFolderParams, ImageFolderSource
from curate.sources.image_shards import ImageShardsParams, ImageShardsSource
from curate.stage import RecipeError

DATA = Path(__file__).resolve().parent / "data"
REAL = DATA / "captioned-images"
I2D = DATA / "img2dataset"
I2D_TAR = I2D / "webdataset" / "00000.tar"
I2D_PARQUET = I2D / "parquet" / "00000.parquet"


def real_records() -> list[dict]:
    """The 4 real COCO images' records (file_name, caption, width, height, sha256, coco_url, license_url, ...)."""
    return [json.loads(line) for line in (REAL / "captions.jsonl").read_text().splitlines()]


def read_all(source, batch_rows: int = 3) -> list[dict]:
    """Every row the source yields (drop_reason included), checking each table's size and schema."""
    rows = []
    for table in source.iter_batches(batch_rows):
        assert table.num_rows <= batch_rows
        assert "drop_reason" in table.column_names
        rows += table.to_pylist()
    return rows


def kept(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["drop_reason"] is None]


def image_folder(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A folder of the real images with sidecars: .txt captions, a .json with url and license, both on one.

    Returns the folder and, by relative path, the record each image was made from.
    """
    records = real_records()
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    layout = {"a.jpg": records[0], "b.jpg": records[1], "sub/c.jpg": records[2], "sub/deeper/d.jpg": records[3]}
    for relative, record in layout.items():
        shutil.copy(REAL / record["file_name"], root / relative)
    (root / "a.txt").write_text(records[0]["caption"])
    (root / "b.txt").write_text(records[1]["caption"] + "\r\n")  # a line break at the end is not caption text
    (root / "sub" / "c.json").write_text(json.dumps({"caption": records[2]["caption"], "url": records[2]["coco_url"],
                                                    "license": records[2]["license_url"], "image_id": 7}))
    (root / "sub" / "deeper" / "d.txt").write_text(records[3]["caption"])
    (root / "sub" / "deeper" / "d.json").write_text(json.dumps({"caption": "not this one", "photographer": "x"}))
    return root, layout


# --------------------------------------------------------------------------- image_folder


def test_image_folder_reads_real_images_with_their_sidecars(tmp_path):
    root, layout = image_folder(tmp_path)
    source = ImageFolderSource(ImageFolderParams(path=str(root)), recipe_dir=str(tmp_path))
    source.preflight()
    rows = read_all(source)

    # Files of a folder first, then its subfolders, each by name.
    assert [row["source"]["id"] for row in rows] == ["a.jpg", "b.jpg", "sub/c.jpg", "sub/deeper/d.jpg"]
    assert all(row["drop_reason"] is None and row["kind"] == "pair" for row in rows)
    for row in rows:
        record = layout[row["source"]["id"]]
        data = (root / row["source"]["id"]).read_bytes()
        meta = row["image_meta"][0]
        assert row["images"][0]["bytes"] == data
        assert meta["sha256"] == record["sha256"] == hashlib.sha256(data).hexdigest()
        assert (meta["width"], meta["height"]) == (record["width"], record["height"])
        assert (meta["format"], meta["num_bytes"]) == ("jpg", record["bytes"])
        assert row["captions"] == [{"name": "alt", "text": record["caption"]}]
        assert row["segments"] == [{"image": 0, "text": None}, {"image": None, "text": record["caption"]}]
        assert row["source"]["dataset"] == "photos"
    by_id = {row["source"]["id"]: row for row in rows}
    c = by_id["sub/c.jpg"]
    assert c["source"]["url"] == c["image_meta"][0]["url"] == layout["sub/c.jpg"]["coco_url"]
    assert c["source"]["license"] == layout["sub/c.jpg"]["license_url"]
    assert json.loads(c["meta"]) == {"image_id": 7}
    d = by_id["sub/deeper/d.jpg"]  # the .txt wins over the .json caption; other .json keys go to meta
    assert json.loads(d["meta"]) == {"photographer": "x"}
    assert by_id["a.jpg"]["meta"] is None
    # Keys are stable across reads and distinct.
    assert [row["key"] for row in read_all(source, batch_rows=10)] == [row["key"] for row in rows]
    assert len({row["key"] for row in rows}) == 4


def test_image_folder_turns_every_bad_file_into_a_drop_row(tmp_path):
    root, layout = image_folder(tmp_path)
    real = (root / "a.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(b"this is not an image")
    (root / "cut.jpg").write_bytes(real[: len(real) // 2])  # a valid header, half the data
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "lonely.txt").write_text("a caption whose image is missing")
    (root / "badmeta.jpg").write_bytes(real)
    (root / "badmeta.json").write_text("{not json")
    (root / ".hidden.jpg").write_bytes(real)
    (root / "notes.md").write_text("neither an image nor a sidecar")
    big = len((root / "sub" / "deeper" / "d.jpg").read_bytes())
    params = ImageFolderParams(path=str(root), max_image_bytes=big - 1)
    rows = read_all(ImageFolderSource(params))

    reasons = {row["source"]["id"]: row["drop_reason"] for row in rows}
    assert reasons == {
        "a.jpg": None, "b.jpg": None, "sub/c.jpg": None, "cut.jpg": None,  # cut.jpg: its header is fine
        "badmeta.jpg": "bad_input_row", "broken.jpg": "corrupt", "gone.jpg": "unreadable",
        "lonely": "missing_image", "sub/deeper/d.jpg": "too_large",
    }
    assert all(row["images"][0]["bytes"] is None for row in rows if row["drop_reason"])
    details = {row["source"]["id"]: row["drop_detail"] for row in rows}
    assert "gone.jpg" in details["gone.jpg"]
    assert str(big) in details["sub/deeper/d.jpg"]
    # The decode stage then finds the cut image's data broken.
    survivors, _ = split_drops(pa.Table.from_pylist(rows), "source")
    decoded = DecodeStage(DecodeParams()).process(survivors)
    assert {r["source"]["id"]: r["drop_reason"] for r in decoded.to_pylist()} == {
        "a.jpg": None, "b.jpg": None, "sub/c.jpg": None, "cut.jpg": "corrupt"}
    ignoring = ImageFolderParams(path=str(root), orphan_sidecars="ignore")
    assert "lonely" not in {row["source"]["id"] for row in read_all(ImageFolderSource(ignoring))}


def test_image_folder_preflight_names_a_missing_folder(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        ImageFolderSource(ImageFolderParams(path="nope"), recipe_dir=str(tmp_path)).preflight()
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(RecipeError, match="not a folder"):
        ImageFolderSource(ImageFolderParams(path="file.jpg"), recipe_dir=str(tmp_path)).preflight()


# --------------------------------------------------------------------------- image_shards: img2dataset


def test_img2dataset_webdataset_output_round_trips():
    source = ImageShardsSource(ImageShardsParams(path=str(I2D / "webdataset")))
    assert source.files() == ("webdataset", [str(I2D_TAR)])  # the metadata Parquet beside the tar is not read
    rows = read_all(source)
    stats = json.loads((I2D / "webdataset" / "00000_stats.json").read_text())
    expected = list(wds.WebDataset(str(I2D_TAR), shardshuffle=False, empty_check=False))
    assert len(rows) == len(expected) == stats["successes"]
    for row, sample in zip(rows, expected):
        record = json.loads(sample["json"])
        meta = row["image_meta"][0]
        assert row["drop_reason"] is None
        assert row["images"][0]["bytes"] == sample["jpg"]
        assert row["captions"] == [{"name": "alt", "text": sample["txt"].decode()}]
        assert row["source"]["id"] == f"00000.tar:{sample['__key__']}"
        assert row["source"]["url"] == meta["url"] == record["url"]
        assert row["source"]["license"] == record["license"]
        # What img2dataset recorded about the download is reused: the original size and sha256 ...
        assert (meta["original_width"], meta["original_height"], meta["sha256"]) == (
            record["original_width"], record["original_height"], record["sha256"])
        # ... while width/height/num_bytes describe the stored (resized) bytes.
        assert (meta["width"], meta["height"], meta["num_bytes"]) == (record["width"], record["height"],
                                                                      len(sample["jpg"]))
        extra = json.loads(row["meta"])
        assert extra["status"] == "success" and extra["key"] == sample["__key__"]
        assert "caption" not in extra and "url" not in extra and "sha256" not in extra
    # The recorded sha256 is the one of the original file: 4 of the 8 photographs are in tests/data too.
    originals = {Path(r["file_name"]).name: r["sha256"] for r in real_records()}
    matched = {row["source"]["url"].rsplit("/", 1)[1]: row["image_meta"][0]["sha256"] for row in rows
               if row["source"]["url"].rsplit("/", 1)[1] in originals}
    assert matched == originals


def test_img2dataset_parquet_output_keeps_failed_downloads_as_drop_rows():
    source = ImageShardsSource(ImageShardsParams(path=str(I2D / "parquet"), id_field="key"))
    rows = read_all(source)
    table = pq.read_table(I2D_PARQUET).to_pylist()
    stats = json.loads((I2D / "parquet" / "00000_stats.json").read_text())
    assert len(rows) == len(table) == stats["count"]
    assert len(kept(rows)) == stats["successes"]
    for row, record in zip(rows, table):
        assert row["source"]["id"] == record["key"]
        assert row["captions"] == [{"name": "alt", "text": record["caption"]}]
        if record["status"] == "success":
            assert row["drop_reason"] is None
            assert row["images"][0]["bytes"] == record["jpg"]
            assert row["image_meta"][0]["original_width"] == record["original_width"]
        else:
            assert row["drop_reason"] == "missing_image"
            assert record["status"] in row["drop_detail"] and record["error_message"] in row["drop_detail"]


# --------------------------------------------------------------------------- image_shards: DataComp, damage


def write_tar(path: Path, members: list[tuple[str, bytes]], compress: bool = False) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buffer.getvalue()) if compress else buffer.getvalue())


def i2d_members() -> list[tuple[str, bytes]]:
    with tarfile.open(I2D_TAR) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_datacomp_style_shards_carry_uid_and_a_mapped_clip_score(tmp_path):
    images = [data for name, data in i2d_members() if name.endswith(".jpg")][:2]
    records = [{"uid": "8f1e0c5a9d0b4c3e", "url": "http://example.org/a.jpg", "caption": "a kitchen",
                "clip_b32_similarity_score": 0.25, "clip_l14_similarity_score": 0.31, "face_bboxes": []},
               {"uid": "00aa11bb22cc33dd", "url": "http://example.org/b.jpg", "caption": "a train",
                "clip_b32_similarity_score": 0.2, "clip_l14_similarity_score": None, "face_bboxes": [[0, 0, 1, 1]]}]
    members = []
    for i, (data, record) in enumerate(zip(images, records)):
        members += [(f"{i:09d}.jpg", data), (f"{i:09d}.txt", record["caption"].encode()),
                    (f"{i:09d}.json", json.dumps(record).encode())]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "00000000.tar", members)
    params = ImageShardsParams(path=str(tmp_path / "shards" / "*.tar"),
                               scores={"clip_score": "clip_l14_similarity_score"})
    rows = read_all(ImageShardsSource(params))
    assert [row["source"]["id"] for row in rows] == ["8f1e0c5a9d0b4c3e", "00aa11bb22cc33dd"]
    assert rows[0]["scores"]["clip_score"] == pytest.approx(0.31)
    assert rows[1]["scores"] is None  # no score recorded: not scored, rather than 0
    assert json.loads(rows[0]["meta"]) == {"clip_b32_similarity_score": 0.25, "face_bboxes": []}
    assert [row["images"][0]["bytes"] for row in rows] == images


def test_damaged_tars_yield_what_they_can_and_one_drop_row_per_broken_sample(tmp_path):
    members = i2d_members()
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    data = I2D_TAR.read_bytes()
    with tarfile.open(I2D_TAR) as tar:
        infos = [m for m in tar if m.isfile()]
    folder = tmp_path / "damaged"
    folder.mkdir()
    # 1) cut in the middle of the 6th sample's image
    sixth = infos[15]
    (folder / "a_cut.tar").write_bytes(data[: sixth.offset_data + sixth.size // 2])
    # 2) garbage over the header of the 5th sample's first member: the reader finds the next header again
    fifth = infos[12]
    damaged = bytearray(data)
    damaged[fifth.offset:fifth.offset_data] = b"\x07" * (fifth.offset_data - fifth.offset)
    (folder / "b_garbage.tar").write_bytes(bytes(damaged))
    # 3) garbage over the header of the 3rd sample's .json: only that sample is damaged
    inside = bytearray(data)
    inside[infos[7].offset:infos[7].offset_data] = b"\x07" * (infos[7].offset_data - infos[7].offset)
    (folder / "b_inside.tar").write_bytes(bytes(inside))
    # 4) not a tar at all, 5) a gzipped tar cut in half
    (folder / "c_not_a_tar.tar").write_bytes(b"hello " * 300)
    write_tar(folder / "d_half.tar.gz", members, compress=True)
    compressed = (folder / "d_half.tar.gz").read_bytes()
    (folder / "d_half.tar.gz").write_bytes(compressed[: len(compressed) // 2])

    rows = read_all(ImageShardsSource(ImageShardsParams(path=str(folder), id_field=None)), batch_rows=5)
    by_shard: dict[str, list[tuple[str, str | None]]] = {}
    for row in rows:
        shard, _, key = row["source"]["id"].partition(":")
        by_shard.setdefault(shard, []).append((key, row["drop_reason"]))
    assert by_shard["a_cut.tar"] == [(k, None) for k in keys[:5]] + [(keys[5], "corrupt_shard")]
    assert by_shard["b_garbage.tar"] == [(k, None) for k in keys[:3]] + [
        (keys[3], "corrupt_shard"), (keys[4], "corrupt_shard")] + [(k, None) for k in keys[5:]]
    assert by_shard["b_inside.tar"] == [(k, "corrupt_shard" if i == 2 else None) for i, k in enumerate(keys)]
    assert by_shard["c_not_a_tar.tar"] == [("", "corrupt_shard")]
    half = by_shard["d_half.tar.gz"]
    assert half[-1][1] == "corrupt_shard" and all(reason is None for _, reason in half[:-1])
    assert [k for k, _ in half] == keys[: len(half)]
    # Every sample that comes out intact has exactly the bytes of the original.
    originals = dict(members)
    for row in kept(rows):
        key = row["source"]["id"].partition(":")[2]
        assert row["images"][0]["bytes"] == originals[f"{key}.jpg"]


def test_parquet_shard_with_a_damaged_row_group_drops_exactly_its_rows(tmp_path):
    table = pq.read_table(I2D_PARQUET)
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=4, compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(table.column_names.index("jpg"))
    blob = bytearray(path.read_bytes())
    blob[chunk.data_page_offset:chunk.data_page_offset + 64] = b"\xff" * 64  # a page header that cannot parse
    path.write_bytes(bytes(blob))
    (tmp_path / "not.parquet").write_bytes(b"PAR1 but not really")
    rows = read_all(ImageShardsSource(ImageShardsParams(path=str(tmp_path), id_field=None)))
    reasons = [row["drop_reason"] for row in rows]
    statuses = table.column("status").to_pylist()
    expected = [None if status == "success" else "missing_image" for status in statuses]
    expected[4:8] = ["corrupt_shard"] * 4
    assert reasons == expected + ["corrupt_shard"]
    assert "row group 1" in rows[4]["drop_detail"]
    assert rows[-1]["source"]["id"] == "not.parquet:0"


def test_parquet_with_hf_image_features_made_by_datasets(tmp_path):
    records = real_records()
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "id": datasets.Value("string")})
    files = [(REAL / r["file_name"]).read_bytes() for r in records]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": f, "path": None} for f in files],
                                     "text": [r["caption"] for r in records],
                                     "id": [str(r["image_id"]) for r in records]}, features=features)
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    rows = read_all(ImageShardsSource(ImageShardsParams(path=str(tmp_path / "hf.parquet"), id_field="id")))
    assert [row["images"][0]["bytes"] for row in rows] == files
    assert [row["captions"][0]["text"] for row in rows] == [r["caption"] for r in records]
    assert [row["source"]["id"] for row in rows] == [str(r["image_id"]) for r in records]
    assert [row["image_meta"][0]["sha256"] for row in rows] == [r["sha256"] for r in records]


def test_image_shards_preflight_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        ImageShardsSource(ImageShardsParams(path=str(tmp_path / "none" / "*.tar"))).preflight()
    # img2dataset's webdataset folder read as Parquet: its metadata Parquet has no image column.
    with pytest.raises(RecipeError, match="no image column"):
        ImageShardsSource(ImageShardsParams(path=str(I2D / "webdataset"), format="parquet")).preflight()
    with pytest.raises(RecipeError, match="'photo' not in"):
        ImageShardsSource(ImageShardsParams(path=str(I2D / "parquet"), image_field="photo")).preflight()


# --------------------------------------------------------------------------- hf_dataset


def real_dataset() -> datasets.Dataset:
    records = real_records()
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "url": datasets.Value("string"), "aesthetic": datasets.Value("float32"),
                                  "image_id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": (REAL / r["file_name"]).read_bytes(), "path": None} for r in records],
        "text": [r["caption"] for r in records], "url": [r["coco_url"] for r in records],
        "aesthetic": [5.5, 4.25, None, 6.0], "image_id": [r["image_id"] for r in records]}, features=features)


def test_hf_dataset_from_a_save_to_disk_folder(tmp_path):
    records = real_records()
    real_dataset().save_to_disk(str(tmp_path / "saved"))
    params = HfDatasetParams(path="saved", score_columns={"aesthetic": "aesthetic"})
    source = HfDatasetSource(params, recipe_dir=str(tmp_path))
    source.preflight()
    rows = read_all(source)
    assert len(rows) == 4 and not [row for row in rows if row["drop_reason"]]
    for i, (row, record) in enumerate(zip(rows, records)):
        assert row["images"][0]["bytes"] == (REAL / record["file_name"]).read_bytes()
        assert row["captions"] == [{"name": "alt", "text": record["caption"]}]
        assert row["source"]["id"] == str(i) and row["source"]["url"] == record["coco_url"]
        assert json.loads(row["meta"]) == {"image_id": record["image_id"]}
    assert [row["scores"] and row["scores"]["aesthetic"] for row in rows] == [5.5, 4.25, None, 6.0]
    assert source.describe()["loader"] == "load_from_disk"


def test_hf_dataset_splits_of_a_dataset_dict(tmp_path):
    full = real_dataset()
    datasets.DatasetDict({"train": full.select([0, 1, 2]), "test": full.select([3])}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(RecipeError, match="choose one of the splits train, test"):
        HfDatasetSource(HfDatasetParams(path=str(tmp_path / "dd"))).preflight()
    rows = read_all(HfDatasetSource(HfDatasetParams(path=str(tmp_path / "dd"), split="test")))
    assert [row["captions"][0]["text"] for row in rows] == [real_records()[3]["caption"]]


def test_hf_dataset_streams_parquet_and_an_imagefolder_with_load_dataset(tmp_path):
    records = real_records()
    real_dataset().to_parquet(str(tmp_path / "data.parquet"))
    rows = read_all(HfDatasetSource(HfDatasetParams(path=str(tmp_path / "data.parquet"),
                                                    caption_columns={"alt": "text"})))
    assert [row["captions"][0]["text"] for row in rows] == [r["caption"] for r in records]
    assert [row["image_meta"][0]["sha256"] for row in rows] == [r["sha256"] for r in records]

    folder = tmp_path / "imagefolder"
    (folder / "train").mkdir(parents=True)
    lines = []
    for record in records:
        name = Path(record["file_name"]).name
        shutil.copy(REAL / record["file_name"], folder / "train" / name)
        lines.append(json.dumps({"file_name": name, "caption": record["caption"]}))
    (folder / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = HfDatasetSource(HfDatasetParams(path=str(folder)))
    assert source.describe()["loader"] == "load_dataset"
    rows = read_all(source)
    by_caption = {row["captions"][0]["text"]: row for row in rows}
    assert len(rows) == 4 and not [row for row in rows if row["drop_reason"]]
    for record in records:
        assert by_caption[record["caption"]]["images"][0]["bytes"] == (REAL / record["file_name"]).read_bytes()


def test_hf_dataset_names_missing_columns_and_paths(tmp_path):
    real_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(RecipeError, match="'picture' not in .*available columns: image, text"):
        HfDatasetSource(HfDatasetParams(path=str(tmp_path / "saved"), image_column="picture")).preflight()
    with pytest.raises(RecipeError, match="'licence' not in"):
        HfDatasetSource(HfDatasetParams(path=str(tmp_path / "saved"), license_column="licence")).preflight()
    with pytest.raises(RecipeError, match="dataset not found"):
        HfDatasetSource(HfDatasetParams(path=str(tmp_path / "missing"))).preflight()


def test_hf_dataset_rows_without_images_are_drop_rows(tmp_path):
    records = real_records()
    (tmp_path / "gone.jpg").write_bytes(b"")  # datasets wants the file while writing; it is gone when read
    ds = datasets.Dataset.from_dict(
        {"image": [str(REAL / records[0]["file_name"]), None, str(tmp_path / "gone.jpg")], "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "paths.parquet"))
    (tmp_path / "gone.jpg").unlink()
    rows = read_all(HfDatasetSource(HfDatasetParams(path=str(tmp_path / "paths.parquet"))))
    assert [row["drop_reason"] for row in rows] == [None, "missing_image", "unreadable"]
    assert rows[0]["images"][0]["bytes"] == (REAL / records[0]["file_name"]).read_bytes()


# --------------------------------------------------------------------------- decode


def test_decode_fills_fingerprints_that_find_the_same_pixels_in_another_encoding(tmp_path):
    record = real_records()[1]
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(REAL / record["file_name"], folder / "a.jpg")
    with Image.open(folder / "a.jpg") as image:
        image.convert("RGB").save(folder / "b.png")  # the same pixels, losslessly, in other bytes
        original_size = image.size
    rows = read_all(ImageFolderSource(ImageFolderParams(path=str(folder))))
    batch, _ = split_drops(pa.Table.from_pylist(rows), "source")
    # 256 px: small enough to resize, large enough that the JPEG decoder does not pre-scale (see fetch/image.py)
    resize = ResizeParams(mode="keep_ratio", side="longest", size=256)
    decoded = DecodeStage(DecodeParams(resize=resize)).process(batch)
    out = decoded.to_pylist()
    a, b = (row["image_meta"][0] for row in out)
    assert a["sha256"] != b["sha256"] and a["pixel_sha256"] == b["pixel_sha256"] and a["phash"] == b["phash"]
    assert (a["width"], a["height"]) == scaled_size(original_size, resize) != original_size
    assert (a["original_width"], a["original_height"]) == original_size
    assert a["sha256"] == record["sha256"] and a["original_format"] == "JPEG" and b["original_format"] == "PNG"
    for row in out:
        with Image.open(io.BytesIO(row["images"][0]["bytes"])) as image:
            assert image.format == "JPEG" and image.size == (a["width"], a["height"])
        assert row["image_meta"][0]["num_bytes"] == len(row["images"][0]["bytes"])
    # Run again on its own output: images that have their fingerprints are left as they are.
    again = DecodeStage(DecodeParams(resize=ResizeParams(size=64))).process(
        decoded.drop_columns(["drop_reason", "drop_detail"]))
    assert again.column("images").to_pylist() == decoded.column("images").to_pylist()
    assert again.column("image_meta").to_pylist() == decoded.column("image_meta").to_pylist()


def test_decode_keeps_img2dataset_bytes_and_what_it_recorded():
    rows = read_all(ImageShardsSource(ImageShardsParams(path=str(I2D_TAR))))
    batch, _ = split_drops(pa.Table.from_pylist(rows), "source")
    out = DecodeStage(DecodeParams(keep_bytes=True)).process(batch).to_pylist()
    for before, after in zip(rows, out):
        old, new = before["image_meta"][0], after["image_meta"][0]
        assert after["drop_reason"] is None
        assert after["images"][0]["bytes"] == before["images"][0]["bytes"]
        for name in ("url", "sha256", "original_width", "original_height", "width", "height", "format", "num_bytes"):
            assert new[name] == old[name], name
        assert new["pixel_sha256"] and isinstance(new["phash"], int)


# --------------------------------------------------------------------------- engine, end to end


def test_engine_runs_an_image_folder_to_parquet(tmp_path, local_ray):
    root, layout = image_folder(tmp_path)
    shutil.copy(root / "a.jpg", root / "sub" / "copy_of_a.jpg")  # the same bytes twice: dedup_exact drops one
    (root / "sub" / "copy_of_a.txt").write_text(layout["a.jpg"]["caption"])
    (root / "broken.jpg").write_bytes(b"not an image")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "folder",
        "source": {"type": "image_folder", "path": "photos"},
        "stages": {"decode": {"keep_bytes": True}, "basic_filter": {"min_side": 8}, "dedup_exact": {}},
        "output": {"path": str(tmp_path / "out"), "formats": ["parquet"]},
        "engine": {"rows_per_work_shard": 3},
    }))
    assert "image_folder" in registry.SOURCES and "decode" in registry.STAGES
    manifest = execute(compile_plan(load_recipe(recipe)), Console(file=io.StringIO()), progress=False)

    totals = manifest["reconciliation"]
    assert totals["ok"] is True and totals["input_rows"] == 6
    assert totals["input_rows"] == totals["output_rows"] + totals["dropped_rows"] == 4 + 2
    drops = pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()
    assert sorted((d["stage"], d["reason"]) for d in drops) == [("dedup_exact", "duplicate_exact"),
                                                                 ("source", "corrupt")]
    output = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "out" / "parquet")
                                                                .glob("*.parquet")), split="train")
    output = output.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert len(output) == 4
    seen = set()
    for row in output:
        relative = row["source"]["id"]
        record = layout.get(relative, layout["a.jpg"])  # the kept copy of a.jpg may be either one
        seen.add(record["file_name"])
        assert row["images"][0]["bytes"] == (root / relative).read_bytes()
        assert row["captions"] == [{"name": "alt", "text": record["caption"]}]
        assert row["image_meta"][0]["pixel_sha256"] and row["image_meta"][0]["sha256"] == record["sha256"]
    assert seen == {r["file_name"] for r in layout.values()}
