"""Interleaved sources on real data: MMC4 jsonl/zip, OBELICS-layout Parquet, WARC/ARC files, HTML page lists."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.extract.document import load_meta
from curate.sources.mmc4 import Mmc4Params, Mmc4Source
from curate.sources.obelics import ObelicsParams, ObelicsSource
from curate.sources.web_pages import HtmlPagesParams, HtmlPagesSource, WarcParams, WarcSource
from curate.stage import RecipeError

DATA = Path(__file__).resolve().parent / "data"
MMC4 = DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl"
MMC4_ZIP = DATA / "interleaved-docs" / "mmc4_shard_151.as_committed.truncated.zip"
WARC = DATA / "web-pages" / "warc"
CC = WARC / "resiliparse_cc-main-2020-34_sample.warc.gz"


def rows_of(source, batch_rows: int = 5) -> list[dict]:
    return [row for table in source.iter_batches(batch_rows) for row in table.to_pylist()]


def expected_order(document: dict) -> list[tuple[str, object]]:
    """MMC4's reading order: each sentence followed by the images matched to it, in image_info order."""
    order = []
    for position, sentence in enumerate(document["text_list"]):
        order.append(("text", sentence))
        order += [("image", info["raw_url"]) for info in document["image_info"]
                  if info["matched_text_index"] == position]
    return order


def actual_order(row: dict) -> list[tuple[str, object]]:
    urls = [meta["url"] for meta in row["image_meta"]]
    return [("text", s["text"]) if s["text"] is not None else ("image", urls[s["image"]]) for s in row["segments"]]


# --------------------------------------------------------------------------- MMC4


def test_mmc4_documents_keep_sentence_order_with_images_after_their_matched_sentence():
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()]
    rows = rows_of(Mmc4Source(Mmc4Params(path=str(MMC4))))
    assert len(rows) == len(documents) == 12
    assert all(row["drop_reason"] is None and row["kind"] == "interleaved" for row in rows)
    for document, row in zip(documents, rows):
        assert actual_order(row) == expected_order(document)
        assert row["source"]["url"] == document["url"]
        meta = load_meta(row["meta"])
        assert meta["similarity_matrix"] == document["similarity_matrix"]
        assert meta["image_info"] == document["image_info"]
        assert all(image["bytes"] is None for image in row["images"])
    assert len({row["key"] for row in rows}) == 12
    assert [row["key"] for row in rows] == [row["key"] for row in rows_of(Mmc4Source(Mmc4Params(path=str(MMC4))), 3)]


def test_mmc4_cut_off_zip_yields_its_complete_lines_and_one_truncated_input_drop():
    rows = rows_of(Mmc4Source(Mmc4Params(path=str(MMC4_ZIP), dataset="shard151")), 50)
    reasons = Counter(row["drop_reason"] for row in rows)
    assert reasons == {None: 107, "truncated_input": 1}
    assert rows[-1]["drop_reason"] == "truncated_input" and "ends mid-stream after 107 lines" in rows[-1]["drop_detail"]
    first = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()]
    assert [actual_order(row) for row in rows[:12]] == [expected_order(doc) for doc in first]


def test_mmc4_bad_lines_are_dropped_with_a_reason_and_counted(tmp_path):
    lines = MMC4.read_text(encoding="utf-8").splitlines()[:2]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join([lines[0], "{not json", "[1, 2]", '{"url": "x"}', lines[1]]) + "\n", encoding="utf-8")
    rows = rows_of(Mmc4Source(Mmc4Params(path=str(path))))
    assert [row["drop_reason"] for row in rows] == [None, "bad_input_row", "bad_input_row", "bad_input_row", None]
    assert "docs.jsonl:2" in rows[1]["drop_detail"]


def test_mmc4_missing_input_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Mmc4Source(Mmc4Params(path=str(tmp_path / "nothing.jsonl"))).preflight()


# --------------------------------------------------------------------------- OBELICS


