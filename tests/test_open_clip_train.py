"""open_clip_train trains on the WebDataset tars a curate run writes, sized by the `sizes.json` beside them.

A curate run (pipelines/download.yaml on loopback, real COCO photos) writes several tars and
`OUT/webdataset/sizes.json`. Then, in a subprocess, open_clip_train's own `get_wds_dataset` reads
them with `train_num_samples=None` (no `--train-num-samples`), so the epoch size comes from
`sizes.json`, and curate's tiny CLIP takes one real AdamW step on a batch from that loader.

The subprocess exists because of webdataset: open_clip_torch's `training` extra pins
`webdataset<=0.2.86`, and with the webdataset 1.x in the project venv open_clip_train's training
pipeline fails on any tar (KeyError 'fname', open_clip issue #935). `make install` puts
webdataset 0.2.86 in `.venv/open_clip_train_deps`; the subprocess puts that folder first on
PYTHONPATH, as a user of open_clip_train would have it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "download.yaml"
PHOTOS = Path(__file__).resolve().parent / "data" / "captioned-images"
DEPS = Path(sys.prefix) / "open_clip_train_deps"  # .venv/open_clip_train_deps, see the Makefile
WEBDATASET_VERSION = "0.2.86"  # the newest open_clip_torch[training] allows
COPIES = 5  # each of the 4 photos is served under this many URLs: 20 rows, 3 tars of at most 8
SHARD_ROWS = 8
BATCH_SIZE = 6  # does not divide the sample count: get_wds_dataset rounds the epoch up to whole batches

TRAIN = r"""
import argparse, json, math, sys

import open_clip
import torch
import webdataset

import open_clip_train.data as data
from curate.models.clip import TINY_CLIP_WEIGHTS  # registers the open_clip model "curate-tiny"

train_data, batch_size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model, preprocess_train, _ = open_clip.create_model_and_transforms(
    "curate-tiny", pretrained=str(TINY_CLIP_WEIGHTS))
tokenizer = open_clip.get_tokenizer("curate-tiny")

args = argparse.Namespace(
    train_data=train_data, val_data=None, train_num_samples=None, val_num_samples=None,
    dataset_type="webdataset", dataset_resampled=False, train_data_upsampling_factors=None,
    seed=0, batch_size=batch_size, workers=0, world_size=1, distributed=False)
size_from_sizes_json, shards = data.get_dataset_size(train_data)
info = data.get_wds_dataset(args, preprocess_train, is_train=True, epoch=0, tokenizer=tokenizer)
info.set_epoch(0)
loader = info.dataloader

loss_fn = open_clip.ClipLoss()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
before = {name: p.detach().clone() for name, p in model.named_parameters()}
model.train()
batches, samples, first = 0, 0, None
loss_before = loss_after = None
for images, texts in loader:
    batches += 1
    samples += len(images)
    if first is None:
        first = (tuple(images.shape), str(images.dtype), tuple(texts.shape), str(texts.dtype))
        loss = loss_fn(*model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_before = loss.item()
        with torch.no_grad():
            loss_after = loss_fn(*model(images, texts)).item()
changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]

print(json.dumps({
    "webdataset_version": webdataset.__version__,
    "webdataset_file": webdataset.__file__,
    "open_clip_train_webdataset_file": data.wds.__file__,
    "size_from_sizes_json": size_from_sizes_json,
    "shards": shards,
    "num_samples": loader.num_samples,
    "num_batches": loader.num_batches,
    "batches_iterated": batches,
    "samples_iterated": samples,
    "first_batch": first,
    "loss_before": loss_before,
    "loss_after": loss_after,
    "finite": math.isfinite(loss_before) and math.isfinite(loss_after),
    "parameters": sum(1 for _ in model.parameters()),
    "parameters_changed": len(changed),
}))
"""


def write_list(path: Path, urls: list[str], captions: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": pa.array(captions, pa.string())}), path)
    return path


def tar_samples(tar: Path) -> int:
    """Samples in one tar: its image members (one .jpg per sample)."""
    with tarfile.open(tar) as archive:
        return sum(1 for member in archive if member.isfile() and member.name.endswith(".jpg"))


@pytest.mark.timeout(300)
def test_open_clip_train_trains_on_curate_webdataset_sized_by_sizes_json(local_ray, tmp_path):
    assert (DEPS / "webdataset").is_dir(), (
        f"{DEPS} has no webdataset {WEBDATASET_VERSION} (open_clip_train needs webdataset<=0.2.86): "
        "run `make install`")

    captions = {json.loads(line)["file_name"]: json.loads(line)["caption"]
                for line in (PHOTOS / "captions.jsonl").read_text().splitlines()}
    photos = sorted(captions)
    routes = {f"/{copy}/{name}": Route(body=(PHOTOS / name).read_bytes())
              for copy in range(COPIES) for name in photos}
    out = tmp_path / "out"
    with LoopbackServer(routes) as server:
        paths = sorted(routes)
        url_list = write_list(tmp_path / "urls.parquet", [server.url(p) for p in paths],
                              [captions[p.split("/", 2)[2]] for p in paths])
        loaded = load_recipe(RECIPE, [f"source.path={url_list}", f"output.path={out}",
                                      "stages.fetch.allow_private_addresses=true",
                                      "stages.fetch.resize.size=128", f"output.shard_rows={SHARD_ROWS}"])
        manifest = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)

    totals = manifest["reconciliation"]
    assert totals["ok"] and totals["input_rows"] == len(paths) == COPIES * len(photos)
    assert totals["output_rows"] == len(paths)

    shard_dir = out / "webdataset"
    tars = sorted(shard_dir.glob("*.tar"))
    assert len(tars) >= 2, [t.name for t in tars]
    sizes_file = shard_dir / "sizes.json"
    assert sizes_file.is_file(), f"the run wrote no {sizes_file}: {sorted(p.name for p in shard_dir.iterdir())}"
    sizes = json.loads(sizes_file.read_text())
    assert sizes == {tar.name: tar_samples(tar) for tar in tars}
    total = sum(sizes.values())
    assert total == totals["output_rows"]
    assert not (shard_dir / "__len__").exists()  # open_clip_train's other source of the size

    # A brace pattern, as one passes to `--train-data`: dir/{a.tar,b.tar,...}.
    train_data = f"{shard_dir}/{{{','.join(tar.name for tar in tars)}}}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(DEPS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", TRAIN, train_data, str(BATCH_SIZE)], env=env,
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({"sizes_json": sizes, **facts}, indent=1))

    assert facts["webdataset_version"] == WEBDATASET_VERSION
    assert Path(facts["open_clip_train_webdataset_file"]).is_relative_to(DEPS)
    assert (facts["size_from_sizes_json"], facts["shards"]) == (total, len(tars))
    expected_batches = math.ceil(total / BATCH_SIZE)  # get_wds_dataset rounds up to whole batches
    assert facts["num_batches"] == facts["batches_iterated"] == expected_batches
    assert facts["num_samples"] == facts["samples_iterated"] == expected_batches * BATCH_SIZE
    assert facts["first_batch"] == [[BATCH_SIZE, 3, 64, 64], "torch.float32", [BATCH_SIZE, 32], "torch.int64"]
    assert facts["finite"]
    assert facts["parameters_changed"] > 0
    assert facts["loss_after"] < facts["loss_before"]  # the step learned something about the batch it saw
