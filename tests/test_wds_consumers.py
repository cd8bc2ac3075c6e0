"""Outputs that other people's code reads.

The bundled pair and edit recipes (demo as "pairs", download, edit; the document recipes are in
tests/test_wds_documents.py) run on inputs that leave fields null in the first 100 samples and set them
after: dedup groups, face boxes, a caption variant, a precomputed nsfw score, captions, extra columns,
source/target captions. Each output is loaded by `datasets` (webdataset and parquet loaders) and
`webdataset.WebDataset`; code written the way img2dataset users write it reads the tars and img2dataset's
side files; `curate export --to wds` keeps caption text and fetched sizes.
"""

from __future__ import annotations

import hashlib
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
import yaml
from PIL import Image, ImageDraw
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.demo.web import COLOURS, SHAPES, Scene, draw_scene
from curate.engine.run import compile_plan, execute
from curate.export import ExportOptions, export_output
from curate.recipe import load_recipe
from curate.sinks.wds_record import record_features, row_from_record

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
FACES = [DATA / "safety" / "000000497558.jpg", DATA / "safety" / "000000419173.jpg"]  # one frontal face each
PHOTOS = sorted((DATA / "dedup").glob("*.jpg"))
FIRST = 100  # samples whose fields stay null or absent
CAPTIONS_ZH = ["一只红色的圆形在白色背景上", "两个蓝色的正方形", "三颗黄色的星星"]


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def scene(i: int) -> Scene:
    colours = [c for c in COLOURS if c not in ("white", "black")]
    background = "white" if i % 2 else "black"
    return Scene(1 + i % 3, colours[i % len(colours)], SHAPES[(i // 3) % len(SHAPES)], background)


def scene_bytes(i: int, size: tuple[int, int], fmt: str = "JPEG", quality: int = 90) -> bytes:
    """A drawing of scene(i), with a grey band whose place depends on i (no two drawings are near copies)."""
    image = draw_scene(scene(i), *size, layout_seed=i)
    width, height = size
    top = height * ((i * 37) % 75) // 100
    ImageDraw.Draw(image).rectangle([0, top, width * ((i % 5) + 1) // 6, top + height // 6], fill=(128, 128, 128))
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def run(recipe: Path, overrides: list[str]) -> dict:
    return execute(compile_plan(load_recipe(recipe, overrides)), Console(file=io.StringIO()), progress=False)


def with_stages(recipe: Path, folder: Path, after: dict[str, dict[str, dict]]) -> Path:
    """A copy of a bundled recipe with stages added right after the named ones (phases stay contiguous)."""
    data = yaml.safe_load(recipe.read_text())
    stages = {}
    for name, params in data["stages"].items():
        stages[name] = params
        stages.update(after.get(name, {}))
    data["stages"] = stages
    copy = folder / recipe.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy


def stored_row(row: dict) -> dict:
    """A Parquet row as the `.json` record stands for it: no embeddings, NaN scores as not computed."""
    row = {k: v for k, v in row.items() if k != "embeddings"}
    if row["scores"] is not None:
        scores = {k: None if v is None or np.isnan(v) else v for k, v in row["scores"].items()}
        row["scores"] = scores if any(v is not None for v in scores.values()) else None
    row["captions"] = sorted(row["captions"], key=lambda c: c["name"])
    return row


def tar_files(output: Path) -> list[str]:
    return sorted(str(p) for p in (output / "webdataset").glob("*.tar"))


def parquet_rows(output: Path) -> list[dict]:
    return pq.read_table(sorted((output / "parquet").glob("*.parquet"))).to_pylist()


def sample_images(sample: dict) -> list[bytes]:
    """The image bytes of a decoded webdataset / datasets sample, either layout."""
    if "images.mp" in sample:
        return list(sample["images.mp"])
    numbered = {0 if "." not in k else int(k.split(".")[0]): v for k, v in sample.items()
                if k not in ("json", "txt") and not k.startswith("__")}
    return [numbered[i] for i in sorted(numbered)]


def check_every_reader(output: Path, manifest: dict, tmp_path: Path) -> list[dict]:
    """Load `output` with the three readers; every count, key, record and image agrees with Parquet."""
    rows = manifest["reconciliation"]["output_rows"]
    assert manifest["reconciliation"]["ok"] and rows > FIRST
    tars = tar_files(output)
    parquet = parquet_rows(output)
    from_hf = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "wds"))
    from_parquet = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (output / "parquet").glob("*")),
                                         split="train", cache_dir=str(tmp_path / "pq"))
    from_wds = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode())
    assert len(from_hf) == len(from_parquet) == len(from_wds) == len(parquet) == rows
    assert dict(from_hf.features["json"]) == dict(record_features())  # the types never vary
    keys = [row["key"] for row in parquet]
    assert list(from_hf["__key__"]) == [s["__key__"] for s in from_wds] == list(from_parquet["key"]) == keys
    for stored, hf_sample, wds_sample in zip(parquet, from_hf.with_format("python"), from_wds):
        written = [image["bytes"] for image in stored["images"]]
        assert sample_images(wds_sample) == written
        assert hf_sample["json"] == wds_sample["json"]
        assert row_from_record(wds_sample["json"], written) == stored_row(stored)
        assert hf_sample["txt"] == wds_sample["txt"] == wds_sample["json"]["caption"]
    return parquet


