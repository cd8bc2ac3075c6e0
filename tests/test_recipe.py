"""Recipes: validation, presets, overrides and the clear one-line errors users see."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.engine.run import compile_plan
from curate.recipe import bundled_recipes, load_recipe
from curate.stage import RecipeError


@pytest.fixture
def url_list(tmp_path: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a red circle"]}), path)
    return path


def write_recipe(folder: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


BASE = """
source:
  type: url_list
  path: urls.parquet
stages:
  fetch: {}
  basic_filter:
    min_side: 32
output:
  path: out
"""


def test_valid_recipe_resolves_defaults_and_hash_is_stable(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE)
    first, second = load_recipe(recipe), load_recipe(recipe)
    resolved = first.resolved()
    assert resolved["stages"]["fetch"]["resize"]["size"] == 1024
    assert resolved["stages"]["basic_filter"]["min_side"] == 32
    assert first.sha256() == second.sha256()
    assert load_recipe(recipe, ["stages.basic_filter.min_side=64"]).sha256() != first.sha256()


def test_set_overrides_parse_yaml_values(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE)
    loaded = load_recipe(recipe, ["stages.basic_filter.max_aspect_ratio=2.5", "output.formats=[parquet]",
                                  "engine.keep_work=true"])
    assert loaded.stage_params["basic_filter"].max_aspect_ratio == 2.5
    assert loaded.recipe.output.formats == ["parquet"]
    assert loaded.recipe.engine.keep_work is True


def test_include_merges_preset_under_the_recipe(tmp_path, url_list):
    recipe = write_recipe(tmp_path, """
        include: [datacomp_basic]
        source: {type: url_list, path: urls.parquet}
        stages:
          fetch: {}
          basic_filter: {min_side: 100}
        output: {path: out}
    """)
    loaded = load_recipe(recipe)
    params = loaded.stage_params["basic_filter"]
    assert params.min_side == 100  # the recipe wins
    assert params.max_aspect_ratio == 3.0  # the preset fills the rest
    assert list(loaded.stage_params) == ["fetch", "basic_filter", "language"]


def test_preset_only_stage_runs_after_the_recipes_stages(tmp_path, url_list):
    recipe = write_recipe(tmp_path, """
        include: datacomp_basic
        source: {type: url_list, path: urls.parquet}
        stages: {fetch: {}}
        output: {path: out}
    """)
    assert list(load_recipe(recipe).stage_params) == ["fetch", "basic_filter", "language"]
    assert list(load_recipe(recipe, ["stages.language=false"]).stage_params) == ["fetch", "basic_filter"]


@pytest.mark.parametrize(
    "body, overrides, path, words",
    [
        (BASE.replace("min_side: 32", "min_sid: 32"), [], "stages.basic_filter.min_sid", "unknown key"),
        (BASE.replace("min_side: 32", "min_side: big"), [], "stages.basic_filter.min_side", "integer"),
        (BASE, ["output.shard_rows=0"], "output.shard_rows", "greater than or equal to 1"),
        (BASE.replace("basic_filter:", "blur_faces:"), [], "stages.blur_faces", "unknown stage"),
        (BASE.replace("type: url_list", "type: ftp_dump"), [], "source.type", "url_list"),
        (BASE, ["output.formats=[parquet, zip]"], "output.formats.1", "webdataset"),
        (BASE.replace("output:\n  path: out", "output: {}"), [], "output.path", "required"),
        (BASE + "extra_top_level: 1\n", [], "extra_top_level", "unknown key"),
        ("include: [no_such_preset]\n" + BASE, [], "include", "no preset 'no_such_preset'"),
    ],
)
def test_user_mistakes_name_file_key_and_expectation(tmp_path, url_list, body, overrides, path, words):
    recipe = write_recipe(tmp_path, body)
    with pytest.raises(RecipeError) as caught:
        compile_plan(load_recipe(recipe, overrides))
    error = caught.value
    assert error.path == path
    assert words in error.message
    assert str(recipe) in str(error)


def test_missing_input_file_and_bad_column_are_caught_before_work(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE)
    with pytest.raises(RecipeError) as caught:
        compile_plan(load_recipe(recipe, ["source.path=nowhere.parquet"]))
    assert caught.value.path == "source.path" and "nowhere.parquet" in str(caught.value)
    with pytest.raises(RecipeError) as caught:
        compile_plan(load_recipe(recipe, ["source.url_column=link"]))
    assert caught.value.path == "source.url_column" and "caption" in str(caught.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = write_recipe(tmp_path, "source: {type: url_list\noutput: [\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert "line" in caught.value.message and str(recipe) in str(caught.value)


def test_cli_prints_one_clear_line_and_no_traceback(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE.replace("min_side: 32", "min_side: big"))
    result = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(recipe), "--dry-run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "stages.basic_filter.min_side" in lines[0] and str(recipe) in " ".join(result.stderr.split())


# Recipes whose source is not a URL list, and an input of their kind.
RECIPE_INPUTS = {"edit": Path(__file__).resolve().parent / "data" / "edit-triplets" / "ip2p"}
_DOCS = Path(__file__).resolve().parent / "data"
RECIPE_INPUTS.update({"mmc4": _DOCS / "interleaved-docs" / "mmc4_core_ff_shard_151_v3.first12.jsonl",
                      "obelics": _DOCS / "interleaved-docs" / "obelics_layout_from_mmc4.first4.parquet",
                      "warc": _DOCS / "web-pages" / "warc" / "resiliparse_cc-main-2020-34_sample.warc.gz"})


@pytest.mark.parametrize("recipe", bundled_recipes(), ids=lambda p: p.stem)
def test_every_bundled_recipe_dry_runs_with_source_and_output_overrides(tmp_path, url_list, recipe):
    source = RECIPE_INPUTS.get(recipe.stem, url_list)
    result = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(recipe), "--dry-run",
                             "--set", f"source.path={source}", "--set", f"output.path={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "recipe is valid" in result.stdout
    assert not (tmp_path / "out").exists()


def test_bundled_recipes_exist():
    names = {p.stem for p in bundled_recipes()}
    assert "demo" in names and len(names) >= 2


def test_hash_ignores_execution_only_settings_but_not_results(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE)
    base = load_recipe(recipe).sha256()
    assert load_recipe(recipe, ["engine.workers=1", "engine.keep_work=true", f"output.path={tmp_path}/moved",
                                "engine.address=ray://h:10001"]).sha256() == base
    assert load_recipe(recipe, ["engine.rows_per_work_shard=7"]).sha256() != base
    assert load_recipe(recipe, ["output.shard_rows=5"]).sha256() != base


def test_paths_set_on_the_command_line_are_taken_from_the_current_directory(tmp_path, url_list, monkeypatch):
    (tmp_path / "recipes").mkdir()
    recipe = write_recipe(tmp_path / "recipes", BASE)
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe, ["source.path=urls.parquet"])
    assert loaded.source_params.path == str(url_list)
    compile_plan(loaded)  # finds the file, although the recipe's folder has no urls.parquet


def test_sink_settings_are_validated_and_unknown_output_keys_refused(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE)
    loaded = load_recipe(recipe, ["output.parquet.compression=snappy"])
    assert loaded.sink_params["parquet"].compression == "snappy"
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, ["output.parquet.compresion=snappy"])
    assert caught.value.path == "output.parquet.compresion"
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, ["output.zipfile.level=3"])
    assert caught.value.path == "output.zipfile" and "webdataset" in caught.value.message


def test_a_url_list_without_a_fetch_stage_is_refused(tmp_path, url_list):
    recipe = write_recipe(tmp_path, BASE.replace("  fetch: {}\n", ""))
    with pytest.raises(RecipeError) as caught:
        compile_plan(load_recipe(recipe))
    assert caught.value.path == "stages" and "fetch" in caught.value.message
