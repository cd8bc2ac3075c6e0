"""UrlListSource: formats, keys, meta, batching, streaming, preflight errors and drop rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from curate.schema import SAMPLE_SCHEMA, sample_key
from curate.sources import url_list
from curate.sources.url_list import UrlListParams, UrlListSource, detect_format
from curate.stage import RecipeError

REAL_LIST = Path(__file__).parent / "data" / "url-caption-list" / "img2dataset_test_rows_894_999.parquet"
REAL_ROWS = 106


def source(path, recipe_dir=".", **params) -> UrlListSource:
    return UrlListSource(UrlListParams(path=str(path), **params), recipe_dir=str(recipe_dir))


def read_all(src: UrlListSource, batch_rows: int = 1000) -> pa.Table:
    return pa.concat_tables(list(src.iter_batches(batch_rows)))


def real_table() -> pa.Table:
    """The real slice as url / caption / site (a string extra column derived from the URL)."""
    table = pq.read_table(REAL_LIST)
    urls = table.column("URL").to_pylist()
    sites = [u.split("/")[2] for u in urls]
    return pa.table({"url": urls, "caption": table.column("TEXT"), "site": sites})


def write_jsonl(table: pa.Table, path: Path, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as out:
        for row in table.to_pylist():
            out.write(json.dumps(row) + "\n")


def write_delimited(table: pa.Table, path: Path, delimiter: str) -> None:
    options = pacsv.WriteOptions(delimiter=delimiter)
    if path.suffix == ".gz":
        with pa.CompressedOutputStream(str(path), "gzip") as out:
            pacsv.write_csv(table, out, options)
    else:
        pacsv.write_csv(table, str(path), options)


@pytest.fixture
def lists(tmp_path) -> dict[str, Path]:
    """The same list in every supported format, all named `list.*`."""
    table = real_table()
    paths = {
        name: tmp_path / name / f"list.{name}" for name in ("parquet", "csv", "tsv", "jsonl", "jsonl.gz", "csv.gz")
    }
    for path in paths.values():
        path.parent.mkdir()
    pq.write_table(table, paths["parquet"])
    write_delimited(table, paths["csv"], ",")
    write_delimited(table, paths["csv.gz"], ",")
    write_delimited(table, paths["tsv"], "\t")
    write_jsonl(table, paths["jsonl"])
    write_jsonl(table, paths["jsonl.gz"], gzip.open)
    return paths


def test_every_format_gives_the_same_rows(lists):
    expected = read_all(source(lists["parquet"]))
    assert expected.num_rows == REAL_ROWS
    assert expected.drop_columns(["drop_reason", "drop_detail"]).schema == SAMPLE_SCHEMA
    first = expected.slice(0, 1).to_pylist()[0]
    real = real_table().slice(0, 1).to_pylist()[0]
    assert first["image_meta"][0]["url"] == real["url"] == first["source"]["url"]
    assert first["captions"] == [{"name": "alt", "text": real["caption"]}]
    assert first["segments"] == [{"text": None, "image": 0}, {"text": real["caption"], "image": None}]
    assert first["source"] == {"dataset": "list", "id": "0", "url": real["url"], "license": None}
    assert first["kind"] == "pair" and first["roles"] == [] and first["scores"] is None
    for name, path in lists.items():
        got = read_all(source(path))
        assert got.to_pylist() == expected.to_pylist(), name


def test_real_slice_reads_with_its_own_column_names():
    src = source(REAL_LIST, url_column="URL", caption_column="TEXT")
    table = read_all(src)
    assert table.num_rows == REAL_ROWS
    assert table.column("drop_reason").null_count == REAL_ROWS
    assert table.column("meta").null_count == REAL_ROWS  # the pandas index column is not an extra
    assert src.count_rows() == REAL_ROWS


def test_keys_are_stable_and_distinct_for_a_repeated_url(tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(
        pa.table({"url": ["http://a/x.jpg", "http://a/y.jpg", "http://a/x.jpg"], "caption": ["a", "b", "a"]}), path
    )
    src = source(path, dataset="web")
    first = read_all(src).column("key").to_pylist()
    second = read_all(src).column("key").to_pylist()
    assert first == second
    assert len(set(first)) == 3
    assert first == [
        sample_key("web", i, u) for i, u in enumerate(["http://a/x.jpg", "http://a/y.jpg", "http://a/x.jpg"])
    ]


def test_extra_columns_land_in_meta(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("url,caption,site,lang,license\nhttp://a/1.jpg,one,a.org,en,cc-by\n")
    everything = read_all(source(path, license_column="license")).to_pylist()[0]
    assert everything["meta"] == '{"lang": "en", "site": "a.org"}'
    assert everything["source"]["license"] == "cc-by"
    chosen = read_all(source(path, extra_columns=["site"])).to_pylist()[0]
    assert json.loads(chosen["meta"]) == {"site": "a.org"}
    assert read_all(source(path, extra_columns=[])).column("meta").to_pylist() == [None]


def test_without_caption_column_there_are_no_captions(lists):
    row = read_all(source(lists["csv"], caption_column=None, extra_columns=[])).to_pylist()[0]
    assert row["captions"] == []
    assert row["segments"] == [{"text": None, "image": 0}]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_batches_never_exceed_batch_rows(lists, monkeypatch, fmt):
    monkeypatch.setattr(url_list, "_CSV_BLOCK_BYTES", 2048)  # many CSV blocks, not aligned to batches
    sizes = [t.num_rows for t in source(lists[fmt]).iter_batches(7)]
    assert sizes == [7] * (REAL_ROWS // 7) + [REAL_ROWS % 7]


def write_row_groups(path: Path, groups: int, rows_per_group: int) -> None:
    n = groups * rows_per_group
    table = pa.table({"url": [f"http://a/{i}.jpg" for i in range(n)], "caption": [f"c{i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=rows_per_group, compression="none")


def page_start(column: pq.ColumnChunkMetaData) -> int:
    return column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset


def test_parquet_is_read_incrementally(tmp_path, monkeypatch):
    """With the last row group's pages destroyed, the first row groups still come out before the error."""
    path = tmp_path / "groups.parquet"
    write_row_groups(path, groups=3, rows_per_group=100)
    last = pq.ParquetFile(path).metadata.row_group(2)
    start = min(page_start(last.column(i)) for i in range(last.num_columns))
    size = sum(last.column(i).total_compressed_size for i in range(last.num_columns))
    data = bytearray(path.read_bytes())
    data[start : start + size] = b"\xff" * size
    path.write_bytes(bytes(data))

    def refuse(*args, **kwargs):
        raise AssertionError("the whole file must not be read at once")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    batches = source(path).iter_batches(100)
    assert next(batches).column("source").combine_chunks().field("id").to_pylist()[0] == "0"
    assert next(batches).num_rows == 100
    with pytest.raises(OSError):
        next(batches)