# --------------------------------------------------------------------------- pairs (demo.yaml) on LAION-style shards


def laion_style_tar(path: Path, base_url: str) -> list[dict]:
    """An img2dataset-layout tar of 112 pairs, as LAION-style downloads are: `punsafe` only from sample 100 on,
    two face photos, a byte copy and a re-encoded copy after sample 100."""
    samples = []
    for i in range(112):
        if i in (104, 106):
            data = FACES[i == 106].read_bytes()
            caption = "a woman sitting in a chair reading a magazine" if i == 104 else "a woman holding a racquet"
        elif i == 108:
            data, caption = samples[103]["jpg"], samples[103]["caption"]  # a byte copy
        elif i == 110:
            data, caption = scene_bytes(105, (2 * (96 + 105 % 40), 160)), samples[105]["caption"]  # twice the size
        else:
            data, caption = scene_bytes(i, (96 + i % 40, 80)), scene(i).caption()
        if i % 10 == 7:
            caption = CAPTIONS_ZH[i % 3]  # non-English captions among them
        record = {"url": f"{base_url}/img/{i}.jpg", "caption": caption, "key": f"{i:09d}", "status": "success",
                  "error_message": None, "uid": hashlib.md5(str(i).encode()).hexdigest()}
        if i >= FIRST:
            record["punsafe"] = round(0.01 * (i - FIRST), 3)
        samples.append({"key": f"{i:09d}", "jpg": data, "caption": caption, "record": record})
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in (("jpg", sample["jpg"]), ("txt", sample["caption"].encode()),
                                 ("json", json.dumps(sample["record"]).encode())):
                info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return samples


@pytest.fixture(scope="module")
def pairs_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    samples = laion_style_tar(folder / "00000.tar", "http://images.example")
    dense = [{"url": s["record"]["url"], "text": f"a dense description of picture {i}"}
             for i, s in enumerate(samples) if i >= FIRST]
    pq.write_table(pa.Table.from_pylist(dense), folder / "dense.parquet")
    recipe = with_stages(REPO / "pipelines" / "demo.yaml", folder, {
        "fetch": {"decode": {"keep_bytes": True}},  # stored images: sizes and fingerprints for dedup
        "basic_filter": {"caption_join": {"path": str(folder / "dense.parquet"), "on": "url", "column": "url",
                                          "text_column": "text", "name": "dense"}},
        "watermark": {"faces": {}},
    })
    manifest = run(recipe, [
        "source={type: image_shards, path: " + str(folder / "00000.tar") + ", scores: {nsfw: punsafe}}",
        f"output.path={folder / 'out'}", "output.shard_rows=40", "output.webdataset.img2dataset_files=true",
        # every sample is kept but the copies: the tiny models' thresholds are for the demo web, not these drawings
        "stages.clip_score.min_score=null", "stages.aesthetic.min_score=null", "stages.watermark.max_score=null",
        "stages.basic_filter.min_caption_words=1"])
    return folder / "out", manifest, samples


def test_pairs_output_loads_with_every_reader(pairs_run, tmp_path):
    output, manifest, samples = pairs_run
    assert manifest["reconciliation"]["input_rows"] == len(samples)
    assert manifest["drop_log"]["by_reason"] == {"duplicate_exact": 1, "duplicate_perceptual": 1}
    parquet = check_every_reader(output, manifest, tmp_path)

    def meta(row):
        return json.loads(row["meta"] or "{}")

    first, later = parquet[:FIRST], parquet[FIRST:]
    # null or absent in the first 100 samples ...
    assert all("dedup" not in meta(r) for r in first) and all(r["scores"]["nsfw"] is None for r in first)
    assert all(meta(r)["faces"] == [[]] for r in first)
    assert all([c["name"] for c in r["captions"]] == ["alt"] for r in first)
    # ... and set after
    assert any("dedup" in meta(r) for r in later) and all(r["scores"]["nsfw"] is not None for r in later)
    assert sum(1 for r in later if meta(r)["faces"][0]) == 2
    assert all("dense" in [c["name"] for c in r["captions"]] for r in later)


