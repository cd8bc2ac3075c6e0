"""Outputs of the bundled document recipes that other people's code reads.

pipelines/mmc4.yaml, pipelines/obelics.yaml and pipelines/warc.yaml (each with the nsfw stage added at the end)
run on the same 107 real MMC4 documents, as MMC4 jsonl, as OBELICS-layout Parquet and as HTML pages in a WARC
file. The inputs leave notes out of the first 100 output documents and put them in later ones: two of the last
documents get a near-copy at the end of the input (dedup_text notes the kept member's group in meta.dedup) and
two others lose one image to a 404 (meta.removed_images). `datasets` infers the `.json` types of a WebDataset
from its first five samples, so every later sample must read with them. Each output is loaded by
`datasets.load_dataset("webdataset")`, `datasets.load_dataset("parquet")` and `webdataset.WebDataset`; every
reader sees every document, in Parquet's order, and every `.json` record stands for its Parquet row.
"""

from __future__ import annotations

import copy
import functools
import html
import io
import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import urllib3
import webdataset as wds
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe
from curate.sinks.wds_record import record_features, row_from_record

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
MMC4 = DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first107.jsonl"
PHOTOS = sorted((DATA / "dedup").glob("*.jpg"))  # 16 real photos, 167-320 px a side, served as every image
FIRST = 100  # output documents without any note
DUPLICATED = (104, 105)  # documents whose near-copy is appended to the input
FAILING = (103, 106)  # documents with one image (index 1) the server answers 404 for
MIRROR = "?utm_source=mirror"  # appended to a near-copy's URL: another URL, so not a duplicate_url
SHARD_ROWS = 40  # several output shards
RECIPES = ("mmc4", "obelics", "warc")


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


# --------------------------------------------------------------------------- inputs


def on_port(url: str, port: int) -> str:
    """The image URL on the loopback server's port over plain HTTP; fetch.resolve pins its host to 127.0.0.1."""
    parts = urlsplit(url)
    return urlunsplit(("http", f"{parts.hostname}:{port}", parts.path, parts.query, ""))


def served_path(url: str) -> str:
    """The request path the fetcher sends for `url` (urllib3 percent-encodes spaces and the like)."""
    return urllib3.util.parse_url(url).path


def documents_on(port: int) -> tuple[list[dict], set[str]]:
    """The input documents in order (the 107 real ones, then the near-copies) and the image URLs that 404.

    The originals of the copies and the documents that lose an image are among the last four real documents,
    and a copy goes after all of them, so every document with a note is after the first 100 outputs (dedup
    notes every kept member of a group, so the original must be late too, not only its copy).
    """
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()]
    assert len(documents) == 107
    for document in documents:
        for info in document["image_info"]:
            info["raw_url"] = on_port(info["raw_url"], port)
    missing = {documents[n]["image_info"][1]["raw_url"] for n in FAILING}
    others = {served_path(info["raw_url"]) for n, document in enumerate(documents) if n not in FAILING
              for info in document["image_info"]}
    assert not others & {served_path(url) for url in missing}  # the 404 paths belong to those documents only
    for n in DUPLICATED:
        near = copy.deepcopy(documents[n])
        near["url"] = documents[n]["url"] + MIRROR
        near["text_list"][0] = "Update: " + near["text_list"][0]
        near["text_list"][-1] = near["text_list"][-1] + " Thanks for reading."
        documents.append(near)
    return documents, missing


def serve(server: LoopbackServer, documents: list[dict], missing: set[str]) -> str:
    """Routes for every image but the missing ones; the fetch.resolve pins of their hosts."""
    hosts = set()
    for number, document in enumerate(documents):
        for index, info in enumerate(document["image_info"]):
            hosts.add(urlsplit(info["raw_url"]).hostname)
            if info["raw_url"] not in missing:
                photo = PHOTOS[(number * 7 + index) % len(PHOTOS)]
                server.routes[served_path(info["raw_url"])] = Route(body=photo.read_bytes())
    return "{" + ", ".join(f"{host}: 127.0.0.1" for host in sorted(hosts)) + "}"


def reading_order(document: dict) -> list[tuple[str, str]]:
    """MMC4's reading order: each sentence followed by the images matched to it."""
    order = []
    for position, sentence in enumerate(document["text_list"]):
        order.append(("text", sentence))
        order += [("image", info["raw_url"]) for info in document["image_info"]
                  if info["matched_text_index"] == position]
    return order


def write_mmc4(documents: list[dict], folder: Path) -> Path:
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    return path