def test_missing_file_names_the_resolved_path(tmp_path):
    with pytest.raises(RecipeError) as error:
        source("lists/none.parquet", recipe_dir=tmp_path).preflight()
    assert error.value.path == "source.path"
    assert str(tmp_path / "lists" / "none.parquet") in error.value.message


def test_relative_path_resolves_against_recipe_dir(tmp_path, lists):
    src = source(Path("csv") / "list.csv", recipe_dir=lists["csv"].parent.parent)
    src.preflight()
    assert src.describe()["path"] == str(lists["csv"])
    assert src.describe()["size_bytes"] == lists["csv"].stat().st_size
    assert src.describe()["format"] == "csv"


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz", "tsv", "jsonl"])
@pytest.mark.parametrize(
    "param,key_path", [("url_column", "source.url_column"), ("caption_column", "source.caption_column")]
)
def test_missing_column_is_a_recipe_error(lists, fmt, param, key_path):
    with pytest.raises(RecipeError) as error:
        source(lists[fmt], **{param: "nope"}).preflight()
    assert error.value.path == key_path
    assert "nope" in error.value.message and "url, caption, site" in error.value.message


def test_missing_extra_column_is_a_recipe_error(lists):
    with pytest.raises(RecipeError) as error:
        source(lists["parquet"], extra_columns=["site", "width"]).preflight()
    assert error.value.path == "source.extra_columns"


def test_unknown_extension_asks_for_a_format(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("url\nhttp://a/1.jpg\n")
    with pytest.raises(RecipeError) as error:
        source(path).preflight()
    assert error.value.path == "source.format"
    assert read_all(source(path, format="csv", caption_column=None)).num_rows == 1


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("a.parquet", "parquet"),
        ("a.CSV", "csv"),
        ("a.csv.gz", "csv"),
        ("a.tsv.gz", "tsv"),
        ("a.json.gz", "jsonl"),
        ("a.jsonl", "jsonl"),
        ("a.parquet.gz", None),
        ("a.gz", None),
        ("a.txt", None),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


def test_bad_jsonl_lines_and_missing_urls_become_drop_rows(tmp_path):
    lines = [
        '{"url": "http://a/0.jpg", "caption": "ok"}',
        '{"url": "http://a/1.jpg", "caption": broken',
        "",
        '["not", "an", "object"]',
        '{"url": "", "caption": "empty url"}',
        '{"url": null, "caption": "null url"}',
        '{"url": "   ", "caption": "blank url"}',
        '{"caption": "no url key"}',
        '{"url": " http://a/8.jpg ", "caption": "padded"}',
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = read_all(source(path), batch_rows=3)
    reasons = table.column("drop_reason").to_pylist()
    assert reasons == [None, "bad_input_row", "bad_input_row"] + ["missing_url"] * 4 + [None]
    details = table.column("drop_detail").to_pylist()
    assert details[1].startswith("line 2: ") and details[2].startswith("line 4: ")
    assert table.column("source").combine_chunks().field("id").to_pylist() == [str(i) for i in range(8)]
    assert table.column("source").combine_chunks().field("url").to_pylist()[-1] == "http://a/8.jpg"


def test_empty_url_in_csv_is_dropped(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('url,caption\nhttp://a/0.jpg,zero\n,"no url"\nhttp://a/2.jpg,two\n')
    table = read_all(source(path))
    assert table.column("drop_reason").to_pylist() == [None, "missing_url", None]
    assert table.column("drop_detail").to_pylist()[1] == "row 1: 'url' is empty"


def test_jsonl_preflight_skips_leading_bad_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('oops\n{"link": "http://a/0.jpg"}\n')
    with pytest.raises(RecipeError) as error:
        source(path).preflight()
    assert error.value.path == "source.url_column" and "link" in error.value.message
