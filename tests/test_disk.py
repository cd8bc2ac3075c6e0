"""Disk: a run refuses to start when its output's filesystem clearly lacks the space its estimate needs
(curate/engine/disk.py), unless engine.check_disk is false; the work area is kept only with engine.keep_work."""

from __future__ import annotations

import io
import shutil
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from curate import storage
from curate.cli import app
from curate.demo.server import LoopbackServer, Route
from curate.engine import disk
from curate.engine.disk import InsufficientDisk, check_free_disk, estimate_run_bytes
from curate.engine.run import compile_plan, execute
from curate.recipe import load_recipe

Usage = namedtuple("Usage", "total used free")
GiB = 1 << 30


def free_space(monkeypatch, free: int, under: Path | None = None) -> list[str]:
    """Make the filesystem (of paths under `under`, else every path) report `free` bytes free; record the asks."""
    real = shutil.disk_usage
    asked: list[str] = []

    def fake(path):
        if under is not None and not Path(path).resolve().is_relative_to(under.resolve()):
            return real(path)
        asked.append(str(path))
        return Usage(10 * GiB, 10 * GiB - free, free)

    monkeypatch.setattr(disk.shutil, "disk_usage", fake)
    return asked


def url_recipe(folder: Path, rows: int, *extra: str, fmt: str = "parquet") -> Path:
    urls = [f"http://images.example/{i}.jpg" for i in range(rows)]
    if fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": ["a caption"] * rows}), folder / "urls.parquet")
    else:
        (folder / "urls.csv").write_text("url,caption\n" + "".join(f"{u},a caption of a few words\n" for u in urls))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"source: {{type: url_list, path: urls.{fmt}}}\n"
                      "stages:\n  fetch: {resize: {size: 512}, encode: {format: jpg}}\n  basic_filter: {}\n"
                      "output: {path: out, formats: [parquet, webdataset]}\n" + "".join(f"{line}\n" for line in extra))
    return recipe


def plan_of(recipe: Path, *overrides: str):
    """The plan of `recipe` with its output in the recipe's folder (a relative output.path is the current one's)."""
    return compile_plan(load_recipe(recipe, [f"output.path={recipe.parent / 'out'}", *overrides]))


def test_the_estimate_is_rows_times_encoded_size_times_copies(tmp_path):
    plan = plan_of(url_recipe(tmp_path, 1000))
    estimate = estimate_run_bytes(plan)
    per_sample = int(512 * 512 * 3 * disk.ENCODING_FACTOR["jpg"])
    assert (estimate.rows, estimate.bytes_per_sample, estimate.copies) == (1000, per_sample, 3)  # pool + 2 formats
    assert estimate.total_bytes == 1000 * per_sample * 3
    assert "1,000 rows" in estimate.how and "1 in the pool + 2 output format(s)" in estimate.how
    webp = estimate_run_bytes(plan_of(url_recipe(tmp_path, 1000), "stages.fetch.encode.format=webp",
                                      "output.formats=[parquet]"))
    assert webp.total_bytes == 1000 * int(512 * 512 * 3 * disk.ENCODING_FACTOR["webp"]) * 2


def test_rows_of_a_text_list_are_extrapolated_from_its_first_mebibyte(tmp_path):
    plan = plan_of(url_recipe(tmp_path, 60_000, fmt="csv"))
    rows = estimate_run_bytes(plan).rows
    assert abs(rows - 60_001) / 60_001 < 0.02  # the header line counts too; within 2%


def test_a_run_that_clearly_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    recipe = url_recipe(tmp_path, 100_000)
    asked = free_space(monkeypatch, free=1 * GiB)
    with pytest.raises(InsufficientDisk) as caught:
        execute(plan_of(recipe), Console(file=io.StringIO()), progress=False)
    assert caught.value.path == "engine.check_disk"
    assert "needs about" in caught.value.message and "1.0 GiB free" in caught.value.message
    assert "engine.check_disk: false" in caught.value.message
    assert not (tmp_path / "out").exists()  # nothing was started: no work area, no run.json
    assert asked == [str(tmp_path / "out")]  # the output folder (made to hold the run's lock, then removed)


def test_the_command_line_prints_one_clear_error_and_exits_2(tmp_path, monkeypatch):
    recipe = url_recipe(tmp_path, 100_000)
    free_space(monkeypatch, free=100 * (1 << 20))
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", f"output.path={tmp_path / 'out'}"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "not enough free disk" in result.output and "Traceback" not in result.output