def test_pairs_json_reads_like_img2dataset_and_datacomp_fields(pairs_run):
    output, _, samples = pairs_run
    by_url = {s["record"]["url"]: s for s in samples}
    seen = 0
    for tar_path in tar_files(output):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in [n for n in members if n.endswith(".json")]:
            key = name[: -len(".json")]
            record = json.loads(members[name])
            source = by_url[record["url"]]
            assert record["uid"] == source["record"]["uid"]  # DataComp's uid, carried from the input
            assert record["caption"] == members[f"{key}.txt"].decode() == source["caption"]
            assert record["sha256"] == hashlib.sha256(source["jpg"]).hexdigest()
            with Image.open(io.BytesIO(members[f"{key}.jpg"])) as image:
                assert (record["width"], record["height"]) == image.size
            assert (record["status"], record["error_message"]) == ("success", "")
            seen += 1
    assert seen == len(samples) - 2


def test_img2dataset_side_files_account_for_every_input_row(pairs_run):
    output, manifest, samples = pairs_run
    folder = output / "webdataset"
    tars = sorted(folder.glob("part-*.tar"))
    assert len(tars) == 3
    sizes = json.loads((folder / "sizes.json").read_text())
    assert sizes == {s["path"].split("/")[-1]: s["rows"] for s in manifest["outputs"]["shards"]
                     if s["format"] == "webdataset"}
    stats = [json.loads((folder / f"{t.stem}_stats.json").read_text()) for t in tars]
    metadata = pa.concat_tables([pq.read_table(folder / f"{t.stem}.parquet") for t in tars]).to_pylist()
    assert sum(s["count"] for s in stats) == len(metadata) == len(samples)
    assert sum(s["successes"] for s in stats) == manifest["reconciliation"]["output_rows"]
    assert sum(s["filtered"] for s in stats) == 2 and sum(s["failed_to_download"] for s in stats) == 0
    for tar, stat in zip(tars, stats):
        assert stat["successes"] == sizes[tar.name]
        assert stat["count"] == sum(stat["status_dict"].values())
    failed = [row for row in metadata if row["status"] != "success"]
    assert sorted(row["error_message"].split(":")[0] for row in failed) == ["duplicate_exact", "duplicate_perceptual"]
    copies = [{samples[a]["record"]["url"], samples[b]["record"]["url"]} for a, b in ((103, 108), (105, 110))]
    assert all(len(pair & {row["url"] for row in failed}) == 1 for pair in copies)  # one of each pair of copies


# --------------------------------------------------------------------------- download.yaml on a URL list


@pytest.fixture(scope="module")
def download_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("download")
    routes, rows, served = {}, [], {}
    for i in range(112):
        if i % 9 == 4:
            body = PHOTOS[i % len(PHOTOS)].read_bytes()  # real COCO photos, 640 px: resized to 512
        else:
            body = scene_bytes(i, (200 + 7 * i, 150 + 3 * i), fmt="PNG" if i % 5 == 0 else "JPEG")
        routes[f"/d/{i}.img"] = Route(body=body)
        served[f"/d/{i}.img"] = body
        caption = None if i < FIRST else (CAPTIONS_ZH[i % 3] if i % 4 == 0 else scene(i).caption())
        rows.append({"path": f"/d/{i}.img", "caption": caption, "note": None if i < FIRST else f"note {i}"})
    routes["/d/text.img"] = Route(body=b"<html>not an image</html>", content_type="image/jpeg")
    rows.insert(105, {"path": "/d/missing.img", "caption": "gone", "note": "404"})
    rows.insert(107, {"path": "/d/text.img", "caption": "text", "note": "not an image"})
    with LoopbackServer(routes) as server:
        for row in rows:
            row["url"] = server.url(row.pop("path"))
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
            [("url", pa.string()), ("caption", pa.string()), ("note", pa.string())])), folder / "urls.parquet")
        manifest = run(REPO / "pipelines" / "download.yaml", [
            f"source.path={folder / 'urls.parquet'}", f"output.path={folder / 'out'}",
            "stages.fetch.allow_private_addresses=true", "stages.fetch.retries=0",
            "output.formats=[webdataset, parquet]", "output.shard_rows=50", "output.webdataset.img2dataset_files=true"])
    return folder / "out", manifest, rows, served


def test_download_output_loads_with_every_reader(download_run, tmp_path):
    output, manifest, rows, _ = download_run
    assert manifest["drop_log"]["by_reason"] == {"http_404": 1, "not_image": 1}
    parquet = check_every_reader(output, manifest, tmp_path)
    first, later = parquet[:FIRST], parquet[FIRST:]
    assert all(r["captions"] == [] for r in first)
    assert all(r["meta"] is None or json.loads(r["meta"]).get("note") is None for r in first)
    assert all(r["captions"][0]["name"] == "alt" and r["captions"][0]["text"] for r in later)
    assert all(json.loads(r["meta"])["note"].startswith("note") for r in later)


