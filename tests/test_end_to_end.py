"""End to end: a URL list served on loopback -> `curate run` -> shards + manifest, read back by real readers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.demo.web import build_synthetic_web, write_url_list
from curate.engine.run import OutputConflict, compile_plan, execute
from curate.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
WEIRD = Path(__file__).resolve().parent / "data" / "weird-images"
DEMO_RECIPE = REPO / "pipelines" / "demo.yaml"


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


# These tests are about fetching, filtering and writing: the demo recipe's model and dedup stages are
# turned off (tests/test_model_pass.py and tests/test_dedup.py cover them).
NO_MODELS = ("stages.clip_score=false", "stages.aesthetic=false", "stages.watermark=false", "stages.dedup_exact=false",
             "stages.dedup_perceptual=false")


def run(url_list: Path, output: Path, *overrides: str, recipe: Path = DEMO_RECIPE) -> dict:
    """Run `recipe` in-process over `url_list` into `output`; return the manifest."""
    loaded = load_recipe(recipe, [f"source.path={url_list}", f"output.path={output}", *NO_MODELS, *overrides])
    return execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)


def assert_reconciles(manifest: dict, output: Path) -> None:
    totals = manifest["reconciliation"]
    assert totals["ok"] is True
    assert totals["input_rows"] == totals["output_rows"] + totals["dropped_rows"]
    assert pq.ParquetFile(output / "drops.parquet").metadata.num_rows == totals["dropped_rows"]
    for fmt in manifest["outputs"]["formats"]:
        assert sum(s["rows"] for s in manifest["outputs"]["shards"] if s["format"] == fmt) == totals["output_rows"]


def output_rows(output: Path) -> pa.Table:
    return pq.read_table(sorted((output / "parquet").glob("*.parquet")))


def drop_log(output: Path) -> dict[str, tuple[str, str]]:
    table = pq.read_table(output / "drops.parquet").to_pylist()
    return {row["key"]: (row["reason"], row["stage"]) for row in table}


def jpeg(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_list(path: Path, urls: list[str], captions: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


# --------------------------------------------------------------------------- fault modes


FAULTS = {
    "/ok.jpg": (Route(body=jpeg(120, 80)), None),
    "/missing.jpg": (None, "http_404"),
    "/flaky.jpg": (Route(body=jpeg(100, 100), fail_times=1, fail_status=500), None),
    "/slow.jpg": (Route(body=jpeg(100, 100), delay=2.0), "timeout"),
    "/moved.jpg": (Route(redirect_to="/ok-target.jpg"), None),
    "/page.jpg": (Route(body=b"<html><body>not an image</body></html>", content_type="text/html"), "not_image"),
    "/cut.jpg": (Route(body=jpeg(200, 200), truncate_to=300), "truncated"),
    "/noai.jpg": (Route(body=jpeg(100, 100), headers={"X-Robots-Tag": "noai"}), "opt_out"),
    "/huge.png": (Route(body=noise_png(300), content_type="image/png"), "too_large"),
}


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    routes = {path: route for path, (route, _) in FAULTS.items() if route is not None}
    routes["/ok-target.jpg"] = Route(body=jpeg(90, 90))
    with LoopbackServer(routes) as server:
        paths = list(FAULTS)
        url_list = write_list(
            folder / "urls.parquet", [server.url(p) for p in paths], [f"a test image called {p}" for p in paths]
        )
        manifest = run(
            url_list,
            folder / "out",
            "stages.fetch.read_timeout=0.5",
            "stages.fetch.retries=1",
            "stages.fetch.backoff_base=0.01",
            "stages.fetch.max_bytes=100000",
            "stages.basic_filter.min_side=8",
        )
        hits = {path: route.hits for path, route in server.routes.items()}
    return folder / "out", manifest, paths, hits


def test_every_fault_mode_ends_in_the_output_or_with_its_drop_reason(fault_run):
    output, manifest, paths, hits = fault_run
    assert_reconciles(manifest, output)
    sources = output_rows(output).column("source").to_pylist()
    kept_paths = {"/" + s["url"].rsplit("/", 1)[1] for s in sources}
    assert kept_paths == {p for p, (_, reason) in FAULTS.items() if reason is None}
    dropped = {
        row["url"].rsplit("/", 1)[1]: row["reason"] for row in pq.read_table(output / "drops.parquet").to_pylist()
    }
    assert {"/" + name: reason for name, reason in dropped.items()} == {
        p: reason for p, (_, reason) in FAULTS.items() if reason is not None
    }
    assert hits["/flaky.jpg"] == 2  # 500 once, then success on the retry
    assert manifest["drop_log"]["by_reason"]["http_404"] == 1


# --------------------------------------------------------------------------- real problem images


@pytest.fixture(scope="module")
def weird_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weird")
    files = sorted(p for p in WEIRD.iterdir() if p.name not in ("SOURCE.txt", "manifest.tsv"))
    routes = {f"/{p.name}": Route(body=p.read_bytes(), content_type="application/octet-stream") for p in files}
    with LoopbackServer(routes) as server:
        url_list = write_list(
            folder / "urls.parquet",
            [server.url(f"/{p.name}") for p in files],
            [f"problem image {p.stem}" for p in files],
        )
        manifest = run(
            url_list,
            folder / "out",
            "stages.basic_filter.min_side=1",
            "stages.basic_filter.max_aspect_ratio=100",
            "stages.fetch.retries=0",
        )
    return folder / "out", manifest, files


def test_each_real_problem_image_is_kept_or_dropped_with_a_reason(weird_run):
    output, manifest, files = weird_run
    assert_reconciles(manifest, output)
    assert manifest["reconciliation"]["input_rows"] == len(files) == 56
    kept = {s["url"].rsplit("/", 1)[1] for s in output_rows(output).column("source").to_pylist()}
    drops = pq.read_table(output / "drops.parquet").to_pylist()
    dropped = {row["url"].rsplit("/", 1)[1]: row for row in drops}
    assert kept | set(dropped) == {p.name for p in files}
    assert not kept & set(dropped)
    assert all(row["reason"] and row["detail"] for row in drops)
    assert dropped["broken.png"]["reason"] == "not_image"
    assert dropped["truncated_jpeg.jpg"]["reason"] == "corrupt"
    assert dropped["png_decompression_dos.png"]["reason"] == "decompression_bomb"
    assert {"pil_sample_cmyk.jpg", "xmp_test.jpg", "i_trns.png", "sugarshack.mpo"} <= kept


def decoded_output_images(output: Path) -> dict[str, Image.Image]:
    table = output_rows(output).to_pylist()
    return {row["source"]["url"].rsplit("/", 1)[1]: Image.open(io.BytesIO(row["images"][0]["bytes"])) for row in table}


def test_exif_rotated_images_come_out_upright(weird_run):
    output, _, _ = weird_run
    images = decoded_output_images(output)
    upright = np.asarray(Image.open(WEIRD / "hopper.webp").convert("RGB"), dtype=np.float32)
    for n in range(2, 9):
        image = images[f"hopper_orientation_{n}.jpg"]
        assert image.size == (128, 128)
        as_output = np.asarray(image.convert("RGB"), dtype=np.float32)
        raw = np.asarray(Image.open(WEIRD / f"hopper_orientation_{n}.jpg").convert("RGB"), dtype=np.float32)
        assert np.abs(as_output - upright).mean() < 12, n
        assert np.abs(raw - upright).mean() > np.abs(as_output - upright).mean() + 10, n
    assert images["orientation_rectangle.jpg"].size == (1, 2)


def test_shards_load_with_datasets_and_webdataset(weird_run, tmp_path):
    import datasets
    import webdataset

    output, manifest, _ = weird_run
    expected = manifest["outputs"]["rows"]
    parquet = datasets.load_dataset(
        "parquet", data_files=str(output / "parquet" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(parquet) == expected
    assert isinstance(parquet.features["images"], datasets.List)
    assert isinstance(parquet.features["images"].feature, datasets.Image)
    assert isinstance(parquet[0]["images"][0], Image.Image)

    tars = sorted(str(p) for p in (output / "webdataset").glob("*.tar"))
    from_hf = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "hf2"))
    assert len(from_hf) == expected
    assert {"jpg", "txt", "json"} <= set(from_hf.features)

    samples = list(webdataset.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == expected
    assert all(isinstance(s["jpg"], Image.Image) and s["txt"] for s in samples)
    assert {s["__key__"] for s in samples} == set(output_rows(output).column("key").to_pylist())


# --------------------------------------------------------------------------- determinism and resume


@pytest.fixture(scope="module")
def demo_web(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-web")
    web = build_synthetic_web(n_images=200, seed=1)
    with LoopbackServer(web.routes) as server:
        url_list = folder / "urls.parquet"
        write_url_list(web, server.base_url, url_list)
        yield server, url_list


def shard_digests(manifest: dict) -> list[tuple[str, int, str]]:
    return [(s["path"], s["rows"], s["sha256"]) for s in manifest["outputs"]["shards"]]


DETERMINISM = ("engine.rows_per_work_shard=40", "output.shard_rows=70")


@pytest.fixture(scope="module")
def uninterrupted(demo_web, tmp_path_factory):
    _, url_list = demo_web
    folder = tmp_path_factory.mktemp("runs")
    first = run(url_list, folder / "a", *DETERMINISM)
    second = run(url_list, folder / "b", *DETERMINISM)
    return folder, first, second


def test_two_uninterrupted_runs_give_byte_identical_shards(uninterrupted):
    folder, first, second = uninterrupted
    assert_reconciles(first, folder / "a")
    assert_reconciles(second, folder / "b")
    assert len(first["outputs"]["shards"]) == 6  # 3 parquet + 3 tar
    assert shard_digests(first) == shard_digests(second)
    assert first["drop_log"]["sha256"] == second["drop_log"]["sha256"]
    for entry in first["outputs"]["shards"]:
        assert (folder / "a" / entry["path"]).read_bytes() == (folder / "b" / entry["path"]).read_bytes()


def test_same_url_listed_twice_gives_two_samples(uninterrupted, demo_web):
    folder, first, _ = uninterrupted
    urls = [s["url"] for s in output_rows(folder / "a").column("source").to_pylist()]
    keys = output_rows(folder / "a").column("key").to_pylist()
    repeated = {u for u in urls if urls.count(u) > 1}
    assert repeated, "the synthetic web lists some URLs twice"
    assert len(set(keys)) == len(keys)
    assert all("." not in key for key in keys)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True, timeout=300, env=environment
    )


# Prepare (fetch and basic filters annotating into the pool) runs 5 work shards on 2 workers, so a kill
# after shard 2 leaves some undone; the 3 output shards are written concurrently, so a kill in the write
# phase may come after all of them (but always before the drop log and the manifest).
@pytest.mark.parametrize("phase, shard, total, folder", [("prepare", 2, 4, "_pool/annotations/fetch"),
                                                         ("write", 0, 3, "_work/write")])
def test_interrupted_run_resumes_to_the_same_shards(uninterrupted, demo_web, tmp_path, phase, shard, total, folder):
    server, url_list = demo_web
    _, reference, _ = uninterrupted
    output = tmp_path / "killed"
    args = [
        "run",
        str(DEMO_RECIPE),
        "--no-progress",
        "--set",
        f"source.path={url_list}",
        "--set",
        f"output.path={output}",
        *[a for pair in (*NO_MODELS, *DETERMINISM) for a in ("--set", pair)],
    ]
    killed = cli(*args, env={"CURATE_TEST_CRASH_AFTER": f"{phase}:{shard}"})
    assert killed.returncode == 86, killed.stderr
    assert not (output / "manifest.json").exists()
    finished = sorted(p.name for p in (output / folder).glob("*.done.json"))
    assert f"{shard:05d}.done.json" in finished and len(finished) <= total

    hits_before = {path: route.hits for path, route in server.routes.items()}
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    assert_reconciles(manifest, output)
    assert shard_digests(manifest) == shard_digests(reference)
    assert manifest["drop_log"]["sha256"] == reference["drop_log"]["sha256"]
    refetched = sum(route.hits - hits_before[path] for path, route in server.routes.items())
    assert refetched < sum(1 for _ in server.routes)  # finished work shards were not fetched again


@pytest.fixture(scope="module")
def with_models(demo_web, tmp_path_factory):
    """The demo recipe with its model and dedup phases, uninterrupted: the reference for crashes in them."""
    _, url_list = demo_web
    output = tmp_path_factory.mktemp("with-models") / "out"
    loaded = load_recipe(DEMO_RECIPE, [f"source.path={url_list}", f"output.path={output}", *DETERMINISM])
    return execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False)


# A crash at every step after the split: annotating with the models (`model`), the first selection step
# (`select`), a corpus stage's saved decision (`decide-...`) and one work shard of the step that applies it,
# the drop log (`drops`), and, with `engine.keep_pool: false`, the release of a written work shard's pool data
# (`release`); prepare and write are covered above. keep_pool is execution-only: the output is the same.
@pytest.mark.parametrize("phase, shard, keep_pool", [("model", 1, True), ("select", 1, True),
                                                     ("decide-dedup_exact", 0, True), ("dedup_perceptual", 0, True),
                                                     ("drops", 0, True), ("release", 1, False)])
def test_a_crash_at_any_step_resumes_to_the_same_shards(with_models, demo_web, tmp_path, phase, shard, keep_pool):
    _, url_list = demo_web
    output = tmp_path / "killed"
    settings = [*DETERMINISM, f"engine.keep_pool={str(keep_pool).lower()}"]
    args = ["run", str(DEMO_RECIPE), "--no-progress", "--set", f"source.path={url_list}", "--set",
            f"output.path={output}", *[a for pair in settings for a in ("--set", pair)]]
    killed = cli(*args, env={"CURATE_TEST_CRASH_AFTER": f"{phase}:{shard}"})
    assert killed.returncode == 86, killed.stderr
    assert not (output / "manifest.json").exists()
    if phase.startswith(("dedup", "decide")):
        assert (output / "_work" / phase.removeprefix("decide-") / "decision.json").exists()
    if phase == "release":  # the released work shard's pool data is gone, its markers stay
        assert not (output / "_pool" / "input" / "00001.parquet").exists()
        assert (output / "_pool" / "annotations" / "fetch" / "00001.done.json").exists()
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert_reconciles(manifest, output)
    assert shard_digests(manifest) == shard_digests(with_models)
    assert manifest["drop_log"]["sha256"] == with_models["drop_log"]["sha256"]

    def without_timing(decisions: dict) -> dict:
        return {name: {k: v for k, v in d.items() if k != "seconds"} for name, d in decisions.items()}

    assert without_timing(manifest["decisions"]) == without_timing(with_models["decisions"])
    assert (output / "_pool").exists() == keep_pool

def test_rerun_of_a_finished_output_is_a_no_op(uninterrupted, demo_web):
    server, url_list = demo_web
    folder, first, _ = uninterrupted
    hits_before = sum(route.hits for route in server.routes.values())
    manifest_before = (folder / "a" / "manifest.json").read_bytes()
    again = run(url_list, folder / "a", *DETERMINISM)
    assert again == first
    assert (folder / "a" / "manifest.json").read_bytes() == manifest_before
    assert sum(route.hits for route in server.routes.values()) == hits_before


def test_a_changed_input_file_is_refused_until_overwrite_starts_over(demo_web, tmp_path):
    server, url_list = demo_web
    rows = pq.read_table(url_list)
    short_list, output = tmp_path / "urls.parquet", tmp_path / "out"
    pq.write_table(rows.slice(0, 20), short_list)
    first = run(short_list, output, *DETERMINISM)
    assert first["sources"][0]["input_file"]["bytes"] == short_list.stat().st_size
    assert run(short_list, output, *DETERMINISM) == first  # unchanged input: complete, nothing to do

    pq.write_table(rows.slice(0, 15), short_list)
    with pytest.raises(OutputConflict) as caught:
        run(short_list, output, *DETERMINISM)
    assert caught.value.path == "source.path" and "input file changed" in caught.value.message
    assert json.loads((output / "manifest.json").read_text()) == first  # refused: the old output is untouched

    loaded = load_recipe(DEMO_RECIPE, [f"source.path={short_list}", f"output.path={output}", *NO_MODELS,
                                       *DETERMINISM])
    again = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False, overwrite=True)
    assert again["reconciliation"]["input_rows"] == 15
    assert_reconciles(again, output)
    hits_before = sum(route.hits for route in server.routes.values())
    restarted = execute(compile_plan(loaded), Console(file=io.StringIO()), progress=False, overwrite=True)
    assert shard_digests(restarted) == shard_digests(again)
    # --overwrite starts even a finished output over: every image is requested again
    assert sum(route.hits for route in server.routes.values()) - hits_before >= 15


def test_a_recipe_with_another_source_into_the_same_output_is_refused(uninterrupted, demo_web, tmp_path):
    _, url_list = demo_web
    folder, _, _ = uninterrupted
    other_list = tmp_path / "other-urls.parquet"
    other_list.write_bytes(url_list.read_bytes())
    manifest = (folder / "a" / "manifest.json").read_text()
    with pytest.raises(OutputConflict) as caught:
        run(other_list, folder / "a", *DETERMINISM)
    assert caught.value.path == "source" and "--overwrite" in caught.value.message
    assert f"source.path: \"{url_list}\" -> \"{other_list}\"" in caught.value.message
    assert (folder / "a" / "manifest.json").read_text() == manifest


def test_verify_passes_then_catches_a_changed_shard(uninterrupted, tmp_path):
    folder, first, _ = uninterrupted
    ok = cli("verify", str(folder / "b"))
    assert ok.returncode == 0, ok.stderr
    assert "match the manifest" in ok.stdout
    shard = folder / "b" / first["outputs"]["shards"][-1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = cli("verify", str(folder / "b"))
    assert bad.returncode == 1
    assert shard.name in bad.stderr and "sha256" in bad.stderr


def test_inspect_prints_funnel_drops_shards_and_quantiles(uninterrupted):
    folder, first, _ = uninterrupted
    shown = cli("inspect", str(folder / "a" / "manifest.json"))
    assert shown.returncode == 0, shown.stderr
    for words in (
        "Funnel",
        "Drops by reason",
        "Shards",
        "Quantiles",
        "http_404",
        "reconciles",
        first["outputs"]["shards"][0]["path"],
    ):
        assert words in shown.stdout