def obelics_rows(documents: list[dict]) -> dict[str, list]:
    """OBELICS-layout columns for real MMC4 documents (sentences and images in MMC4's reading order)."""
    columns = {"images": [], "texts": [], "metadata": [], "general_metadata": []}
    for document in documents:
        images, texts, metadata = [], [], []
        for kind, value in expected_order(document):
            images.append(value if kind == "image" else None)
            texts.append(value if kind == "text" else None)
            metadata.append({"src": value, "alt_text": "an image"} if kind == "image" else None)
        columns["images"].append(images)
        columns["texts"].append(texts)
        columns["metadata"].append(json.dumps(metadata))
        columns["general_metadata"].append(json.dumps({"url": document["url"], "warc_record_offset": 1}))
    return columns


def test_obelics_layout_keeps_order_metadata_and_drops_inconsistent_rows(tmp_path):
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()[:4]]
    columns = obelics_rows(documents)
    columns["images"].append(["http://a.example/x.jpg", None])  # lists of different lengths
    columns["texts"].append(["text"])
    columns["metadata"].append(None)
    columns["general_metadata"].append(json.dumps({"url": "http://a.example/"}))
    columns["images"].append(["http://b.example/y.jpg"])
    columns["texts"].append(["both at one position"])
    columns["metadata"].append(None)
    columns["general_metadata"].append("{broken json")
    path = tmp_path / "obelics.parquet"
    pq.write_table(pa.table(columns, schema=pa.schema([("images", pa.list_(pa.string())), ("texts", pa.list_(
        pa.string())), ("metadata", pa.string()), ("general_metadata", pa.string())])), path)
    rows = rows_of(ObelicsSource(ObelicsParams(path=str(path))), 2)
    assert [row["drop_reason"] for row in rows] == [None] * 4 + ["bad_input_row"] * 2
    assert "parallel" in rows[4]["drop_detail"] and "not valid JSON" in rows[5]["drop_detail"]
    for document, row in zip(documents, rows):
        assert actual_order(row) == expected_order(document)
        meta = load_meta(row["meta"])
        assert row["source"]["url"] == document["url"] == meta["general_metadata"]["url"]
        assert [info["url"] for info in meta["images"]] == [m["url"] for m in row["image_meta"]]
        assert all(info["alt_text"] == "an image" for info in meta["images"])


def test_obelics_missing_column_is_a_recipe_error(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"images": [["u"]], "texts": [[None]]}), path)
    with pytest.raises(RecipeError, match="metadata"):
        ObelicsSource(ObelicsParams(path=str(path))).preflight()
    rows = rows_of(ObelicsSource(ObelicsParams(path=str(path), metadata_column=None, general_metadata_column=None)))
    assert len(rows) == 1 and rows[0]["drop_reason"] is None and rows[0]["image_meta"][0]["url"] == "u"


# --------------------------------------------------------------------------- WARC


def test_common_crawl_excerpt_gives_documents_with_text():
    rows = rows_of(WarcSource(WarcParams(path=str(CC))))
    assert len(rows) == 16  # the 16 response records; warcinfo, request and metadata records are not pages
    kept = [row for row in rows if row["drop_reason"] is None]
    assert len(kept) == 16
    assert all(any(s["text"] for s in row["segments"]) for row in kept)
    charsets = Counter(load_meta(row["meta"])["encoding"] for row in kept)
    assert charsets["gb18030"] >= 1 and charsets["cp1251"] >= 1 and charsets["utf-8"] >= 1
    russian = next(row for row in kept if row["source"]["url"] == "http://01spb.ru/company/")
    assert "пожарной" in " ".join(s["text"] for s in russian["segments"] if s["text"])
    assert all(row["source"]["url"].startswith("http") for row in kept)
    assert len({row["key"] for row in rows}) == 16


def damaged_copy(tmp_path: Path) -> tuple[Path, int]:
    """The CC excerpt with one response's gzip member corrupted, garbage between two members and its end cut off."""
    data = CC.read_bytes()
    offsets, position = [], 0
    while position < len(data):
        inflater = zlib.decompressobj(31)
        inflater.decompress(data[position:])
        offsets.append(position)
        position = len(data) - len(inflater.unused_data)
    damaged = bytearray(data)
    for i in range(offsets[5] + 200, offsets[5] + 260):  # member 5 is the second response record
        damaged[i] ^= 0xFF
    damaged = bytes(damaged[:offsets[10]]) + b"GARBAGE" * 10 + bytes(damaged[offsets[10]:])
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(damaged[:-2000])
    return path, offsets[5]


