"""End to end: real MMC4 documents whose images are served by the loopback server -> pipelines/mmc4.yaml on the
engine -> Parquet read back with pyarrow and datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.extract.document import load_meta
from curate.recipe import load_recipe
from curate.schema import sample_key
from curate.sinks.wds_record import row_from_record

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
MMC4 = DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl"
PHOTOS = sorted((DATA / "dedup").glob("*.jpg"))
FAILING_DOC = 1  # 8 images: 6 of them are not served (too_many_failed_images)
ONE_MISSING_DOC = 0  # 4 images: its second image is not served (removed, the document is kept)


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def on_port(url: str, port: int) -> str:
    """The image URL on the loopback server's port, over plain HTTP (the server speaks no TLS); the host name
    stays, and fetch.resolve pins it to 127.0.0.1."""
    parts = urlsplit(url)
    return urlunsplit(("http", f"{parts.hostname}:{port}", parts.path, parts.query, ""))


@pytest.fixture(scope="module")
def mmc4_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmc4")
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()]
    missing: set[str] = set()
    with LoopbackServer() as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        hosts = set()
        for number, document in enumerate(documents):
            for index, info in enumerate(document["image_info"]):
                info["raw_url"] = on_port(info["raw_url"], port)
                hosts.add(urlsplit(info["raw_url"]).hostname)
                lost = (number == FAILING_DOC and index < 6) or (number == ONE_MISSING_DOC and index == 1)
                if lost:
                    missing.add(info["raw_url"])
                else:
                    photo = PHOTOS[(number * 7 + index) % len(PHOTOS)]
                    server.routes[urlsplit(info["raw_url"]).path] = Route(body=photo.read_bytes())
        source = folder / "docs.jsonl"
        source.write_text("\n".join(json.dumps(d) for d in documents) + "\n", encoding="utf-8")
        pins = "{" + ", ".join(f"{host}: 127.0.0.1" for host in sorted(hosts)) + "}"
        recipe = load_recipe(REPO / "pipelines" / "mmc4.yaml", [
            f"source.path={source}", f"output.path={folder / 'out'}", "stages.fetch.allow_private_addresses=true",
            f"stages.fetch.resolve={pins}", "stages.fetch.retries=0", "stages.fetch.host_rate=null",
            "engine.rows_per_work_shard=6"])
        manifest = execute(compile_plan(recipe), Console(file=io.StringIO()), progress=False)
    return folder / "out", manifest, documents, missing


def expected_order(document: dict, missing: set[str]) -> list:
    order = []
    for position, sentence in enumerate(document["text_list"]):
        order.append(sentence)
        order += [("image", i["raw_url"]) for i in document["image_info"]
                  if i["matched_text_index"] == position and i["raw_url"] not in missing]
    return order


def test_every_document_is_written_or_dropped_with_its_reason(mmc4_run):
    output, manifest, documents, _ = mmc4_run
    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(documents) == totals["output_rows"] + totals["dropped_rows"]
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    failing = next(d for d in drops if d["key"] == sample_key("docs", FAILING_DOC, documents[FAILING_DOC]["url"]))
    assert failing["reason"] == "too_many_failed_images" and failing["stage"] == "documents"
    assert "6 of 8 images" in failing["detail"]
    assert manifest["kinds"] == {"interleaved": totals["output_rows"]}


def test_documents_keep_their_order_and_record_failed_images(mmc4_run):
    output, _, documents, missing = mmc4_run
    written = pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()
    by_url = {row["source"]["url"]: row for row in written}
    assert documents[ONE_MISSING_DOC]["url"] in by_url
    for document in documents:
        row = by_url.get(document["url"])
        if row is None:
            continue
        urls = [m["url"] for m in row["image_meta"]]
        order = [s["text"] if s["text"] is not None else ("image", urls[s["image"]]) for s in row["segments"]]
        assert order == expected_order(document, missing)
        assert all(image["bytes"] and meta["width"] for image, meta in zip(row["images"], row["image_meta"]))
        meta = load_meta(row["meta"])
        assert meta["similarity_matrix"] == document["similarity_matrix"]
        assert len(meta["image_text"]["assignment"]) == len(urls)
        assert row["scores"]["clip_score"] is not None
    removed = load_meta(by_url[documents[ONE_MISSING_DOC]["url"]]["meta"])["removed_images"]
    assert [(r["url"], r["reason"], r["stage"]) for r in removed] == [
        (documents[ONE_MISSING_DOC]["image_info"][1]["raw_url"], "http_404", "fetch")]


def test_parquet_reads_back_the_same_with_pyarrow_and_datasets(mmc4_run, tmp_path):
    import datasets

    output, manifest, _, _ = mmc4_run
    files = sorted(str(p) for p in (output / "parquet").glob("*.parquet"))
    written = pq.read_table(files).to_pylist()
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == len(written) == manifest["outputs"]["rows"] > 0
    loaded.set_format("arrow")
    as_arrow = loaded.data.table.to_pylist()
    for ours, theirs in zip(written, as_arrow):
        assert ours == theirs
    with_images = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf2"))
    first = with_images[0]
    assert len(first["images"]) == len(written[0]["images"]) and first["images"][0].size[0] > 0


def test_webdataset_shards_hold_the_same_documents(mmc4_run):
    import msgpack
    import webdataset

    output, _, _, _ = mmc4_run
    written = {row["key"]: row for row in pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()}
    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    samples = list(webdataset.WebDataset(tars, shardshuffle=False))
    assert {s["__key__"] for s in samples} == set(written)
    for sample in samples:
        row = written[sample["__key__"]]
        images = msgpack.unpackb(sample["images.mp"], raw=False)
        assert images == [image["bytes"] for image in row["images"]]
        assert row_from_record(json.loads(sample["json"]), images)["segments"] == row["segments"]
