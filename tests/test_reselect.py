"""Select many: re-running a changed recipe on its output re-selects from the pool, fetching and computing only
what the change needs; --pool cuts a new output from another's pool; fetch settings that admit more fetch just
those rows; refusals name each changed key."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from rich.console import Console

from curate.demo.server import LoopbackServer, Route
from curate.engine.run import OutputConflict, compile_plan, execute
from curate.recipe import load_recipe

DATA = Path(__file__).resolve().parent / "data" / "captioned-images"


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photos() -> dict[str, tuple[bytes, str]]:
    """The COCO photos of tests/data with their captions, plus small synthetic images (one below min_side)."""
    found = {}
    for line in (DATA / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[f"/{Path(row['file_name']).name}"] = ((DATA / row["file_name"]).read_bytes(), row["caption"])
    for i in range(5):
        found[f"/rect{i}.jpg"] = (jpeg((60 + 10 * i, 40 + 6 * i), (50 * i % 255, 120, 200 - 30 * i)),
                                  f"un rectangle coloré numéro {i}")
    found["/tiny.jpg"] = (jpeg((12, 12), (250, 10, 10)), "ein winziges rotes Quadrat")
    return found


IMAGES = photos()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reselect-web")
    with LoopbackServer({path: Route(body=body) for path, (body, _) in IMAGES.items()}) as server:
        paths = list(IMAGES)
        pq.write_table(pa.table({"url": [server.url(p) for p in paths],
                                 "caption": [IMAGES[p][1] for p in paths]}), folder / "urls.parquet")
        yield server, folder / "urls.parquet"


def recipe_file(folder: Path, url_list: Path, name: str = "recipe") -> Path:
    data = {
        "source": {"type": "url_list", "path": str(url_list), "url_column": "url", "caption_column": "caption"},
        "stages": {"fetch": {"allow_private_addresses": True, "host_rate": None, "retries": 0},
                   "basic_filter": {"min_side": 32},
                   "clip_score": {"model": {"model": "curate-tiny"}, "min_score": -1.0},
                   "dedup_exact": {}},
        "output": {"path": str(folder / "out"), "formats": ["parquet", "webdataset"]},
        "engine": {"rows_per_work_shard": 4},
    }
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def run(file: Path, *overrides: str, pool: Path | None = None, overwrite: bool = False) -> dict:
    plan = compile_plan(load_recipe(file, list(overrides)), pool=str(pool) if pool else None)
    return execute(plan, Console(file=io.StringIO()), progress=False, overwrite=overwrite, judge=False)


def hits(server: LoopbackServer) -> int:
    return sum(route.hits for route in server.routes.values())


def annotations(manifest: dict) -> dict[str, dict]:
    return manifest["pool"]["annotations"]


def computed(manifest: dict) -> dict[str, int]:
    return {name: entry["computed_rows"] for name, entry in annotations(manifest).items()}


def loads(manifest: dict) -> int:
    return sum(entry["loads"] for entry in annotations(manifest).values())


def output_bytes(output: Path) -> dict[str, str]:
    """Every output file (the pool, work area, manifest and drop log aside) -> sha256 of its bytes."""
    found = {}
    for path in sorted(output.rglob("*")):
        relative = path.relative_to(output).as_posix()
        if path.is_file() and not relative.startswith(("_pool/", "_work/")) and relative not in (
                "manifest.json", "_lock.json"):
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def funnel(manifest: dict) -> list[tuple]:
    return [(s["name"], s["rows_in"], s["rows_out"], json.dumps(s["dropped"], sort_keys=True))
            for s in manifest["stages"]]


def folder_digest(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_threshold_change_reselects_without_a_request_or_a_model_and_matches_a_fresh_run(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    first = run(file)
    assert first["reconciliation"]["ok"]
    assert computed(first)["fetch"] == len(IMAGES) and loads(first) >= 1

    before = hits(server)
    changed = run(file, "stages.basic_filter.min_side=70", "output.shard_rows=3")
    assert hits(server) == before  # not one HTTP request
    assert loads(changed) == 0 and set(computed(changed).values()) == {0}  # no model loaded, nothing computed
    assert all(entry["reused_rows"] for entry in annotations(changed).values())
    assert changed["reconciliation"]["ok"]
    assert changed["stages"][2]["name"] == "basic_filter"
    assert changed["stages"][2]["dropped"]["too_small"] > first["stages"][2]["dropped"]["too_small"]

    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = run(recipe_file(fresh_folder, url_list), "stages.basic_filter.min_side=70", "output.shard_rows=3")
    assert output_bytes(tmp_path / "out") == output_bytes(fresh_folder / "out")  # byte for byte
    assert funnel(changed) == funnel(fresh)
    assert len(changed["outputs"]["shards"]) > len(first["outputs"]["shards"])

    # back to the first settings: the extra shard files of the second output are gone
    before = hits(server)
    back = run(file)
    assert {s["path"] for s in back["outputs"]["shards"]} == {s["path"] for s in first["outputs"]["shards"]}
    written = {p for p in output_bytes(tmp_path / "out") if p.startswith(("parquet/", "webdataset/"))}
    listed = {s["path"] for s in back["outputs"]["shards"]}
    assert {p for p in written if p.endswith((".parquet", ".tar"))} == listed
    assert hits(server) == before


def test_a_loosened_gate_annotates_only_the_rows_it_now_lets_through(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    gated = run(file, "gates=[basic_filter]", "stages.basic_filter.min_side=70")
    small = sum(1 for body, _ in IMAGES.values() if min(Image.open(io.BytesIO(body)).size) < 70)
    assert annotations(gated)["clip_score"]["computed_rows"] == len(IMAGES) - small

    before = hits(server)
    loosened = run(file, "gates=[basic_filter]", "stages.basic_filter.min_side=32")
    newly = sum(1 for body, _ in IMAGES.values() if 32 <= min(Image.open(io.BytesIO(body)).size) < 70)
    assert hits(server) == before and newly > 0
    assert annotations(loosened)["clip_score"]["computed_rows"] == newly
    assert annotations(loosened)["clip_score"]["reused_rows"] == len(IMAGES) - small
    assert annotations(loosened)["fetch"]["computed_rows"] == 0
    assert loosened["reconciliation"]["ok"]

    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = run(recipe_file(fresh_folder, url_list), "gates=[basic_filter]", "stages.basic_filter.min_side=32")
    assert output_bytes(tmp_path / "out") == output_bytes(fresh_folder / "out")
    assert funnel(loosened) == funnel(fresh)


def perturbed_head(folder: Path) -> Path:
    """A copy of the tiny aesthetic head with its weights nudged: another model, as far as the pool can tell."""
    from safetensors.torch import load_file, save_file

    from curate.models.aesthetic import TINY_AESTHETIC

    tensors = {name: tensor * 1.01 for name, tensor in load_file(TINY_AESTHETIC.path).items()}
    path = folder / "other-head.safetensors"
    save_file(tensors, str(path))
    return path


AESTHETIC = "stages.aesthetic={clip: {model: curate-tiny}, head: {head: tiny}, min_score: -100}"
MODEL_STAGES = [AESTHETIC, "stages.watermark={clip: {model: curate-tiny}, head: {head: tiny}, max_score: 1.0}"]


def test_a_changed_model_recomputes_only_its_stage_and_those_that_read_it(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    first = run(file, *MODEL_STAGES)
    before = hits(server)

    other_head = perturbed_head(tmp_path)
    other = [AESTHETIC.replace("head: tiny", f"head: tiny, path: '{other_head}'"), MODEL_STAGES[1]]
    changed = run(file, *other)
    assert hits(server) == before
    assert {name for name, rows in computed(changed).items() if rows} == {"aesthetic"}
    assert computed(changed)["aesthetic"] == first["pool"]["annotations"]["aesthetic"]["computed_rows"]
    assert {name for name, entry in annotations(changed).items() if entry["loads"]} == {"aesthetic"}

    # clip_score's caption choice changes its embeddings' text side: it and the stages reading them recompute
    recaptioned = run(file, *other, "stages.clip_score.caption=x")
    assert hits(server) == before
    assert {name for name, rows in computed(recaptioned).items() if rows} == {"clip_score", "aesthetic", "watermark"}
    assert recaptioned["reconciliation"]["ok"]


def test_a_changed_recipe_that_changes_the_pool_images_is_refused_naming_each_key(web, tmp_path):
    _, url_list = web
    file = recipe_file(tmp_path, url_list)
    first = run(file)
    with pytest.raises(OutputConflict) as caught:
        run(file, "stages.fetch.resize.size=256", "stages.fetch.encode.format=webp")
    message = caught.value.message
    assert "images.fetch.resize.size: 1024 -> 256" in message
    assert 'images.fetch.encode.format: "jpg" -> "webp"' in message and "--overwrite" in message
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == first  # untouched


def test_a_trial_then_a_full_run_extends_the_pool(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    before = hits(server)
    trial = run(file, "trial.limit=4")
    assert hits(server) - before == 4 and trial["reconciliation"]["input_rows"] == 4
    full = run(file)
    assert hits(server) - before == len(IMAGES)  # each image fetched once over both runs
    assert full["reconciliation"]["ok"] and full["reconciliation"]["input_rows"] == len(IMAGES)
    assert annotations(full)["fetch"]["computed_rows"] == len(IMAGES) - 4

    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = run(recipe_file(fresh_folder, url_list))
    assert funnel(full) == funnel(fresh)
    assert output_bytes(tmp_path / "out") == output_bytes(fresh_folder / "out")


def test_a_bigger_size_limit_fetches_only_the_images_that_were_too_large(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    big = sorted(path for path, (body, _) in IMAGES.items() if len(body) > 4096)
    assert 0 < len(big) < len(IMAGES)
    first = run(file, "stages.fetch.max_bytes=4096")
    assert first["stages"][1]["dropped"]["too_large"] == len(big)
    counts = {path: route.hits for path, route in server.routes.items()}
    raised = run(file, "stages.fetch.max_bytes=1000000")
    again = {path: route.hits - counts[path] for path, route in server.routes.items()}
    assert {path for path, n in again.items() if n} == set(big) and set(again.values()) == {0, 1}
    assert annotations(raised)["fetch"]["computed_rows"] == len(big)
    assert raised["reconciliation"]["ok"] and "too_large" not in raised["stages"][1]["dropped"]


def test_allowing_private_addresses_fetches_only_the_rows_the_guard_refused(web, tmp_path):
    server, url_list = web
    rows = pq.read_table(url_list).to_pylist()
    rows += [{"url": "not a url at all", "caption": "kein Bild"}, {"url": "ftp://example.org/x.jpg", "caption": "ftp"}]
    listed = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listed)
    file = recipe_file(tmp_path, listed)
    before = hits(server)
    guarded = run(file, "stages.fetch.allow_private_addresses=false")
    assert hits(server) == before
    assert guarded["stages"][1]["dropped"] == {"blocked_address": len(IMAGES), "invalid_url": 2}
    allowed = run(file)
    assert hits(server) - before == len(IMAGES)  # every refused image once; the invalid URLs stay as they were
    assert annotations(allowed)["fetch"]["computed_rows"] == len(IMAGES)
    assert annotations(allowed)["fetch"]["reused_rows"] == 2
    assert allowed["stages"][1]["dropped"] == {"invalid_url": 2} and allowed["reconciliation"]["ok"]


def test_pool_builds_a_new_output_from_another_without_touching_it(web, tmp_path):
    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    run(file)
    source_state = folder_digest(tmp_path / "out")
    before = hits(server)
    subset = tmp_path / "subset"
    made = run(file, f"output.path={subset}", "stages.basic_filter.min_side=70", "stages.dedup_exact=false",
               "output.formats=[parquet]", pool=tmp_path / "out")
    assert hits(server) == before and loads(made) == 0
    assert folder_digest(tmp_path / "out") == source_state  # read only
    assert made["pool"]["reads"] == str((tmp_path / "out").resolve())
    assert annotations(made)["fetch"]["shards"]["from_pool"]
    assert not (subset / "_pool" / "annotations").exists() or not any((subset / "_pool" / "annotations").rglob(
        "*.parquet"))  # nothing was computed, so nothing is stored

    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = run(recipe_file(fresh_folder, url_list), "stages.basic_filter.min_side=70", "stages.dedup_exact=false",
                "output.formats=[parquet]")
    assert output_bytes(subset) == output_bytes(fresh_folder / "out")
    assert funnel(made) == funnel(fresh)
    from curate.report.distributions import read_annotation_distributions

    seen = read_annotation_distributions(subset)  # curate inspect reads the annotations where the run found them
    clip = next(m for m in seen.metrics if m.stage == "clip_score")
    assert clip.annotated == made["pool"]["annotations"]["clip_score"]["reused_rows"] > 0
    assert clip.kept.size == made["reconciliation"]["output_rows"]

    # a recipe that needs one more annotation stores only that one in the new output
    before = hits(server)
    more = tmp_path / "more"
    extended = run(file, f"output.path={more}", AESTHETIC, pool=tmp_path / "out")
    stored = sorted(p.name for p in (more / "_pool" / "annotations").iterdir())
    assert stored == ["aesthetic"] and computed(extended)["aesthetic"] == extended["stages"][-1]["annotated"] > 0
    assert folder_digest(tmp_path / "out") == source_state
    assert hits(server) == before

    shutil.rmtree(tmp_path / "fresh")


def test_what_if_prints_the_funnel_the_next_run_gives_and_writes_nothing(web, tmp_path):
    from curate.engine.whatif import WhatIfNeedsARun, what_if

    server, url_list = web
    file = recipe_file(tmp_path, url_list)
    first = run(file)
    state = folder_digest(tmp_path / "out")
    before = hits(server)
    settings = ["stages.basic_filter.min_side=70", "stages.clip_score.min_score=0.0",
                "stages.dedup_exact.keep=[source_order]"]
    predicted = what_if(compile_plan(load_recipe(file, settings)))
    assert folder_digest(tmp_path / "out") == state and hits(server) == before  # nothing written, nothing fetched
    assert predicted["current"]["output_rows"] == first["reconciliation"]["output_rows"]
    following = run(file, *settings)
    assert [(s["name"], s["rows_in"], s["rows_out"], s["dropped"]) for s in predicted["stages"]] == [
        (s["name"], s["rows_in"], s["rows_out"], s["dropped"]) for s in following["stages"]]
    assert predicted["output_rows"] == following["reconciliation"]["output_rows"]

    # the command line prints it, with the changes against the output as it is now
    from typer.testing import CliRunner

    from curate.cli import app

    shown = CliRunner().invoke(app, ["run", str(file), "--what-if", "--set", "stages.basic_filter.min_side=32"])
    assert shown.exit_code == 0, shown.output
    assert "would keep" in shown.output and "nothing was written" in shown.output
    assert folder_digest(tmp_path / "out") != state  # the real run above rewrote the output, the what-if did not
    state = folder_digest(tmp_path / "out")

    # a loosened gate: the rows it now lets through are counted apart, not guessed
    gated_out = f"output.path={tmp_path / 'gated'}"
    gated = run(file, gated_out, "gates=[basic_filter]", "stages.basic_filter.min_side=70")
    state = folder_digest(tmp_path / "gated")
    loosened = what_if(compile_plan(load_recipe(file, [gated_out, "gates=[basic_filter]",
                                                       "stages.basic_filter.min_side=32"])))
    clip = next(s for s in loosened["stages"] if s["name"] == "clip_score")
    assert clip["not_annotated"] == gated["stages"][2]["dropped"]["too_small"] - sum(
        1 for body, _ in IMAGES.values() if min(Image.open(io.BytesIO(body)).size) < 32) > 0
    assert folder_digest(tmp_path / "gated") == state
    before = hits(server)

    # settings that need new annotations are refused, naming the stage
    with pytest.raises(WhatIfNeedsARun, match="clip_score"):
        what_if(compile_plan(load_recipe(file, ["stages.clip_score.caption=x"])))
    assert hits(server) == before
