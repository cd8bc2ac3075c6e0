"""Every drop can be traced to its input: the drop log's `url` is the most specific locator of the input row
(an image folder's file path, a document's page URL), and images removed from kept documents are in the funnel
(stage counters `images_removed.<reason>`) and in the drop log (rows with `image` set) without breaking
"input rows = output rows + dropped rows", `curate verify`, `curate retry`, the report, diff and side files."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.drop_log import (
    conform_drops,
    count_rows,
    images_removed,
    input_locators,
    original_indices,
    removed_image_rows,
    sample_drops,
)
from curate.engine.retry import retry, retryable_keys
from curate.engine.run import compile_plan, execute
from curate.extract.document import load_meta
from curate.manifest.diff import diff_outputs
from curate.manifest.summary import drop_log_counts, reason_counts
from curate.manifest.verify import verify_output
from curate.recipe import load_recipe
from curate.report.html import build_report
from curate.report.reader import open_output
from curate.schema import DROP_SCHEMA, sample_key

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
MMC4 = DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl"
PHOTOS = sorted((DATA / "dedup").glob("*.jpg"))
DROPPED_DOC = 1  # 8 images, 6 of them not served: too_many_failed_images, the whole document is dropped
TRIMMED_DOC = 0  # 4 images: image 1 is not served (http_404), image 2 is 16x16 (documents.min_image_side)
FLAKY_DOC = 2  # 2 images: image 0 always answers 503 (http_5xx, a retryable reason), the document is kept
MIN_SIDE = 32


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def tiny_jpeg(side: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


def on_port(url: str, port: int) -> str:
    """The image URL on the loopback server's port over plain HTTP; fetch.resolve pins its host to 127.0.0.1."""
    parts = urlsplit(url)
    return urlunsplit(("http", f"{parts.hostname}:{port}", parts.path, parts.query, ""))


def run(recipe: Path, overrides: list[str]) -> dict:
    return execute(compile_plan(load_recipe(recipe, overrides)), Console(file=io.StringIO()), progress=False)


def mmc4_recipe(folder: Path, documents: list[dict], hosts: set[str], on_image_failure: str) -> Path:
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in documents) + "\n", encoding="utf-8")
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "trace",
        "source": {"type": "mmc4", "path": "docs.jsonl"},
        "stages": {
            "fetch": {"on_image_failure": on_image_failure, "allow_private_addresses": True, "retries": 0,
                      "host_rate": None, "resolve": {host: "127.0.0.1" for host in sorted(hosts)}},
            "documents": {"min_image_side": MIN_SIDE, "max_failed_image_share": 0.5},
        },
        "output": {"path": "out", "formats": ["parquet", "webdataset"], "webdataset": {"img2dataset_files": True}},
        "engine": {"rows_per_work_shard": 5},
    }))
    return recipe


def serve(server: LoopbackServer, documents: list[dict], special: dict[tuple[int, int], Route | None]) -> set[str]:
    """Route every image of `documents` to a photo, except those in `special` (None: not served, a 404)."""
    port = int(server.base_url.rsplit(":", 1)[1])
    hosts = set()
    for number, document in enumerate(documents):
        for index, info in enumerate(document["image_info"]):
            info["raw_url"] = on_port(info["raw_url"], port)
            hosts.add(urlsplit(info["raw_url"]).hostname)
            route = special.get((number, index), Route(body=PHOTOS[(number * 7 + index) % len(PHOTOS)].read_bytes()))
            if route is not None:
                server.routes[urlsplit(info["raw_url"]).path] = route
    return hosts