def test_close_to_the_limit_warns_and_comfortably_below_says_nothing(tmp_path, monkeypatch):
    plan = plan_of(url_recipe(tmp_path, 1000))
    needed = estimate_run_bytes(plan).total_bytes
    warnings: list[str] = []
    free_space(monkeypatch, free=int(needed * 1.1))
    check_free_disk(plan, warn=warnings.append)
    assert len(warnings) == 1 and "may run out of disk" in warnings[0]
    free_space(monkeypatch, free=needed * 10)
    check_free_disk(plan, warn=warnings.append)
    assert len(warnings) == 1
    free_space(monkeypatch, free=int(needed / disk.REFUSE_ABOVE) - 1)
    with pytest.raises(InsufficientDisk):
        check_free_disk(plan, warn=warnings.append)


def test_a_resumed_run_counts_what_its_output_folder_already_holds(tmp_path, monkeypatch):
    plan = plan_of(url_recipe(tmp_path, 1000))
    needed = estimate_run_bytes(plan).total_bytes
    free_space(monkeypatch, free=needed // 2)
    with pytest.raises(InsufficientDisk):
        check_free_disk(plan)
    (tmp_path / "out" / "_work").mkdir(parents=True)
    (tmp_path / "out" / "_work" / "done.bin").write_bytes(b"\0" * (needed * 2 // 3))  # most of it already written
    assert check_free_disk(plan) is not None


def test_stored_images_count_their_bytes_once_more_per_copy(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (300, 200), (i * 40, 0, 0)).save(folder / f"{i}.png")
    total = sum(p.stat().st_size for p in folder.iterdir())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("source: {type: image_folder, path: photos}\nstages:\n  decode: {keep_bytes: true}\n"
                      "output: {path: out, formats: [parquet]}\n")
    kept = estimate_run_bytes(plan_of(recipe))
    assert kept.total_bytes == total * 3  # the split, the prepare phase and one format
    resized = estimate_run_bytes(plan_of(recipe, "stages.decode.keep_bytes=false", "stages.decode.resize.size=16"))
    per_sample = int(16 * 16 * 3 * disk.ENCODING_FACTOR["jpg"])
    assert resized.rows == 5 and resized.total_bytes == total + 5 * per_sample * 2


def test_outputs_on_object_stores_are_not_checked(monkeypatch):
    asked = free_space(monkeypatch, free=0)
    plan = SimpleNamespace(layout=SimpleNamespace(root=storage.location("memory://bucket/out")))
    assert check_free_disk(plan) is None and asked == []


def test_check_disk_is_an_execution_setting_that_does_not_change_the_recipe_hash(tmp_path):
    recipe = url_recipe(tmp_path, 10)
    assert load_recipe(recipe).sha256() == load_recipe(recipe, ["engine.check_disk=false"]).sha256()


# --------------------------------------------------------------------------- one run


def test_check_disk_false_runs_anyway_and_keep_work_keeps_the_work_area(tmp_path, monkeypatch, local_ray):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "JPEG")
    with LoopbackServer({"/a.jpg": Route(body=buffer.getvalue())}) as server:
        pq.write_table(pa.table({"url": [server.url("/a.jpg"), server.url("/gone.jpg")],
                                 "caption": ["a red picture", "a missing picture"]}), tmp_path / "urls.parquet")
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("source: {type: url_list, path: urls.parquet}\n"
                          "stages:\n  fetch: {allow_private_addresses: true, host_rate: null, retries: 0}\n"
                          "output: {path: out, formats: [parquet]}\n"
                          "engine: {check_disk: false, keep_work: true, rows_per_work_shard: 1}\n")
        free_space(monkeypatch, free=0, under=tmp_path)  # "no space at all" for this folder only
        manifest = execute(plan_of(recipe), Console(file=io.StringIO()), progress=False)
    assert manifest["reconciliation"]["ok"] and manifest["reconciliation"]["output_rows"] == 1
    work, pool = tmp_path / "out" / "_work", tmp_path / "out" / "_pool"
    assert sorted(p.name for p in (work / "select").glob("*.done.json")) == ["00000.done.json", "00001.done.json"]
    assert sorted(p.name for p in (pool / "annotations" / "fetch").glob("*.done.json")) == [
        "00000.done.json", "00001.done.json"]
    assert (pool / "input" / "_SUCCESS.json").exists() and (work / "write" / "plan.json").exists()