def write_obelics(documents: list[dict], folder: Path) -> Path:
    """The documents in the OBELICS layout: parallel images/texts lists in reading order, metadata JSON."""
    columns = {"images": [], "texts": [], "metadata": [], "general_metadata": []}
    for document in documents:
        order = reading_order(document)
        columns["images"].append([value if kind == "image" else None for kind, value in order])
        columns["texts"].append([value if kind == "text" else None for kind, value in order])
        columns["metadata"].append(json.dumps([{"src": value, "alt_text": ""} if kind == "image" else None
                                               for kind, value in order]))
        columns["general_metadata"].append(json.dumps({"url": document["url"]}))
    types = pa.schema([("images", pa.list_(pa.string())), ("texts", pa.list_(pa.string())),
                       ("metadata", pa.string()), ("general_metadata", pa.string())])
    path = folder / "docs.parquet"
    pq.write_table(pa.table(columns, schema=types), path)
    return path


def page_html(document: dict, number: int) -> bytes:
    """An HTML page of the document: navigation and footer around an article of one paragraph per sentence,
    each image (width/height attributes of a photo's size, so no image reads as an icon) after its matched sentence."""
    host = urlsplit(document["url"]).hostname
    body = []
    for index, (kind, value) in enumerate(reading_order(document)):
        if kind == "text":
            body.append(f"<p>{html.escape(value)}</p>")
        else:
            photo = next(i for i, info in enumerate(document["image_info"]) if info["raw_url"] == value)
            width, height = photo_size(PHOTOS[(number * 7 + photo) % len(PHOTOS)])
            src = urllib3.util.parse_url(value).url
            body.append(f'<figure><img src="{html.escape(src)}" width="{width}" height="{height}" '
                        f'alt="picture {index}"></figure>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(host)}</title>'
            f'</head><body><header><nav><a href="/">Home</a> <a href="/about">About us</a> '
            f'<a href="/contact">Contact</a></nav></header><main><article>{"".join(body)}</article></main>'
            f'<footer><p>Copyright {html.escape(host)}. All rights reserved.</p></footer></body></html>')
    return page.encode("utf-8")


