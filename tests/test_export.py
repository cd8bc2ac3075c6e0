"""`curate export`: every format from one output of pairs, edits and documents (real photos, real InstructPix2Pix
triplets, real MMC4 text), with roles, caption policies and resolutions, read back with pyarrow, tarfile and json."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate import schema
from curate.cli import app
from curate.edit_sample import ChainTurn, dump_meta, lay_out_chain
from curate.export import ExportError, ExportOptions, export_output
from curate.export.common import parse_resolution, target_size
from curate.files import sha256_file
from curate.sinks.parquet import ParquetSink
from curate.sinks.webdataset import WebDatasetSink

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = sorted((DATA / "dedup").glob("*.jpg"))  # 16 real COCO photographs, at most 320 px
IP2P = DATA / "edit-triplets" / "ip2p"
MMC4 = DATA / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl"
ROLES = {
    "understanding": {"captions": ["dense", "alt"], "resolution": {"mode": "keep_ratio", "size": 96}},
    "generation": {"captions": ["alt"], "resolution": {"buckets": [[64, 64], [96, 64], [64, 96]]}},
    "editing": {"resolution": {"mode": "keep_ratio", "size": 128}},
    "interleaved": {},
}
BROKEN_KEY = "b" * 16
UNCAPTIONED_KEY = "c" * 16
PNG_KEY = "d" * 16
NONLINEAR_KEY = "e" * 16


# --------------------------------------------------------------------------- the output under export


def image_entry(data: bytes, url: str) -> tuple[dict, dict]:
    """An `images` entry and its `image_meta`, measured with Pillow (format `jpg` when it cannot be read)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height, fmt = image.width, image.height, {"PNG": "png"}.get(image.format, "jpg")
    except OSError:
        width, height, fmt = 10, 10, "jpg"
    meta = {"url": url, "width": width, "height": height, "format": fmt, "num_bytes": len(data)}
    return {"bytes": data, "path": None}, meta


def pair(key: str, data: bytes, captions: dict[str, str], roles: list[str]) -> dict:
    image, meta = image_entry(data, f"http://photos.test/{key}.jpg")
    alt = captions.get("alt")
    return {
        "key": key, "kind": "pair", "images": [image], "image_meta": [meta],
        "segments": [{"text": None, "image": 0}] + ([{"text": alt, "image": None}] if alt else []),
        "captions": [{"name": name, "text": text} for name, text in captions.items()],
        "scores": {"clip_score": 0.3}, "roles": roles,
        "source": {"dataset": "photos", "id": key, "url": meta["url"], "license": "CC BY 2.0"},
        "meta": json.dumps({"photo": key}, sort_keys=True),
    }