@pytest.fixture(scope="module")
def mmc4_run(tmp_path_factory):
    """MMC4 documents with fetch `on_image_failure: drop_image`: one dropped whole, two kept without images."""
    folder = tmp_path_factory.mktemp("trace")
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()]
    special: dict[tuple[int, int], Route | None] = {(DROPPED_DOC, i): None for i in range(6)}
    special[(TRIMMED_DOC, 1)] = None
    special[(TRIMMED_DOC, 2)] = Route(body=tiny_jpeg())
    special[(FLAKY_DOC, 0)] = Route(body=tiny_jpeg(64), fail_times=10**6, fail_status=503)
    with LoopbackServer() as server:
        hosts = serve(server, documents, special)
        recipe = mmc4_recipe(folder, documents, hosts, "drop_image")
        manifest = run(recipe, [f"output.path={folder / 'out'}"])
        yield folder / "out", manifest, documents, server


def key_of(documents: list[dict], number: int) -> str:
    return sample_key("docs", number, documents[number]["url"])


def position(document: dict, info_index: int) -> int:
    """Where `image_info[info_index]` is in the document: MMC4 places each image after its matched sentence."""
    order = [i for sentence in range(len(document["text_list"]))
             for i, info in enumerate(document["image_info"]) if info["matched_text_index"] == sentence]
    return order.index(info_index)


def test_a_dropped_document_names_its_page_and_removed_images_name_theirs(mmc4_run):
    output, manifest, documents, _ = mmc4_run
    drops = pq.read_table(output / "drops.parquet")
    assert drops.schema.field("image").type == pa.int32()
    rows = drops.to_pylist()
    samples = [row for row in rows if row["image"] is None]
    (dropped,) = [row for row in samples if row["key"] == key_of(documents, DROPPED_DOC)]
    assert (dropped["stage"], dropped["reason"]) == ("documents", "too_many_failed_images")
    assert dropped["url"] == documents[DROPPED_DOC]["url"]  # the page, not its first image
    # The images the dropped document lost are not listed one by one: its sample row stands for them.
    assert not [row for row in rows if row["key"] == key_of(documents, DROPPED_DOC) and row["image"] is not None]

    images = sorted(((row["key"], row["image"], row["url"], row["stage"], row["reason"]) for row in rows
                     if row["image"] is not None), key=lambda r: (r[0] != key_of(documents, TRIMMED_DOC), r[1]))
    trimmed, flaky = documents[TRIMMED_DOC]["image_info"], documents[FLAKY_DOC]["image_info"]
    # In the document, image_info[1] comes first and image_info[2] second (MMC4's sentence order).
    assert [position(documents[TRIMMED_DOC], i) for i in (1, 2)] == [0, 1]
    assert images == [
        (key_of(documents, TRIMMED_DOC), 0, trimmed[1]["raw_url"], "fetch", "http_404"),
        # removed by `documents` after fetch removed image 0: still its index in the document as the source built it
        (key_of(documents, TRIMMED_DOC), 1, trimmed[2]["raw_url"], "documents", "image_too_small"),
        (key_of(documents, FLAKY_DOC), position(documents[FLAKY_DOC], 0), flaky[0]["raw_url"], "fetch", "http_5xx"),
    ]
    detail = next(row["detail"] for row in rows if row["reason"] == "image_too_small")
    assert detail == f"min side 16 < {MIN_SIDE}"
    # The kept documents are in the output, with the same removals in meta.removed_images.
    written = {row["key"]: row for row in pq.read_table(output / "parquet").to_pylist()}
    kept = written[key_of(documents, TRIMMED_DOC)]
    assert [m["url"] for m in kept["image_meta"]] == [trimmed[0]["raw_url"], trimmed[3]["raw_url"]]
    # meta.removed_images has each index as its stage saw the document (after fetch's removal, the tiny one was 0)
    assert [(r["stage"], r["index"]) for r in load_meta(kept["meta"])["removed_images"]] == [("fetch", 0),
                                                                                           ("documents", 0)]


