"""Parquet and WebDataset sinks: readable by datasets/webdataset, deterministic, streamed."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import datasets
import pyarrow.parquet as pq
import pydantic
import pytest
import webdataset as wds
from PIL import Image

from curate import schema
from curate.sinks.parquet import ParquetSink, row_sizes
from curate.sinks.webdataset import WebDatasetSink


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def encode(size: tuple[int, int], fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A small image of `size` in `fmt`, varied by `seed` so encodings differ."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, 128))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def pair(i: int, size: tuple[int, int] = (32, 24), fmt: str = "jpg", key: str | None = None) -> dict:
    """A pair sample with one image and two captions."""
    data = encode(size, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], seed=i)
    return {
        "key": key or f"{i:016x}",
        "kind": "pair",
        "images": [{"bytes": data, "path": None}],
        "image_meta": [
            {
                "url": f"https://example.org/{i}.jpg",
                "width": size[0],
                "height": size[1],
                "format": fmt,
                "num_bytes": len(data),
            }
        ],
        "captions": [{"name": "alt", "text": f"caption {i} ü"}, {"name": "recap", "text": f"recaption {i}"}],
        "scores": {"clip_score": 0.25, "aesthetic": 5.0},
        "roles": ["understanding"],
        "source": {"dataset": "demo", "id": str(i), "url": None, "license": "cc-by"},
        "meta": json.dumps({"row": i}),
    }


def tables(n: int, per_table: int = 3, **kwargs) -> list:
    """`n` pair samples split into tables of `per_table` rows."""
    rows = [pair(i, size=(32 + i, 24 + i), **kwargs) for i in range(n)]
    return [schema.from_rows(rows[i : i + per_table]) for i in range(0, n, per_table)]


# ---------------------------------------------------------------- parquet


def write_parquet(path, source, **params) -> int:
    sink = ParquetSink(ParquetSink.Params(**params))
    return sink.write(iter(source), str(path))


def test_parquet_loads_in_datasets_as_images(tmp_path):
    path = tmp_path / "shard.parquet"
    assert write_parquet(path, tables(7)) == 7

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))

    assert ds.features["images"] == datasets.List(datasets.Image())
    assert len(ds) == 7
    for i, row in enumerate(ds):
        assert row["key"] == f"{i:016x}"
        assert isinstance(row["images"][0], Image.Image)
        assert row["images"][0].size == (32 + i, 24 + i)
        assert row["captions"][0] == {"name": "alt", "text": f"caption {i} ü"}


def test_parquet_count_rows_reads_footer(tmp_path):
    path = tmp_path / "shard.parquet"
    write_parquet(path, tables(5))
    assert ParquetSink(ParquetSink.Params()).count_rows(str(path)) == 5


def test_parquet_is_byte_identical_for_identical_input(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(a, tables(6), row_group_bytes=2000)
    write_parquet(b, tables(6), row_group_bytes=2000)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("compression", ["zstd", "snappy", "gzip", "none"])
def test_parquet_compression_codecs(tmp_path, compression):
    path = tmp_path / "shard.parquet"
    write_parquet(path, tables(2), compression=compression)
    codec = pq.ParquetFile(path).metadata.row_group(0).column(0).compression
    assert codec == {"none": "UNCOMPRESSED"}.get(compression, compression.upper())


def test_parquet_cuts_row_groups_by_bytes(tmp_path):
    path = tmp_path / "shard.parquet"
    limit = 3000
    source = tables(20, per_table=7)
    assert write_parquet(path, source, row_group_bytes=limit) == 20

    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups > 2
    keys = []
    for g in range(parquet.metadata.num_row_groups):
        group = parquet.read_row_group(g)
        if group.num_rows > 1:
            assert row_sizes(group).sum() <= limit
        assert parquet.metadata.row_group(g).total_byte_size < 2 * limit
        keys += group.column("key").to_pylist()
    assert keys == [f"{i:016x}" for i in range(20)]


def test_parquet_sample_larger_than_limit_gets_its_own_row_group(tmp_path):
    path = tmp_path / "shard.parquet"
    write_parquet(path, tables(3), row_group_bytes=10)
    metadata = pq.ParquetFile(path).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [1, 1, 1]


def test_parquet_writes_page_index(tmp_path):
    path = tmp_path / "shard.parquet"
    write_parquet(path, tables(4))
    group = pq.ParquetFile(path).metadata.row_group(0)
    assert all(group.column(c).has_offset_index for c in range(group.num_columns))
    assert group.column(0).has_column_index


def test_parquet_keeps_hf_features_metadata(tmp_path):
    path = tmp_path / "shard.parquet"
    write_parquet(path, tables(1))
    stored = pq.read_schema(path)
    assert stored.metadata[b"huggingface"] == schema.hf_features_metadata()
    assert stored.remove_metadata().equals(schema.SAMPLE_SCHEMA)


@pytest.mark.parametrize("source", [[], [schema.empty_table()]], ids=["no-tables", "empty-table"])
def test_parquet_empty_shard_is_valid(tmp_path, source):
    path = tmp_path / "empty.parquet"
    assert write_parquet(path, source) == 0
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.remove_metadata().equals(schema.SAMPLE_SCHEMA)
    assert ParquetSink(ParquetSink.Params()).count_rows(str(path)) == 0


def test_parquet_params_are_validated():
    with pytest.raises(pydantic.ValidationError):
        ParquetSink.Params(compression="snappy", compression_level=3)
    with pytest.raises(pydantic.ValidationError):
        ParquetSink.Params(compression="lz4")
    with pytest.raises(pydantic.ValidationError):
        ParquetSink.Params(row_group_bytes=200 * 2**20)
    with pytest.raises(pydantic.ValidationError):
        ParquetSink.Params(row_size=1)
    assert ParquetSink.Params(compression="zstd", compression_level=9).compression_level == 9


# ---------------------------------------------------------------- webdataset


def write_tar(path, source, **params) -> int:
    sink = WebDatasetSink(WebDatasetSink.Params(**params))
    return sink.write(iter(source), str(path))


def member_names(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_webdataset_reads_back_with_webdataset(tmp_path):
    path = tmp_path / "shard.tar"
    assert write_tar(path, tables(5)) == 5

    samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil"))

    assert len(samples) == 5
    for i, sample in enumerate(samples):
        assert sample["__key__"] == f"{i:016x}"
        assert {k for k in sample if not k.startswith("__")} == {"jpg", "json", "txt"}
        assert isinstance(sample["jpg"], Image.Image)
        assert sample["jpg"].size == (32 + i, 24 + i)
        assert sample["txt"] == f"caption {i} ü"
        record = sample["json"]
        assert json.loads(record["captions"]) == {"alt": f"caption {i} ü", "recap": f"recaption {i}"}
        assert record["caption"] == sample["txt"]
        assert json.loads(record["meta"]) == {"row": i}
        assert record["image_meta"][0]["width"] == record["width"] == 32 + i
        assert record["kind"] == "pair" and record["key"] == sample["__key__"]
        assert set(record) == set(schema.WDS_RECORD_SCHEMA.names)
        assert '"bytes"' not in json.dumps(record)


def test_webdataset_json_is_sorted_compact_utf8(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(1))
    with tarfile.open(path) as tar:
        raw = tar.extractfile(f"{0:016x}.json").read()
    record = json.loads(raw)
    assert raw == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert "ü".encode() in raw


def test_webdataset_loads_in_datasets(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(4))
    ds = datasets.load_dataset("webdataset", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 4
    assert ds[2]["jpg"].size == (34, 26)
    assert ds[2]["txt"] == "caption 2 ü"


def test_webdataset_is_byte_identical_for_identical_input(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_tar(a, tables(5))
    write_tar(b, tables(5, per_table=2))
    assert a.read_bytes() == b.read_bytes()


def test_webdataset_member_headers_are_fixed(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(3))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert tar.pax_headers == {}
    assert len(members) == 9
    for member in members:
        assert member.isfile()
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
        assert member.mode == 0o644
        assert member.pax_headers == {}


def test_webdataset_members_of_a_sample_are_contiguous_and_ordered(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(4))
    names = member_names(path)
    groups = [
        (key, [n.split(".", 1)[1] for n in group])
        for key, group in itertools.groupby(names, lambda n: n.split(".", 1)[0])
    ]
    assert [key for key, _ in groups] == [f"{i:016x}" for i in range(4)]
    assert all(suffixes == ["jpg", "json", "txt"] for _, suffixes in groups)


def test_webdataset_caption_param_picks_named_caption(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(1), caption="recap")
    with tarfile.open(path) as tar:
        assert tar.extractfile(f"{0:016x}.txt").read() == b"recaption 0"
    write_tar(path, tables(1), caption="absent")
    with tarfile.open(path) as tar:
        assert tar.extractfile(f"{0:016x}.txt").read() == "caption 0 ü".encode()


def test_webdataset_image_extension_follows_format(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tables(2, fmt="png"))
    assert member_names(path)[0] == f"{0:016x}.png"
    sample = next(iter(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil")))
    assert sample["png"].size == (32, 24)


def test_webdataset_meta_that_is_not_json_stays_a_string(tmp_path):
    path = tmp_path / "shard.tar"
    row = pair(0) | {"meta": "free text"}
    write_tar(path, [schema.from_rows([row])])
    with tarfile.open(path) as tar:
        assert json.loads(tar.extractfile(f"{0:016x}.json").read())["meta"] == "free text"


def test_webdataset_rejects_key_with_dot(tmp_path):
    bad = schema.from_rows([pair(0), pair(1, key="abc.def")])
    with pytest.raises(ValueError, match="abc.def"):
        write_tar(tmp_path / "shard.tar", [bad])


def test_webdataset_rejects_mixed_member_sets(tmp_path):
    mixed = schema.from_rows([pair(0), pair(1, fmt="png")])
    with pytest.raises(ValueError, match=f"{1:016x}"):
        write_tar(tmp_path / "shard.tar", [mixed])


def test_webdataset_rejects_sample_without_image_format(tmp_path):
    row = pair(0)
    row["image_meta"][0]["format"] = None
    with pytest.raises(ValueError, match="format"):
        write_tar(tmp_path / "shard.tar", [schema.from_rows([row])])


def multi_image(i: int, kind: str) -> dict:
    """An interleaved or edit sample with two images and two text segments."""
    row = pair(i)
    second = encode((8, 8), seed=i + 1)
    row["kind"] = kind
    row["images"].append({"bytes": second, "path": None})
    row["image_meta"].append({"width": 8, "height": 8, "format": "jpg"})
    row["segments"] = [
        {"text": "first part", "image": None},
        {"text": None, "image": 0},
        {"text": "second part", "image": None},
        {"text": None, "image": 1},
    ]
    return row


@pytest.mark.parametrize(("kind", "text"), [("interleaved", "first part\n\nsecond part"), ("edit", "first part")])
def test_webdataset_multi_image_samples_as_members(tmp_path, kind, text):
    path = tmp_path / "shard.tar"
    write_tar(path, [schema.from_rows([multi_image(0, kind), multi_image(1, kind)])], layout="members")
    key = f"{0:016x}"
    assert member_names(path)[:4] == [f"{key}.jpg", f"{key}.1.jpg", f"{key}.json", f"{key}.txt"]

    sample = next(iter(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil")))
    assert sample["__key__"] == key
    assert sample["1.jpg"].size == (8, 8)
    assert sample["txt"] == text
    assert [s["image"] for s in sample["json"]["segments"]] == [schema.EMPTY_SEGMENT_IMAGE, 0,
                                                                schema.EMPTY_SEGMENT_IMAGE, 1]
    assert [s["text"] for s in sample["json"]["segments"]] == ["first part", "", "second part", ""]


def test_webdataset_count_rows_counts_keys(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, [schema.from_rows([multi_image(0, "interleaved"), multi_image(1, "interleaved")])])
    sink = WebDatasetSink(WebDatasetSink.Params())
    assert sink.count_rows(str(path)) == 2
    write_tar(path, tables(5))
    assert sink.count_rows(str(path)) == 5


def test_webdataset_empty_shard_is_valid(tmp_path):
    path = tmp_path / "empty.tar"
    assert write_tar(path, [schema.empty_table()]) == 0
    assert member_names(path) == []
    assert WebDatasetSink(WebDatasetSink.Params()).count_rows(str(path)) == 0