@functools.cache
def photo_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def write_warc(documents: list[dict], folder: Path) -> Path:
    """A gzipped WARC: a warcinfo record, then per document a response record of its HTML page."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = folder / "crawl.warc.gz"
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        writer.write_record(writer.create_warcinfo_record("crawl.warc.gz", {"software": "curate tests"}))
        for number, document in enumerate(documents):
            body = page_html(document, number)
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                  ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(document["url"], "response", payload=io.BytesIO(body),
                                                          http_headers=headers))
    return path


WRITERS = {"mmc4": write_mmc4, "obelics": write_obelics, "warc": write_warc}


def run_recipe(name: str, folder: Path) -> tuple[Path, dict, list[dict], set[str]]:
    documents_folder = folder / "in"
    documents_folder.mkdir()
    with LoopbackServer() as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        documents, missing = documents_on(port)
        pins = serve(server, documents, missing)
        source = WRITERS[name](documents, documents_folder)
        # No document filter is relaxed: 105 of the 109 inputs are written by each recipe (two real documents
        # repeat paragraphs, two copies are near-duplicates), and the photos (167-320 px a side, aspect at most 1.92)
        # pass every recipe's image rules, OBELICS's 150 px minimum side included.
        recipe = load_recipe(REPO / "pipelines" / f"{name}.yaml", [
            f"source.path={source}", f"output.path={folder / 'out'}", f"output.shard_rows={SHARD_ROWS}",
            "stages.fetch.allow_private_addresses=true", f"stages.fetch.resolve={pins}", "stages.fetch.retries=0",
            "stages.fetch.host_rate=null",
            # added after the bundled stages: scores.nsfw for every document (no max_score: nothing dropped); NudeNet's
            # ONNX model takes any input side, and 160 px instead of 320 makes its ~420 images 4x cheaper to score
            "stages.nsfw={input_size: 160}",
        ])
        assert list(recipe.stage_params)[-1] == "nsfw"
        manifest = execute(compile_plan(recipe), Console(file=io.StringIO()), progress=False)
    return folder / "out", manifest, documents, missing


@pytest.fixture(scope="module")
def mmc4_run(local_ray, tmp_path_factory):
    return run_recipe("mmc4", tmp_path_factory.mktemp("mmc4"))


@pytest.fixture(scope="module")
def obelics_run(local_ray, tmp_path_factory):
    return run_recipe("obelics", tmp_path_factory.mktemp("obelics"))


@pytest.fixture(scope="module")
def warc_run(local_ray, tmp_path_factory):
    return run_recipe("warc", tmp_path_factory.mktemp("warc"))


# --------------------------------------------------------------------------- reading back


def parquet_files(output: Path) -> list[str]:
    return sorted(str(p) for p in (output / "parquet").glob("*.parquet"))


def tar_files(output: Path) -> list[str]:
    return sorted(str(p) for p in (output / "webdataset").glob("*.tar"))


def meta_of(row: dict) -> dict:
    return json.loads(row["meta"] or "{}")


def stored_row(row: dict) -> dict:
    """A Parquet row as the `.json` record stands for it: no embeddings, NaN scores as not computed."""
    row = {k: v for k, v in row.items() if k != "embeddings"}
    if row["scores"] is not None:
        scores = {k: None if v is None or np.isnan(v) else v for k, v in row["scores"].items()}
        row["scores"] = scores if any(v is not None for v in scores.values()) else None
    return row


@pytest.mark.parametrize("name", RECIPES)
def test_notes_appear_only_after_the_first_100_documents(name, request):
    output, manifest, documents, missing = request.getfixturevalue(f"{name}_run")
    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(documents) == totals["output_rows"] + totals["dropped_rows"]
    rows = pq.read_table(parquet_files(output)).to_pylist()
    assert len(rows) == totals["output_rows"] > FIRST
    assert len(tar_files(output)) == len(parquet_files(output)) == -(-len(rows) // SHARD_ROWS) >= 3
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    assert sorted(d["reason"] for d in drops if d["stage"] == "dedup_text") == ["duplicate_text"] * len(DUPLICATED)
    assert not [d for d in drops if d["stage"] == "nsfw"]

    # every document holds its sentences (HTML collapses the line breaks of a few), nothing of the pages' boilerplate
    sentences = {d["url"]: [" ".join(t.split()) if name == "warc" else t for t in d["text_list"]] for d in documents}
    assert all([s["text"] for s in r["segments"] if s["text"] is not None] == sentences[r["source"]["url"]]
               for r in rows)

    position = {row["source"]["url"]: i for i, row in enumerate(rows)}
    assert len(position) == len(rows)
    # the documents of the notes are the last outputs (a near-copy or its original, whichever dedup kept)
    late = {position.get(documents[n]["url"], position.get(documents[n]["url"] + MIRROR))
            for n in (*DUPLICATED, *FAILING)}
    assert None not in late and min(late) >= FIRST

    first, later = rows[:FIRST], rows[FIRST:]
    # absent from the first 100 documents ...
    assert all("dedup" not in meta_of(r) and "removed_images" not in meta_of(r) for r in first)
    # ... and set in later ones: the kept member of each near-duplicate pair, each document that lost an image
    grouped = [r for r in later if "dedup" in meta_of(r)]
    assert len(grouped) == len(DUPLICATED)
    assert all(set(meta_of(r)["dedup"]) == {"text"} and meta_of(r)["dedup"]["text"]["group"] == r["key"]
               for r in grouped)
    removed = [r for r in later if "removed_images" in meta_of(r)]
    assert sorted(position[documents[n]["url"]] for n in FAILING) == [rows.index(r) for r in removed]
    for row in removed:
        (entry,) = meta_of(row)["removed_images"]
        assert (entry["reason"], entry["stage"]) == ("http_404", "fetch")
        assert served_path(entry["url"]) in {served_path(url) for url in missing}
        assert row["images"] and len(row["images"]) == len(row["image_meta"])
    # set for every document (it has images): scores.nsfw from the added stage
    assert all(r["images"] and 0.0 <= r["scores"]["nsfw"] <= 1.0 for r in rows)
    assert all(r["scores"]["clip_score"] is not None for r in rows)


@pytest.mark.parametrize("name", RECIPES)
def test_output_loads_with_every_reader(name, request, tmp_path):
    output, manifest, _, _ = request.getfixturevalue(f"{name}_run")
    count = manifest["reconciliation"]["output_rows"]
    assert count > FIRST
    tars, files = tar_files(output), parquet_files(output)
    parquet = pq.read_table(files).to_pylist()
    from_hf = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "wds"))
    from_parquet = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "pq"))
    from_wds = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode())
    assert len(from_hf) == len(from_parquet) == len(from_wds) == len(parquet) == count

    # the types `datasets` inferred from the first five samples are exactly the record schema's
    assert dict(from_hf.features["json"]) == dict(record_features())
    assert from_hf.features["images.mp"] == datasets.List(datasets.Value("binary"))

    keys = [row["key"] for row in parquet]
    assert list(from_hf["__key__"]) == [s["__key__"] for s in from_wds] == list(from_parquet["key"]) == keys
    assert len(set(keys)) == count
    from_parquet.set_format("arrow")
    assert from_parquet.data.table.drop_columns(["embeddings"]).to_pylist() == [
        {k: v for k, v in row.items() if k != "embeddings"} for row in parquet]

    for stored, hf_sample, wds_sample in zip(parquet, from_hf.with_format("python"), from_wds):
        written = [image["bytes"] for image in stored["images"]]
        assert list(wds_sample["images.mp"]) == list(hf_sample["images.mp"]) == written
        assert hf_sample["json"] == wds_sample["json"]
        assert row_from_record(wds_sample["json"], written) == stored_row(stored)
        assert hf_sample["txt"] == wds_sample["txt"] == wds_sample["json"]["caption"]
        assert wds_sample["txt"] == "\n\n".join(s["text"] for s in stored["segments"] if s["text"] is not None)