def test_the_funnel_counts_removed_images_per_stage_and_reason_and_rows_still_reconcile(mmc4_run):
    output, manifest, documents, _ = mmc4_run
    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(documents) == totals["output_rows"] + totals["dropped_rows"]
    assert totals["dropped_rows"] == 1
    stages = {stage["name"]: stage for stage in manifest["stages"]}
    not_served = Counter("http_404" for number, document in enumerate(documents)
                         for index, _ in enumerate(document["image_info"])
                         if number == DROPPED_DOC and index < 6 or (number, index) == (TRIMMED_DOC, 1))
    assert images_removed(stages["fetch"]) == {**not_served, "http_5xx": 1} == {"http_404": 7, "http_5xx": 1}
    assert stages["fetch"]["counters"] == {"images_removed.http_404": 7, "images_removed.http_5xx": 1}
    assert stages["fetch"]["dropped"] == {}  # fetch dropped no document
    assert images_removed(stages["documents"]) == {"image_too_small": 1}
    assert stages["documents"]["dropped"] == {"too_many_failed_images": 1}
    drop_log = manifest["drop_log"]
    assert drop_log["rows"] == totals["dropped_rows"] == 1 and drop_log["image_rows"] == 3
    assert drop_log["by_reason"] == {"too_many_failed_images": 1}
    assert drop_log["images_by_reason"] == {"http_404": 1, "http_5xx": 1, "image_too_small": 1}
    assert pq.ParquetFile(output / "drops.parquet").metadata.num_rows == 4 == drop_log["rows"] + drop_log["image_rows"]
    assert reason_counts(output / "drops.parquet") == drop_log["by_reason"]
    report = verify_output(output)
    assert report.ok, report.problems


def test_verify_checks_sample_rows_and_image_rows_apart(mmc4_run, tmp_path):
    output, manifest, _, _ = mmc4_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    edited = {**manifest, "drop_log": {**manifest["drop_log"], "rows": 4, "image_rows": 0}}
    edited["reconciliation"] = {**manifest["reconciliation"], "dropped_rows": 4,
                                "input_rows": manifest["reconciliation"]["input_rows"] + 3}
    (copy / "manifest.json").write_text(json.dumps(edited))
    problems = verify_output(copy).problems
    assert any("1 dropped-sample rows, manifest says 4" in p for p in problems)
    assert any("3 removed-image rows, manifest says 0" in p for p in problems)


def test_retry_leaves_images_removed_from_kept_documents_alone(mmc4_run):
    output, manifest, documents, server = mmc4_run
    flaky = urlsplit(documents[FLAKY_DOC]["image_info"][0]["raw_url"]).path
    hits = server.routes[flaky].hits
    drops = pq.read_table(output / "drops.parquet")
    assert retryable_keys(drops) == {}  # the http_5xx row is an image of a kept document, not a dropped sample
    out = io.StringIO()
    again = retry(output, Console(file=out), progress=False)
    assert "nothing to retry" in out.getvalue()
    assert again == manifest and server.routes[flaky].hits == hits
    assert json.loads((output / "manifest.json").read_text()) == manifest


def test_img2dataset_side_files_count_only_dropped_samples_as_failed_rows(mmc4_run):
    output, manifest, documents, _ = mmc4_run
    metadata = pq.read_table(sorted((output / "webdataset").glob("part-*.parquet"))).to_pylist()
    assert len(metadata) == manifest["reconciliation"]["input_rows"] == len(documents)
    failed = [row for row in metadata if row["status"] != "success"]
    assert [(row["key"], row["url"], row["status"]) for row in failed] == [
        (key_of(documents, DROPPED_DOC), documents[DROPPED_DOC]["url"], "filtered")]
    stats = [json.loads(p.read_text()) for p in sorted((output / "webdataset").glob("part-*_stats.json"))]
    assert sum(s["count"] for s in stats) == len(documents) and sum(s["filtered"] for s in stats) == 1


