"""Real trainers and readers read what `curate export` writes: open_clip_train trains the tiny CLIP on the `wds`
export, `datasets` loads the `wds` and `hf` exports, Ray Data reads the Parquet exports.

One output is built once for the module: the demo recipe over the synthetic web served on loopback (model and
dedup stages off, as in tests/test_end_to_end.py).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from curate import schema
from curate.demo.server import LoopbackServer
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import compile_plan, execute
from curate.export import ExportOptions, export_output
from curate.models.clip import TINY_CLIP_WEIGHTS, TINY_MODEL
from curate.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
NO_MODELS = ("stages.clip_score=false", "stages.aesthetic=false", "stages.dedup_exact=false",
             "stages.dedup_perceptual=false", "stages.fetch.backoff_base=0.01")
BATCH = 8
STEPS = 4
LOSS = re.compile(r"Train Epoch: 0 \[.*\] .* Loss: (\S+) \((\S+)\)")


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache inside the test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def output(tmp_path_factory, local_ray) -> Path:
    folder = tmp_path_factory.mktemp("trainers")
    web = build_synthetic_web(n_images=56)
    with LoopbackServer(web.routes) as server:
        write_url_list(web, server.base_url, folder / "urls.parquet")
        recipe = load_recipe(REPO / "pipelines" / "demo.yaml",
                             [f"source.path={folder / 'urls.parquet'}", f"output.path={folder / 'out'}", *NO_MODELS])
        manifest = execute(compile_plan(recipe), Console(file=io.StringIO()), progress=False)
    assert manifest["reconciliation"]["output_rows"] >= BATCH * STEPS
    return folder / "out"


@pytest.fixture(scope="module")
def wds_export(output, tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("wds") / "export"
    return dest, export_output(output, dest, "wds", options=ExportOptions(shard_rows=12))


@pytest.fixture(scope="module")
def hf_export(output, tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("hf") / "export"
    return dest, export_output(output, dest, "hf", options=ExportOptions(row_group_rows=10))


def test_open_clip_train_trains_the_tiny_clip_on_the_wds_export(wds_export, tmp_path):
    dest, manifest = wds_export
    shards = len(manifest["files"])
    assert shards >= 3
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "curate.export.clip_trainer",
        "--train-data", str(dest / f"shard-{{000000..{shards - 1:06d}}}.tar"),
        "--dataset-type", "webdataset",  # the sample count comes from the export's sizes.json
        "--model", TINY_MODEL, "--pretrained", str(TINY_CLIP_WEIGHTS),
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0", "--device", "cpu",
        "--lr", "1e-4", "--warmup", "0", "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
        "--logs", str(logs), "--name", "tiny", "--seed", "0",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logs / "tiny" / "out.log").read_text()
    sizes = json.loads((dest / "sizes.json").read_text())
    assert sizes == {Path(entry["path"]).name: entry["rows"] for entry in manifest["files"]}
    samples = sum(sizes.values())
    steps = math.ceil(samples / BATCH)
    losses = [float(match.group(1)) for match in LOSS.finditer(log)]
    assert len(losses) == steps >= STEPS, log[-2000:]
    assert all(math.isfinite(loss) and loss >= 0 for loss in losses)
    assert f"[{steps * BATCH}/{steps * BATCH} (100%)]" in log


def test_datasets_reads_the_wds_export_with_the_same_columns_everywhere(wds_export, output, tmp_path):
    dest, manifest = wds_export
    tars = sorted(str(path) for path in dest.glob("shard-*.tar"))
    loaded = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == manifest["rows"] == manifest["source"]["rows"]
    assert set(loaded.column_names) == {"__key__", "__url__", "jpg", "json", "txt"}
    for sample in loaded:
        assert isinstance(sample["jpg"], Image.Image)
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])
        assert sample["txt"] and sample["json"]["key"] == sample["__key__"]
        assert set(sample["json"]) == set(schema.WDS_RECORD_SCHEMA.names)
        assert sample["json"]["caption"] == sample["txt"]


def test_datasets_reads_the_hf_export_with_pil_images(hf_export, output, tmp_path):
    dest, manifest = hf_export
    loaded = datasets.load_dataset("parquet", data_files=str(dest / "data" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == manifest["rows"] > 0
    assert isinstance(loaded.features["images"].feature, datasets.Image)
    captions = alt_captions(output)
    for sample in loaded:
        assert len(sample["images"]) == 1 and isinstance(sample["images"][0], Image.Image)
        assert sample["images"][0].size == (sample["image_sizes"][0]["width"], sample["image_sizes"][0]["height"])
        assert sample["text"] == captions[sample["key"]]


def alt_captions(output: Path) -> dict[str, str]:
    """The alt caption of every sample of `output`, by key, read from its Parquet shards."""
    table = pq.read_table(output / "parquet", columns=["key", "captions"])
    return {row["key"]: next(c["text"] for c in row["captions"] if c["name"] == "alt") for row in table.to_pylist()}


def test_datasets_reads_the_obelics_export_as_documents(output, tmp_path):
    dest = tmp_path / "obelics"
    manifest = export_output(output, dest, "obelics", options=ExportOptions(pairs_as_documents=True))
    loaded = datasets.load_dataset("parquet", data_files=str(dest / "data" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == manifest["rows"] == manifest["source"]["rows"]
    captions = alt_captions(output)
    for document in loaded:
        image, no_image = document["images"]
        assert isinstance(image, Image.Image) and no_image is None
        assert document["texts"][0] is None
        assert document["texts"][1] == captions[json.loads(document["general_metadata"])["key"]]


def test_ray_data_reads_the_parquet_exports(hf_export, output, tmp_path, local_ray):
    import ray.data

    dest, manifest = hf_export
    bagel_dest = tmp_path / "bagel"
    bagel = export_output(output, bagel_dest, "bagel", options=ExportOptions(shard_rows=20))
    hf_rows = ray.data.read_parquet(str(dest / "data")).take_all()
    assert len(hf_rows) == manifest["rows"]
    assert {len(row["images"]) for row in hf_rows} == {1}
    t2i = ray.data.read_parquet(str(bagel_dest / "t2i")).take_all()
    assert len(t2i) == bagel["rows"] == manifest["rows"]
    for row in t2i:
        assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])
        assert json.loads(row["captions"])["alt"]
