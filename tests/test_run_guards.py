"""Guard rails for real runs, through the CLI as a user types it: no silent empty corpus, trial runs, `--set` of a
stage the recipe lacks, one rule for paths, clean interruption, and the README's role example."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curate.demo.server import LoopbackServer, Route
from curate.engine.trial import TrialSource, sample_position
from curate.recipe import load_recipe
from curate.sources.url_list import UrlListParams, UrlListSource
from curate.stage import RecipeError

REPO = Path(__file__).resolve().parent.parent
CURATE = [sys.executable, "-m", "curate.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)).save(out, "JPEG")
    return out.getvalue()


def url_list(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"a picture number {i}" for i in range(len(urls))]}), path)
    return path


def curate(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CURATE, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


# --------------------------------------------------------------------------- trial runs


def test_a_bigger_sample_holds_every_row_of_a_smaller_one(tmp_path):
    urls = url_list(tmp_path / "urls.parquet", [f"http://example.com/{i}.jpg" for i in range(2000)])

    def keys(sample: float | None, limit: int | None = None, seed: int = 7) -> list[str]:
        source = TrialSource(UrlListSource(UrlListParams(path=str(urls))), limit, sample, seed)
        return [k for batch in source.iter_batches(256) for k in batch.column("key").to_pylist()]

    every = keys(None)
    small, large = keys(0.1), keys(0.4)
    assert set(small) < set(large) < set(every)
    assert 140 < len(small) < 260 and 700 < len(large) < 900  # about 10% and 40% of 2,000
    assert [k for k in every if k in set(small)] == small  # input order kept
    assert keys(None, limit=25) == every[:25]
    assert keys(0.4, limit=30) == large[:30]
    assert set(keys(0.1, seed=8)) != set(small)  # another seed, another sample
    assert all(sample_position(k, 7) < 0.1 for k in small)


def test_a_trial_is_its_own_recipe(tmp_path):
    overrides = [f"source.path={tmp_path / 'urls.parquet'}", f"output.path={tmp_path / 'out'}"]
    full = load_recipe(REPO / "pipelines" / "download.yaml", overrides)
    trial = load_recipe(REPO / "pipelines" / "download.yaml", [*overrides, "trial.limit=10"])
    assert full.sha256() != trial.sha256()
    assert not full.recipe.trial.active and trial.recipe.trial.active
    with pytest.raises(RecipeError, match="trial.sample"):
        load_recipe(REPO / "pipelines" / "download.yaml", [*overrides, "trial.sample=1.5"])


# --------------------------------------------------------------------------- --set and paths


def test_set_of_a_stage_the_recipe_lacks_names_the_recipes_stages(tmp_path):
    overrides = [f"source.path={tmp_path / 'urls.parquet'}"]
    with pytest.raises(RecipeError) as error:
        load_recipe("download", [*overrides, "stages.clip_score.min_score=0.3"])
    assert "no stage 'clip_score'" in str(error.value) and "fetch, basic_filter" in str(error.value)
    with pytest.raises(RecipeError, match="no stage 'aesthetc'"):
        load_recipe("demo", [*overrides, "stages.aesthetc=false"])  # a typo does not pass silently
    added = load_recipe("download", [*overrides, "stages.nsfw={max_score: 0.5}"])
    assert list(added.stage_params) == ["fetch", "basic_filter", "nsfw"]
    assert load_recipe("demo", [*overrides, "stages.aesthetic=false"]).stage_params.get("aesthetic") is None


def test_paths_in_a_recipe_file_are_from_its_folder_and_set_paths_from_the_current_one(tmp_path, monkeypatch):
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    recipes.mkdir(), work.mkdir()
    (recipes / "mine.yaml").write_text(
        "include: [datacomp_basic]\n"
        "source: {type: url_list, path: lists/urls.parquet}\n"
        "stages: {fetch: {}, caption_join: {path: captions.parquet, on: url, text_column: text}}\n"
        "output: {path: out/mine}\n")
    monkeypatch.chdir(work)
    loaded = load_recipe(recipes / "mine.yaml")
    from curate.engine.run import compile_plan  # noqa: F401 - the plan resolves paths the same way

    assert loaded.source_params.path == "lists/urls.parquet"
    assert Path(UrlListSource(loaded.source_params, recipe_dir=str(loaded.directory)).path) == \
        recipes / "lists" / "urls.parquet"
    assert loaded.output_path() == work / "out" / "mine"  # output.path: from the current folder
    assert "basic_filter" in loaded.stage_params  # include: found beside the recipe, then in filters/
    from_set = load_recipe(recipes / "mine.yaml", ["source.path=elsewhere.parquet",
                                                  "stages.caption_join={path: joined.parquet, on: url}"])
    assert from_set.source_params.path == str(work / "elsewhere.parquet")
    assert from_set.stage_params["caption_join"].path == str(work / "joined.parquet")


# --------------------------------------------------------------------------- mixed image formats


def mixed_folder(folder: Path) -> dict[str, str]:
    """Real COCO photos, some stored as PNG (one with alpha), each with a caption sidecar; name -> caption."""
    folder.mkdir()
    photos = sorted((REPO / "tests" / "data" / "dedup").glob("*.jpg"))[:8]
    captions = {}
    for i, photo in enumerate(photos):
        if i % 3 == 1:
            name = f"photo{i}.png"
            image = Image.open(photo).convert("RGBA" if i == 1 else "RGB")
            image.save(folder / name)
        else:
            name = f"photo{i}.jpg"
            (folder / name).write_bytes(photo.read_bytes())
        captions[name] = f"a real photograph number {i}" if i % 2 else f"照片 {i}，真实的照片"
        (folder / name).with_suffix(".txt").write_text(captions[name], encoding="utf-8")
    return captions


def test_mixed_png_and_jpg_folder_through_the_demo_stages_loads_in_both_libraries(tmp_path):
    import datasets
    import webdataset as wds

    captions = mixed_folder(tmp_path / "photos")
    out = tmp_path / "out"
    source = f"source={{type: image_folder, path: {tmp_path / 'photos'}}}"
    refused = curate("run", "demo", "--dry-run", "--set", source, "--set", f"output.path={out}")
    assert refused.returncode == 2 and "add a `decode` stage" in refused.stderr  # dedup needs fingerprints
    recipe = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    recipe["stages"] = {"fetch": recipe["stages"]["fetch"], "decode": {"keep_bytes": True},
                        **{k: v for k, v in recipe["stages"].items() if k != "fetch"}}
    (tmp_path / "demo_stored.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = curate("run", str(tmp_path / "demo_stored.yaml"), "--no-progress", "--set", source,
                    "--set", f"output.path={out}", "--set", "output.shard_rows=3",
                    # the tiny models' thresholds are for the demo's drawings, not photos
                    "--set", "stages.clip_score.min_score=null", "--set", "stages.aesthetic.min_score=null",
                    "--set", "stages.watermark.max_score=null", "--set", "stages.basic_filter.min_caption_words=1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reconciliation"]["output_rows"] == len(captions)
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    from_hf = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "hf"))
    from_wds = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))
    from_parquet = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "parquet").glob("*")),
                                         split="train", cache_dir=str(tmp_path / "hfp"))
    assert len(from_hf) == len(from_wds) == len(from_parquet) == len(captions)
    assert {k for k in from_hf.column_names if not k.startswith("__")} == {"jpg", "json", "txt"}
    assert sorted(s["txt"] for s in from_wds) == sorted(captions.values())
    for sample in from_wds:
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])
        assert sample["json"]["image_meta"][0]["format"] == "jpg"
    stored_formats = sorted(row["image_meta"][0]["format"] for row in pq.read_table(out / "parquet").to_pylist())
    assert stored_formats == sorted("png" if name.endswith(".png") else "jpg" for name in captions)  # kept as stored


# --------------------------------------------------------------------------- no silent empty corpus


@pytest.fixture
def loopback_list(tmp_path):
    routes = {f"/p/{i}.jpg": Route(body=jpeg(i)) for i in range(6)}
    with LoopbackServer(routes) as server:
        yield url_list(tmp_path / "urls.parquet", [server.url(f"/p/{i}.jpg") for i in range(6)])


def test_dry_run_warns_that_the_first_urls_are_private(loopback_list, tmp_path):
    result = curate("run", "download", "--dry-run", "--set", f"source.path={loopback_list}",
                    "--set", f"output.path={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "6 of the first 6 image URLs point at non-public addresses" in result.stderr
    assert "allow_private_addresses=true" in result.stderr
    allowed = curate("run", "download", "--dry-run", "--set", f"source.path={loopback_list}",
                     "--set", f"output.path={tmp_path / 'out'}", "--set", "stages.fetch.allow_private_addresses=true")
    assert allowed.returncode == 0 and "non-public" not in allowed.stderr


def test_a_run_that_keeps_nothing_says_why_and_strict_makes_it_fail(loopback_list, tmp_path):
    args = ["run", "download", "--no-progress", "--set", f"source.path={loopback_list}"]
    warned = curate(*args, "--set", f"output.path={tmp_path / 'warned'}")
    assert warned.returncode == 0, warned.stderr[-2000:]
    text = " ".join((warned.stdout + warned.stderr).split())
    assert "kept none of 6 input rows" in text and "blocked_address" in text
    assert "--set stages.fetch.allow_private_addresses=true" in text
    strict = curate(*args, "--strict", "--set", f"output.path={tmp_path / 'strict'}")
    assert strict.returncode == 1
    assert "allow_private_addresses" in strict.stderr
    assert (tmp_path / "strict" / "manifest.json").exists()  # the output itself is complete and valid
    fine = curate(*args, "--strict", "--set", f"output.path={tmp_path / 'fine'}",
                  "--set", "stages.fetch.allow_private_addresses=true")
    assert fine.returncode == 0, fine.stderr[-2000:]
    assert "warning" not in fine.stdout + fine.stderr


# --------------------------------------------------------------------------- clean interruption


def test_sigint_to_the_process_group_says_so_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
    routes = {f"/s/{i}.jpg": Route(body=jpeg(i), delay=0.15) for i in range(60)}
    with LoopbackServer(routes) as server:
        urls = url_list(tmp_path / "urls.parquet", [server.url(f"/s/{i}.jpg") for i in range(60)])

        def command(out: Path) -> list[str]:
            return [*CURATE, "run", "download", "--no-progress", "--set", f"source.path={urls}",
                    "--set", f"output.path={out}", "--set", "stages.fetch.allow_private_addresses=true",
                    "--set", "stages.fetch.threads=2", "--set", "engine.rows_per_work_shard=10",
                    "--set", "output.shard_rows=25", "--set", "stages.fetch.host_rate=null"]

        out = tmp_path / "interrupted"
        # a terminal sends SIGINT to the whole foreground process group: Ray's processes get it too
        process = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                   start_new_session=True)
        deadline = time.monotonic() + 120
        while not list((out / "_pool/annotations/fetch").glob("*.done.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr[-2000:]
        assert "interrupted: run the same command again to resume" in stderr
        assert not (out / "manifest.json").exists()

        resumed = subprocess.run(command(out), capture_output=True, text=True, env=ENV, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming" in resumed.stdout
        reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, env=ENV,
                                   timeout=300)
        assert reference.returncode == 0, reference.stderr[-2000:]

    def shards(folder: Path) -> list[tuple[str, str, int]]:
        manifest = json.loads((folder / "manifest.json").read_text())
        return [(s["path"], s["sha256"], s["rows"]) for s in manifest["outputs"]["shards"]]

    assert shards(out) == shards(tmp_path / "reference")
    assert sum(rows for _, _, rows in shards(out)) == 60


def test_sample_runs_from_the_command_line_nest_and_are_marked_as_trials(tmp_path):
    routes = {f"/t/{i}.jpg": Route(body=jpeg(i)) for i in range(40)}
    with LoopbackServer(routes) as server:
        urls = url_list(tmp_path / "urls.parquet", [server.url(f"/t/{i}.jpg") for i in range(40)])

        def sample(fraction: str, out: str) -> dict:
            result = curate("run", "download", "--no-progress", "--set", f"source.path={urls}",
                            "--set", f"output.path={tmp_path / out}",
                            "--set", "stages.fetch.allow_private_addresses=true", "--sample", fraction, "--seed", "3")
            assert result.returncode == 0, result.stderr[-2000:]
            assert "TRIAL" in result.stdout
            return json.loads((tmp_path / out / "manifest.json").read_text())

        small, large = sample("0.25", "small"), sample("0.6", "large")
    assert small["trial"] == {"limit": None, "sample": 0.25, "seed": 3, "rows_read": 40,
                              "rows_skipped": 40 - small["reconciliation"]["input_rows"]}

    def keys(folder: str) -> set[str]:
        import tarfile

        names = set()
        for tar in (tmp_path / folder / "webdataset").glob("*.tar"):
            with tarfile.open(tar) as archive:
                names |= {m.name.split(".")[0] for m in archive if m.isfile()}
        return names

    assert 0 < len(keys("small")) < len(keys("large")) == large["reconciliation"]["output_rows"] < 40
    assert keys("small") <= keys("large")


def test_sigint_under_address_ends_this_run_only_and_the_cluster_stays_up(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    # its own temp dir: a cluster recorded in /tmp/ray would be joined by every later `ray.init()` on this machine
    temp = Path(f"/tmp/curate-head-{os.getpid()}")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        routes = {f"/a/{i}.jpg": Route(body=jpeg(i), delay=0.2) for i in range(40)}
        with LoopbackServer(routes) as server:
            urls = url_list(tmp_path / "urls.parquet", [server.url(f"/a/{i}.jpg") for i in range(40)])
            out = tmp_path / "out"
            command = [*CURATE, "run", "download", "--no-progress", "--address", address,
                       "--set", f"source.path={urls}", "--set", f"output.path={out}",
                       "--set", "stages.fetch.allow_private_addresses=true", "--set", "stages.fetch.threads=2",
                       "--set", "engine.rows_per_work_shard=10"]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                       start_new_session=True)
            deadline = time.monotonic() + 120
            while not list((out / "_pool/annotations/fetch").glob("*.done.json")) and time.monotonic() < deadline:
                time.sleep(0.2)
            os.killpg(process.pid, signal.SIGINT)
            _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
        # the cluster answers, and once the run's actors are gone every CPU is free again
        probe_script = ("import ray, time; ray.init(address=%r, log_to_driver=False);"
                        "deadline = time.time() + 30\n"
                        "while ray.available_resources().get('CPU', 0) < 2 and time.time() < deadline:"
                        " time.sleep(0.5)\n"
                        "print(ray.available_resources().get('CPU', 0), ray.cluster_resources()['CPU'])" % address)
        alive = subprocess.run([sys.executable, "-c", probe_script], capture_output=True, text=True, env=ENV,
                               timeout=120)
        assert alive.returncode == 0, alive.stderr[-2000:]
        assert alive.stdout.split()[-2:] == ["2.0", "2.0"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