def test_report_and_diff_keep_dropped_samples_and_removed_images_apart(mmc4_run):
    output, manifest, _, _ = mmc4_run
    page = build_report(open_output(output))
    drops_section = page.split('<section id="drops">', 1)[1].split("</section>", 1)[0]
    assert "Images removed from documents" in drops_section and "image_too_small" in drops_section
    assert "does not reconcile" not in page and "drops.parquet has" not in page
    dropped_section = page.split('<section id="dropped">', 1)[1].split("</section>", 1)[0]
    assert 'data-reason="too_many_failed_images"' in dropped_section
    assert 'data-reason="http_404"' not in dropped_section and 'data-reason="image_too_small"' not in dropped_section
    funnel = page.split('<section id="funnel">', 1)[1].split("</section>", 1)[0]
    assert "images removed" in funnel
    result = diff_outputs(output, output)
    assert result["identical"]
    assert {(r["stage"], r["reason"], r["b"]) for r in result["images_removed"]} == {
        ("fetch", "http_404", 7), ("fetch", "http_5xx", 1), ("documents", "image_too_small", 1)}


def test_retry_merges_image_rows_of_a_document_kept_on_its_second_attempt(tmp_path):
    """fetch drops whole documents here (drop_sample): a 503 drops one, the retry keeps it, and both its new image
    row and the image row of a document kept the first time are in the merged drop log."""
    documents = [json.loads(line) for line in MMC4.read_text(encoding="utf-8").splitlines()[:4]]
    retried, steady = 2, 0
    with LoopbackServer() as server:
        hosts = serve(server, documents, {
            (retried, 0): Route(body=PHOTOS[0].read_bytes(), fail_times=1, fail_status=503),
            (retried, 1): Route(body=tiny_jpeg()),
            (steady, 3): Route(body=tiny_jpeg()),
        })
        recipe = mmc4_recipe(tmp_path, documents, hosts, "drop_sample")
        first = run(recipe, [f"output.path={tmp_path / 'out'}"])
        output = tmp_path / "out"
        rows = pq.read_table(output / "drops.parquet").to_pylist()
        assert [(r["key"], r["url"], r["reason"], r["image"]) for r in rows if r["image"] is None] == [
            (key_of(documents, retried), documents[retried]["url"], "http_5xx", None)]
        assert first["drop_log"]["image_rows"] == 1 and first["reconciliation"]["dropped_rows"] == 1

        merged = retry(output, Console(file=io.StringIO()), progress=False)

    rows = pq.read_table(output / "drops.parquet").to_pylist()
    assert sorted((r["key"], r["image"], r["reason"]) for r in rows) == sorted([
        (key_of(documents, steady), position(documents[steady], 3), "image_too_small"),
        (key_of(documents, retried), position(documents[retried], 1), "image_too_small")])
    totals = merged["reconciliation"]
    assert totals["ok"] and totals["output_rows"] == 4 and totals["dropped_rows"] == 0
    assert merged["drop_log"]["rows"] == 0 and merged["drop_log"]["image_rows"] == 2
    assert merged["drop_log"]["by_reason"] == {} and merged["drop_log"]["images_by_reason"] == {"image_too_small": 2}
    assert merged["retries"][0]["retried_rows"] == 1 and merged["retries"][0]["recovered_rows"] == 1
    assert merged["retries"][0]["dropped_again"] == {}
    documents_stage = next(s for s in merged["stages"] if s["name"] == "documents")
    assert images_removed(documents_stage) == {"image_too_small": 2}
    report = verify_output(output)
    assert report.ok, report.problems