def test_malformed_records_are_drops_with_a_reason_and_reading_goes_on(tmp_path):
    path, corrupt_offset = damaged_copy(tmp_path)
    rows = rows_of(WarcSource(WarcParams(path=str(path))))
    reasons = Counter(row["drop_reason"] for row in rows)
    assert reasons == {None: 14, "malformed_record": 2, "truncated_record": 1}
    malformed = [row for row in rows if row["drop_reason"] == "malformed_record"]
    assert f"offset {corrupt_offset}" in malformed[0]["drop_detail"]
    intact = {row["source"]["url"] for row in rows_of(WarcSource(WarcParams(path=str(CC))))}
    kept = {row["source"]["url"] for row in rows if row["drop_reason"] is None}
    assert len(intact - kept) == 2 and kept < intact  # the corrupted record and the cut-off last one


def test_clipped_record_is_dropped_unless_kept_and_arc_files_are_read():
    clipped = rows_of(WarcSource(WarcParams(path=str(WARC / "resiliparse_clipped.warc.gz"))))
    assert [row["drop_reason"] for row in clipped] == ["truncated_record"]
    assert "13068 bytes short" in clipped[0]["drop_detail"]
    kept = rows_of(WarcSource(WarcParams(path=str(WARC / "resiliparse_clipped.warc.gz"), keep_truncated=True)))
    assert kept[0]["drop_reason"] is None and len(" ".join(s["text"] or "" for s in kept[0]["segments"])) > 1000
    arc = rows_of(WarcSource(WarcParams(path=str(WARC / "warcio_example.arc.gz"))))
    assert [row["source"]["url"] for row in arc] == ["http://example.com/"]
    assert any("Example Domain" in (s["text"] or "") for s in arc[0]["segments"])


def test_not_a_warc_file_is_one_malformed_row_not_a_crash(tmp_path):
    path = tmp_path / "junk.warc.gz"
    path.write_bytes(b"this is not an archive at all\n" * 10)
    rows = rows_of(WarcSource(WarcParams(path=str(path))))
    assert [row["drop_reason"] for row in rows] == ["malformed_record"]


# --------------------------------------------------------------------------- HTML pages


def test_html_page_list_with_urls_and_opt_out_and_missing_files(tmp_path):
    pages = DATA / "web-pages" / "html"
    (tmp_path / "optout.html").write_text(
        '<html><head><meta name="robots" content="index, noai"></head><body><p>Some text that is long enough '
        "to be a paragraph, with a comma.</p></body></html>", encoding="utf-8")
    listing = tmp_path / "pages.tsv"
    listing.write_text("path\turl\n"
                       f"{pages / 'omnicorpus_demo_origin_page.html'}\thttps://roundtablegauteng.co.za/?page_number_0=4\n"
                       "optout.html\thttps://example.org/optout\n"
                       "missing.html\thttps://example.org/missing\n", encoding="utf-8")
    rows = rows_of(HtmlPagesSource(HtmlPagesParams(path=str(listing))))
    assert [row["drop_reason"] for row in rows] == [None, "opt_out", "bad_input_row"]
    assert len(rows[0]["images"]) == 3 and rows[0]["source"]["url"] == "https://roundtablegauteng.co.za/?page_number_0=4"
    assert load_meta(rows[0]["meta"])["skipped_images"] == {"icon_or_placeholder_url": 1}


def test_shipped_obelics_layout_file_reads_in_mmc4_order():
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()[:4]]
    path = DATA / "interleaved-docs" / "obelics_layout_from_mmc4.first4.parquet"
    rows = rows_of(ObelicsSource(ObelicsParams(path=str(path))))
    assert [actual_order(row) for row in rows] == [expected_order(document) for document in documents]