def png_bytes(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGBA").save(out, "PNG")
    return out.getvalue()


def pair_samples() -> list[dict]:
    rows = []
    for i, photo in enumerate(PHOTOS[:10]):
        captions = {"alt": f"photo number {i}"}
        roles = ["generation"]
        if i % 2 == 0:
            captions["dense"] = f"a detailed description of photo number {i}"
            roles.append("understanding")
        rows.append(pair(f"{i:016x}", photo.read_bytes(), captions, roles))
    rows.append(pair(BROKEN_KEY, b"this is not an image at all" * 10, {"alt": "broken", "dense": "broken"},
                     ["understanding", "generation"]))
    rows.append(pair(UNCAPTIONED_KEY, PHOTOS[11].read_bytes(), {}, ["generation"]))
    return rows


def png_pair() -> dict:
    """A pair whose image is a PNG with an alpha channel (in a shard of its own: a members-layout tar holds one
    image format)."""
    return pair(PNG_KEY, png_bytes(PHOTOS[10]), {"alt": "a photo stored as PNG with alpha", "dense": "dense"},
                ["understanding", "generation"])


def edit_sample(key: str, turns: list[tuple[Path, Path, list[str]]]) -> dict:
    """An edit chain laid out as the edit sources lay it out (a turn starting elsewhere stores its input)."""
    chain = [ChainTurn(source.read_bytes(), sha256_file(source), target.read_bytes(), instructions)
             for source, target, instructions in turns]
    layout = lay_out_chain(chain, [sha256_file(target) for _, target, _ in turns])
    images, metas = zip(*(image_entry(data, f"http://ip2p.test/{key}/{n}.jpg") for n, data in enumerate(layout.images)))
    return {
        "key": key, "kind": "edit", "images": list(images), "image_meta": list(metas), "segments": layout.segments,
        "captions": [], "scores": None, "roles": ["editing"],
        "source": {"dataset": "ip2p", "id": key, "url": None, "license": "MIT"},
        "meta": dump_meta({"edit": {"turns": [turn.to_json() for turn in layout.turns]}}),
    }


def edit_samples() -> list[dict]:
    painting = (IP2P / "0000132" / "127380018_0.jpg", IP2P / "0000132" / "127380018_1.jpg",
                ["Make it look like a painting", "turn it into a painting"])
    mosaic = (IP2P / "0000145" / "1696064930_0.jpg", IP2P / "0000145" / "1696064930_1.jpg",
              ["make the painting into a mosaic"])
    return [edit_sample("a" * 15 + "1", [painting]), edit_sample("a" * 15 + "2", [mosaic]),
            edit_sample(NONLINEAR_KEY, [painting, mosaic])]


def document_samples() -> list[dict]:
    """Two MMC4 documents, each image placed after its matched sentence, the images real photographs."""
    lines = MMC4.read_text(encoding="utf-8").splitlines()
    rows = []
    for number in (0, 2):
        document = json.loads(lines[number])
        images, metas, segments = [], [], []
        for position, sentence in enumerate(document["text_list"]):
            segments.append({"text": sentence, "image": None})
            for info in document["image_info"]:
                if info["matched_text_index"] == position:
                    image, meta = image_entry(PHOTOS[(len(images) + 12) % len(PHOTOS)].read_bytes(), info["raw_url"])
                    segments.append({"text": None, "image": len(images)})
                    images.append(image)
                    metas.append(meta)
        rows.append({
            "key": f"f{number:015x}", "kind": "interleaved", "images": images, "image_meta": metas,
            "segments": segments, "captions": [], "scores": None, "roles": ["interleaved"],
            "source": {"dataset": "mmc4", "id": str(number), "url": document["url"], "license": None},
            "meta": json.dumps({"document": number}, sort_keys=True),
        })
    return rows


def write_output(root: Path, groups: list[list[dict]], roles: dict | None) -> Path:
    """An output folder as the engine leaves it: Parquet and WebDataset shards written by the sinks (one shard per
    group), and a manifest listing them with their sha256 and the resolved recipe's roles."""
    shards = []
    for number, rows in enumerate(groups):
        table = schema.from_rows(rows)
        for sink, folder in ((ParquetSink(ParquetSink.Params()), "parquet"),
                             (WebDatasetSink(WebDatasetSink.Params()), "webdataset")):
            path = root / folder / f"part-{number:05d}{sink.extension}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sink.write([table], str(path))
            shards.append({"format": folder, "path": f"{folder}/{path.name}", "rows": len(rows),
                           "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    resolved = {"name": "export-test", "output": {"path": str(root)}}
    if roles is not None:
        resolved["roles"] = roles
    manifest = {
        "manifest_version": 1, "status": "complete",
        "recipe": {"name": "export-test", "file": None, "sha256": "1" * 64, "resolved": resolved},
        "stages": [],
        "outputs": {"formats": ["parquet", "webdataset"], "rows": sum(len(g) for g in groups), "shards": shards},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def sample_groups() -> list[list[dict]]:
    """The samples of the output, one list per shard."""
    return [pair_samples(), edit_samples() + document_samples(), [png_pair()]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """JPEG pairs (shard 0, members layout in the tars), edits and documents (shard 1, packed layout) and a PNG pair
    (shard 2)."""
    return write_output(tmp_path_factory.mktemp("mixed") / "out", sample_groups(), ROLES)


@pytest.fixture(scope="module")
def rows_by_key() -> dict[str, dict]:
    """Every sample by key, in output order."""
    return {row["key"]: row for group in sample_groups() for row in group}


def export(output: Path, dest: Path, fmt: str, role: str | None = None, **options) -> dict:
    manifest = export_output(output, dest, fmt, role=role, options=ExportOptions(**options))
    assert json.loads((dest / "export.json").read_text()) == manifest
    assert manifest["reconciliation"]["ok"]
    for entry in manifest["files"]:
        assert sha256_file(dest / entry["path"]) == entry["sha256"]
        assert (dest / entry["path"]).stat().st_size == entry["bytes"]
    return manifest


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(data: bytes) -> str:
    return hashlib.sha256(decoded(data).convert("RGB").tobytes()).hexdigest()


# --------------------------------------------------------------------------- formats


def test_wds_writes_only_pairs_each_with_jpg_json_txt(mixed, rows_by_key, tmp_path):
    manifest = export(mixed, tmp_path / "wds", "wds", shard_rows=4)
    pairs = [k for k, r in rows_by_key.items() if r["kind"] == "pair"]
    assert manifest["rows"] == len(pairs) - 2
    assert manifest["skipped"]["by_reason"] == {"kind_not_supported": 5, "no_caption": 1, "undecodable_image": 1}
    assert manifest["skipped"]["examples"]["undecodable_image"][0]["key"] == BROKEN_KEY
    assert manifest["source"]["read_from"] == "parquet"
    assert manifest["source"]["manifest_sha256"] == sha256_file(mixed / "manifest.json")
    assert manifest["source"]["recipe_sha256"] == "1" * 64
    tars = sorted((tmp_path / "wds").glob("shard-*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["layout"]["shards"] == "shard-{000000..000002}.tar"
    seen = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            names = [m.name for m in tar]
            members = {name: tar.extractfile(name).read() for name in names}
        keys = list(dict.fromkeys(name.split(".")[0] for name in names))
        assert names == [f"{key}.{suffix}" for key in keys for suffix in ("jpg", "json", "txt")]
        for key in keys:
            row = rows_by_key[key]
            assert decoded(members[f"{key}.jpg"]).format == "JPEG"
            assert members[f"{key}.txt"].decode() == row["captions"][0]["text"]  # alt, the default caption
            record = json.loads(members[f"{key}.json"])
            assert record["caption"] == members[f"{key}.txt"].decode() and record["key"] == key
            if key != PNG_KEY:  # stored JPEG, no resolution: the stored bytes as they are
                assert members[f"{key}.jpg"] == row["images"][0]["bytes"]
        seen += keys
    assert seen == [k for k in pairs if k not in (BROKEN_KEY, UNCAPTIONED_KEY)]


def test_llava_role_keeps_its_samples_captions_and_resolution(mixed, rows_by_key, tmp_path):
    dest = tmp_path / "llava"
    manifest = export(mixed, dest, "llava", role="understanding", prompt="What is in the picture?")
    conversations = json.loads((dest / "llava.json").read_text())
    wanted = [k for k, r in rows_by_key.items() if "understanding" in r["roles"] and k != BROKEN_KEY]
    assert [c["id"] for c in conversations] == wanted
    assert manifest["reconciliation"]["not_in_role"] == len(rows_by_key) - len(wanted) - 1
    assert manifest["skipped"]["by_reason"] == {"undecodable_image": 1}
    assert manifest["caption_policy"] == {"captions": ["dense", "alt"], "fallback": None}
    assert manifest["resolution"] == {"mode": "keep_ratio", "size": 96, "side": "longest", "only_if_bigger": True}
    for conversation in conversations:
        human, gpt = conversation["conversations"]
        assert human == {"from": "human", "value": "<image>\nWhat is in the picture?"}
        assert gpt["from"] == "gpt"
        dense = next(c["text"] for c in rows_by_key[conversation["id"]]["captions"] if c["name"] == "dense")
        assert gpt["value"] == dense
        image = decoded((dest / conversation["image"]).read_bytes())
        assert max(image.size) == 96
        original = decoded(rows_by_key[conversation["id"]]["images"][0]["bytes"]).size
        assert abs(image.size[0] / image.size[1] - original[0] / original[1]) < 0.05
    assert manifest["layout"]["image_folder"]["files"] == len(conversations)


def test_bagel_reads_row_group_by_row_group(mixed, rows_by_key, tmp_path):
    """How BAGEL's loaders read: the parquet_info index, then each row group with pyarrow; every image decodes and
    every captions value parses as JSON."""
    dest = tmp_path / "bagel"
    manifest = export(mixed, dest, "bagel", shard_rows=6, row_group_rows=2)
    assert manifest["skipped"]["by_reason"] == {"edit_chain_not_linear": 1, "kind_not_supported": 2,
                                                "no_caption": 1, "undecodable_image": 1}
    info = json.loads((dest / "parquet_info.json").read_text())
    assert sorted(info) == sorted(str(dest / e["path"]) for e in manifest["files"] if e["path"].endswith(".parquet"))
    assert [entry["num_row_groups"] for entry in info.values()] == [1, 3, 3]  # edit/ 2 rows, t2i/ 6 + 5 rows
    t2i, edits = [], []
    for path, entry in info.items():
        handle = pq.ParquetFile(path)
        assert handle.num_row_groups == entry["num_row_groups"]
        for group in range(entry["num_row_groups"]):
            for row in handle.read_row_group(group).to_pylist():
                (t2i if "/t2i/" in path else edits).append(row)
    assert len(t2i) + len(edits) == manifest["rows"]
    for row in t2i:
        source = rows_by_key[row["key"]]
        assert decoded(row["image"]).size == (row["width"], row["height"])
        assert json.loads(row["captions"]) == {c["name"]: c["text"] for c in source["captions"]}
    assert {row["key"] for row in edits} == {"a" * 15 + "1", "a" * 15 + "2"}
    for row in edits:
        source = rows_by_key[row["key"]]
        turns = json.loads(source["meta"])["edit"]["turns"]
        assert row["instruction_list"] == [turn["instructions"] for turn in turns]
        assert [pixels(b) for b in row["image_list"]] == [pixels(i["bytes"]) for i in source["images"]]


def test_generation_role_fits_images_to_buckets(mixed, rows_by_key, tmp_path):
    dest = tmp_path / "bagel-gen"
    manifest = export(mixed, dest, "bagel", role="generation")
    assert manifest["resolution"] == {"mode": "buckets", "buckets": [[64, 64], [96, 64], [64, 96]]}
    rows = pq.read_table(dest / "t2i" / "part-00000.parquet").to_pylist()
    assert len(rows) == manifest["rows"] == 11  # 13 generation samples: one without caption, one broken
    assert manifest["skipped"]["by_reason"] == {"no_caption": 1, "undecodable_image": 1}
    for row in rows:
        source = rows_by_key[row["key"]]
        width, height = decoded(source["images"][0]["bytes"]).size
        closest = min(ROLES["generation"]["resolution"]["buckets"],
                      key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
        assert row["bucket"] == closest == [row["width"], row["height"]]
        assert decoded(row["image"]).size == tuple(closest)
        assert json.loads(row["captions"]) == {"alt": source["captions"][0]["text"]}  # the policy allows alt only


def test_obelics_documents_keep_the_segment_order(mixed, rows_by_key, tmp_path):
    dest = tmp_path / "obelics"
    manifest = export(mixed, dest, "obelics")
    assert manifest["skipped"]["by_reason"] == {"kind_not_supported": 3, "pair_not_document": 13}
    documents = pq.read_table(dest / "data" / "part-00000.parquet").to_pylist()
    assert len(documents) == 2
    for document in documents:
        general = json.loads(document["general_metadata"])
        source = rows_by_key[general["key"]]
        assert general["url"] == source["source"]["url"]
        assert len(document["images"]) == len(document["texts"]) == len(source["segments"])
        for image, text, segment in zip(document["images"], document["texts"], source["segments"]):
            assert (image is None) == (segment["image"] is None) and (text is None) == (segment["text"] is None)
            if image is not None:
                assert image["bytes"] == source["images"][segment["image"]]["bytes"]
            else:
                assert text == segment["text"]
        metadata = json.loads(document["metadata"])
        assert [m and m["url"] for m in metadata] == [
            s["image"] is not None and source["image_meta"][s["image"]]["url"] or None for s in source["segments"]]

    with_pairs = export(mixed, tmp_path / "obelics-pairs", "obelics", pairs_as_documents=True)
    assert with_pairs["skipped"]["by_reason"] == {"kind_not_supported": 3, "no_caption": 1, "undecodable_image": 1}
    documents = pq.read_table(tmp_path / "obelics-pairs" / "data").to_pylist()
    as_pairs = [d for d in documents if json.loads(d["general_metadata"])["kind"] == "pair"]
    assert len(as_pairs) == 11
    assert all(d["texts"][0] is None and d["images"][1] is None and d["texts"][1] for d in as_pairs)


def test_hf_export_keeps_every_kind(mixed, rows_by_key, tmp_path):
    manifest = export(mixed, tmp_path / "hf", "hf", role="editing")
    rows = pq.read_table(tmp_path / "hf" / "data").to_pylist()
    assert [r["key"] for r in rows] == [k for k, r in rows_by_key.items() if r["kind"] == "edit"]
    assert manifest["images"] == sum(len(rows_by_key[r["key"]]["images"]) for r in rows)
    for row in rows:
        assert row["text"] == rows_by_key[row["key"]]["segments"][1]["text"]
        assert [decoded(i["bytes"]).size for i in row["images"]] == [(128, 128)] * len(row["images"])
        assert row["image_sizes"][0] == {"width": 128, "height": 128, "original_width": 512, "original_height": 512,
                                         "bucket": None}


# --------------------------------------------------------------------------- reading, determinism, refusals


def test_an_output_with_only_webdataset_shards_exports_the_same_bytes(mixed, tmp_path):
    tars_only = tmp_path / "tars-only"
    shutil.copytree(mixed, tars_only, ignore=shutil.ignore_patterns("parquet"))
    manifest = json.loads((tars_only / "manifest.json").read_text())
    manifest["outputs"]["formats"] = ["webdataset"]
    manifest["outputs"]["shards"] = [s for s in manifest["outputs"]["shards"] if s["format"] == "webdataset"]
    (tars_only / "manifest.json").write_text(json.dumps(manifest))
    for fmt in ("hf", "obelics", "bagel"):
        from_parquet = export(mixed, tmp_path / f"{fmt}-p", fmt, pairs_as_documents=True)
        from_tars = export(tars_only, tmp_path / f"{fmt}-t", fmt, pairs_as_documents=True)
        assert from_tars["source"]["read_from"] == "webdataset"
        data_files = [e for e in from_parquet["files"] if e["path"].endswith(".parquet")]
        assert data_files and data_files == [e for e in from_tars["files"] if e["path"].endswith(".parquet")]
        assert from_parquet["skipped"] == from_tars["skipped"]


def test_same_output_same_bytes_and_overwrite_rules(mixed, tmp_path):
    dest = tmp_path / "llava"

    def digests() -> dict[str, str]:
        return {str(p.relative_to(dest)): sha256_file(p) for p in sorted(dest.rglob("*")) if p.is_file()}

    export(mixed, dest, "llava", role="understanding")
    first = digests()
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_output(mixed, dest, "llava")
    export_output(mixed, dest, "llava", role="understanding", overwrite=True)
    assert digests() == first
    assert not list(tmp_path.glob(".*partial"))

    stranger = tmp_path / "someone-elses"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_output(mixed, stranger, "wds", overwrite=True)
    assert (stranger / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="outside the output folder"):
        export_output(mixed, mixed / "exported", "wds")


def test_a_damaged_shard_is_a_clear_error(mixed, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(mixed, damaged)
    shard = damaged / "parquet" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ExportError, match="part-00001.parquet: cannot read this Parquet shard"):
        export_output(damaged, tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))
    shutil.rmtree(damaged / "parquet")
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["outputs"]["formats"] = ["webdataset"]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    tar = damaged / "webdataset" / "part-00001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ExportError, match="part-00001.tar: cannot read this WebDataset shard"):
        export_output(damaged, tmp_path / "y", "hf")


def test_roles_and_resolutions_are_checked(mixed, tmp_path):
    no_roles = write_output(tmp_path / "no-roles", [pair_samples()[:2]], None)
    with pytest.raises(ExportError, match="this output has no roles"):
        export_output(no_roles, tmp_path / "x", "wds", role="generation")
    everything = export(no_roles, tmp_path / "all", "wds")
    assert everything["rows"] == 2 and everything["role"] is None
    with pytest.raises(ExportError, match=r"not a role of this output \(its roles: editing, generation"):
        export_output(mixed, tmp_path / "y", "wds", role="painting")
    # as the recipe resolves roles: every field present, defaults included, and a role turned off with `false`
    resolved = write_output(tmp_path / "resolved", [pair_samples()[:2]], {
        "generation": {"when": "true", "captions": [], "resolution": {
            "mode": "buckets", "size": None, "side": "longest", "only_if_bigger": True, "buckets": [[64, 64]]}},
        "understanding": False})
    generation = export(resolved, tmp_path / "gen", "wds", role="generation")
    assert generation["rows"] == 2 and generation["resolution"] == {"mode": "buckets", "buckets": [[64, 64]]}
    assert generation["caption_policy"] == {"captions": ["alt"], "fallback": "first caption"}
    with pytest.raises(ExportError, match=r"not a role of this output \(its roles: generation\)"):
        export_output(resolved, tmp_path / "u", "wds", role="understanding")
    with pytest.raises(ExportError, match="unknown export format"):
        export_output(mixed, tmp_path / "z", "tfrecord")
    for bad, message in (({"size": 0}, "positive"), ({"buckets": [[64]]}, "width, height"),
                         ({"size": 64, "shape": "round"}, "unknown keys"), ({"mode": "stretch", "size": 8}, "mode")):
        with pytest.raises(ExportError, match=message):
            parse_resolution(bad, "roles.x.resolution")
    keep = parse_resolution({"size": 100, "side": "shortest"}, "r")
    assert target_size(400, 200, keep) == ((200, 100), None)
    assert target_size(80, 50, keep) == ((80, 50), None)  # smaller already: not enlarged
    assert target_size(80, 50, parse_resolution({"size": 100, "only_if_bigger": False}, "r")) == ((100, 62), None)


def test_cli_export_and_its_errors(mixed, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(mixed), str(tmp_path / "cli"), "--to", "wds", "--role", "generation",
                                 "--shard-rows", "5"])
    assert result.exit_code == 0, result.output
    assert "exported 11 samples" in result.output and "undecodable_image 1" in result.output
    tars = sorted((tmp_path / "cli").glob("shard-*.tar"))
    assert len(tars) == 3
    with tarfile.open(tars[0]) as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert records and all(r["bucket"] in ROLES["generation"]["resolution"]["buckets"] for r in records)
    assert all([r["width"], r["height"]] == r["bucket"] for r in records)
    result = runner.invoke(app, ["export", str(mixed), str(tmp_path / "cli"), "--to", "wds"])
    assert result.exit_code == 2 and "pass --overwrite" in result.output


def test_an_export_of_nothing_fails_with_the_reason_and_the_option_that_includes_them(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    pairs = write_output(tmp_path / "pairs", [pair_samples()[:4]], ROLES)
    obelics = CliRunner().invoke(app, ["export", str(pairs), str(tmp_path / "docs"), "--to", "obelics"])
    assert obelics.exit_code == 2
    message = " ".join(obelics.output.split())
    assert "would export 0 of 4 samples" in message and "pair_not_document 4" in message
    assert "--pairs-as-documents" in message
    assert not (tmp_path / "docs").exists()  # nothing written
    assert CliRunner().invoke(app, ["export", str(pairs), str(tmp_path / "docs"), "--to", "obelics",
                                    "--pairs-as-documents"]).exit_code == 0
    editing = CliRunner().invoke(app, ["export", str(pairs), str(tmp_path / "edits"), "--to", "hf",
                                       "--role", "editing"])
    assert editing.exit_code == 2 and "has the role 'editing'" in " ".join(editing.output.split())