def test_image_folder_drops_name_their_files(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(PHOTOS[0], root / "a.jpg")
    shutil.copy(PHOTOS[1], root / "sub" / "b.jpg")
    (root / "broken.jpg").write_bytes(b"this is not an image")
    (root / "sub" / "tiny.jpg").write_bytes(tiny_jpeg())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "folder",
        "source": {"type": "image_folder", "path": "photos"},
        "stages": {"decode": {"keep_bytes": True},
                   "basic_filter": {"min_side": MIN_SIDE, "drop_empty_captions": False}},
        "output": {"path": str(tmp_path / "out"), "formats": ["parquet"]},
    }))
    manifest = run(recipe, [])
    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == 4 and totals["output_rows"] == 2 and totals["dropped_rows"] == 2
    drops = {row["url"]: row for row in pq.read_table(tmp_path / "out" / "drops.parquet").to_pylist()}
    assert set(drops) == {"broken.jpg", "sub/tiny.jpg"}  # the file's path relative to the folder (its source.id)
    assert (drops["broken.jpg"]["stage"], drops["broken.jpg"]["reason"]) == ("source", "corrupt")
    assert (drops["sub/tiny.jpg"]["stage"], drops["sub/tiny.jpg"]["reason"]) == ("basic_filter", "too_small")
    assert all(row["image"] is None for row in drops.values()) and manifest["drop_log"]["image_rows"] == 0
    assert verify_output(tmp_path / "out").ok


# --------------------------------------------------------------------------- units


def test_input_locators_prefer_the_page_for_documents_and_the_file_for_stored_images():
    table = pa.Table.from_pylist([
        {"kind": "interleaved", "image_meta": [{"url": None}, {"url": "http://i/1.jpg"}],
         "source": {"url": "http://page/", "id": "0"}},
        {"kind": "interleaved", "image_meta": [{"url": None}, {"url": "http://i/1.jpg"}],
         "source": {"url": None, "id": "1"}},
        {"kind": "pair", "image_meta": [{"url": "http://i/a.jpg"}], "source": {"url": "http://page/", "id": "2"}},
        {"kind": "pair", "image_meta": [{"url": None}], "source": {"url": None, "id": "sub/c.jpg"}},
        {"kind": "pair", "image_meta": [], "source": None},
    ])
    assert input_locators(table) == ["http://page/", "http://i/1.jpg", "http://i/a.jpg", "sub/c.jpg", None]


def test_removed_image_rows_give_each_image_its_index_in_the_source_document():
    # Image 1 failed in fetch; then, on the 3 left (0, 2, 3), documents removed indices 1 and 2 (= 2 and 3).
    removed = [{"index": 1, "url": "u1", "stage": "fetch", "reason": "http_404", "detail": None},
               {"index": 1, "url": "u2", "stage": "documents", "reason": "image_too_small", "detail": "d"},
               {"index": 2, "url": "u3", "stage": "documents", "reason": "image_aspect_ratio", "detail": None},
               {"index": 0, "url": "u0", "stage": "image_text_assignment", "reason": "low", "detail": None}]
    assert original_indices(removed) == [1, 2, 3, 0]
    kept = pa.table({"key": ["k", "other"], "meta": [json.dumps({"removed_images": removed}), '{"a": 1}']})
    rows = removed_image_rows(kept).to_pylist()
    assert [(r["key"], r["url"], r["image"], r["stage"]) for r in rows] == [
        ("k", "u1", 1, "fetch"), ("k", "u2", 2, "documents"), ("k", "u3", 3, "documents"),
        ("k", "u0", 0, "image_text_assignment")]


def test_a_drop_log_of_before_image_rows_reads_as_all_sample_rows(tmp_path):
    old_schema = pa.schema([field for field in DROP_SCHEMA if field.name != "image"])
    old = pa.Table.from_pylist([{"key": "a", "url": "u", "stage": "fetch", "reason": "timeout", "detail": None},
                                {"key": "b", "url": None, "stage": "source", "reason": "corrupt", "detail": "x"}],
                               schema=old_schema)
    path = tmp_path / "drops.parquet"
    pq.write_table(old, path)
    assert count_rows(path) == (2, 0)
    assert drop_log_counts(path) == {"rows": 2, "image_rows": 0, "by_reason": {"corrupt": 1, "timeout": 1},
                                     "images_by_reason": {}}
    assert retryable_keys(old) == {"a": "timeout"}
    conformed = conform_drops(old)
    assert conformed.schema == DROP_SCHEMA and conformed.column("image").null_count == 2
    assert sample_drops(old).num_rows == 2