def test_img2dataset_style_consumer_reads_every_field(download_run):
    """Code as img2dataset users write it: iterate the tar, json.loads the .json, read the flat fields."""
    output, manifest, rows, served = download_run
    by_url = {row["url"]: row for row in rows}
    count = 0
    for tar_path in tar_files(output):
        tar = tarfile.open(tar_path)
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            key = name.split(".")[0]
            meta = json.loads(data)
            row = by_url[meta["url"]]
            body = served["/" + meta["url"].split("/", 3)[3]]
            original = Image.open(io.BytesIO(body))
            stored = Image.open(io.BytesIO(members[key + ".jpg"]))
            assert meta["key"] == key
            assert meta["caption"] == (row["caption"] or "") == members[key + ".txt"].decode("utf-8")
            assert (meta["original_width"], meta["original_height"]) == original.size
            assert (meta["width"], meta["height"]) == stored.size
            assert max(stored.size) == min(512, max(original.size))  # download.yaml: longest side 512, if bigger
            assert meta["sha256"] == hashlib.sha256(body).hexdigest()
            assert meta["status"] == "success" and meta["error_message"] == ""
            assert meta["uid"] and meta["uid"] == json.loads(members[name])["uid"]
            count += 1
    assert count == manifest["reconciliation"]["output_rows"] == len(rows) - 2
    statuses = {}
    for path in sorted((output / "webdataset").glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            statuses[row["url"].rsplit("/", 1)[1]] = (row["status"], row["error_message"])
    assert len(statuses) == len(rows)
    assert statuses["missing.img"][0] == "failed_to_download" and statuses["missing.img"][1].startswith("http_404")
    assert statuses["text.img"][0] == "failed_to_resize" and statuses["text.img"][1].startswith("not_image")


def test_export_to_wds_keeps_caption_text_and_fetched_sizes(download_run, tmp_path):
    output, _, rows, served = download_run
    dest = tmp_path / "export"
    exported = export_output(output, dest, "wds", options=ExportOptions(shard_rows=30))
    assert exported["rows"] == sum(1 for r in rows if r["caption"]) - 2  # uncaptioned pairs are skipped
    assert json.loads((dest / "sizes.json").read_text()) == {Path(f["path"]).name: f["rows"]
                                                              for f in exported["files"]}
    by_url = {row["url"]: row for row in rows}
    resized = 0
    for sample in wds.WebDataset(sorted(str(p) for p in dest.glob("*.tar")), shardshuffle=False,
                                 empty_check=False).decode("pil"):
        record = sample["json"]
        body = served["/" + record["url"].split("/", 3)[3]]
        original = Image.open(io.BytesIO(body)).size
        assert record["caption"] == sample["txt"] == by_url[record["url"]]["caption"]
        assert (record["original_width"], record["original_height"]) == original
        assert (record["width"], record["height"]) == sample["jpg"].size
        resized += sample["jpg"].size != original
    assert resized > 0  # the fetch resized some, and the export still names their original size


# --------------------------------------------------------------------------- edit.yaml on InstructPix2Pix-layout rows


@pytest.fixture(scope="module")
def edit_run(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = []
    for i in range(108):
        rows.append({
            "id": f"edit-{i}",
            "original_image": {"bytes": scene_bytes(i, (96, 80), fmt="PNG"), "path": None},
            "edited_image": {"bytes": scene_bytes(i + 1, (96, 80)), "path": None},
            "edit_prompt": f"turn it into {scene(i + 1).caption()}",
            "original_prompt": None if i < FIRST else scene(i).caption(),
            "edited_prompt": None if i < FIRST else scene(i + 1).caption(),
        })
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("original_image", image), ("edited_image", image), ("edit_prompt", pa.string()),
        ("original_prompt", pa.string()), ("edited_prompt", pa.string())]))
    pq.write_table(table, folder / "edits.parquet")
    manifest = run(REPO / "pipelines" / "edit.yaml", [
        f"source.path={folder / 'edits.parquet'}", f"output.path={folder / 'out'}", "output.shard_rows=40",
        "stages.basic_filter.min_side=32"])
    return folder / "out", manifest, rows


def test_edit_output_loads_with_every_reader(edit_run, tmp_path):
    output, manifest, rows = edit_run
    assert manifest["reconciliation"]["input_rows"] == len(rows)
    parquet = check_every_reader(output, manifest, tmp_path)
    names = [sorted(c["name"] for c in r["captions"]) for r in parquet]
    assert all(not n for n in names[:FIRST]) and all(n for n in names[FIRST:])
    with tarfile.open(tar_files(output)[0]) as tar:
        first = tar.next()
        assert first.name.endswith(".images.mp")
        assert len(msgpack.unpackb(tar.extractfile(first).read())) == 2
