"""The synthetic web: deterministic, routes match rows, faults planted, images match their rows."""

from __future__ import annotations

import io
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.demo.web import (
    COLOURS,
    Scene,
    all_scenes,
    build_synthetic_web,
    draw_scene,
    planted_counts,
    write_url_list,
)

FAULTY = {"corrupt", "not_image"}


@pytest.fixture(scope="module")
def web():
    return build_synthetic_web()


def test_two_builds_are_identical():
    first, second = build_synthetic_web(60, seed=3), build_synthetic_web(60, seed=3)
    assert first.rows == second.rows
    assert {p: r.body for p, r in first.routes.items()} == {p: r.body for p, r in second.routes.items()}
    other = build_synthetic_web(60, seed=4)
    assert [r["caption"] for r in other.rows] != [r["caption"] for r in first.rows]


def test_building_240_images_is_fast():
    start = time.perf_counter()
    build_synthetic_web(240, seed=1)
    assert time.perf_counter() - start < 5.0


def test_planted_counts_are_present(web):
    counts = Counter(row["expect"] for row in web.rows)
    assert counts == planted_counts(240)
    assert counts["mismatched_caption"] == 24 and counts["near_duplicate"] == 12
    assert len(web.rows) == 240


def test_every_row_has_a_route_except_broken_links(web):
    for row in web.rows:
        assert (row["path"] in web.routes) == (row["expect"] != "broken_link"), row


def test_repeated_urls_point_at_an_earlier_ok_row(web):
    first_index = {}
    for index, row in enumerate(web.rows):
        first_index.setdefault(row["path"], index)
    repeated = [row for row in web.rows if row["expect"] == "duplicate_url"]
    assert len(repeated) == 2
    for row in repeated:
        original = web.rows[first_index[row["path"]]]
        assert original["expect"] == "ok" and row["duplicate_of"] == original["path"]
    assert len({row["path"] for row in web.rows}) == 240 - 2


def test_images_decode_to_their_declared_sizes(web):
    checked = 0
    for row in web.rows:
        if row["expect"] in FAULTY | {"broken_link"}:
            continue
        with Image.open(io.BytesIO(web.routes[row["path"]].body)) as image:
            image.load()
            assert image.size == (row["width"], row["height"]), row
            assert image.format == row["format"]
            assert web.routes[row["path"]].content_type == f"image/{row['format'].lower()}"
        checked += 1
    assert checked == 240 - 3 - 3 - 1
    formats = Counter(row["format"] for row in web.rows if row["expect"] == "ok")
    assert formats["JPEG"] > 0 and formats["PNG"] > 0


def test_ok_sizes_tiny_and_wide(web):
    for row in web.rows:
        if row["expect"] == "ok":
            assert 96 <= row["width"] <= 640 and 96 <= row["height"] <= 640
        if row["expect"] == "tiny":
            assert max(row["width"], row["height"]) < 32
        if row["expect"] == "huge_aspect":
            assert row["width"] / row["height"] > 5


def test_image_shows_its_scene():
    """The background colour fills the corners and the shape colour is present."""
    scene = Scene(2, "red", "circle", "blue")
    image = draw_scene(scene, 320, 200, layout_seed=7)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert image.getpixel((0, 0)) == COLOURS["blue"]
    assert COLOURS["red"] in colours


def test_captions_match_images_except_mismatched(web):
    scenes = {scene.caption(): scene for scene in all_scenes()}
    for row in web.rows:
        if row["expect"] == "mismatched_caption":
            said, shown = scenes[row["caption"]], scenes[row["true_caption"]]
            assert said.colour != shown.colour and said.shape != shown.shape and said.background != shown.background
        elif row["true_caption"] is not None:
            assert row["caption"] == row["true_caption"], row


def test_faults_are_served_as_planted(web):
    by_expect = {}
    for row in web.rows:
        by_expect.setdefault(row["expect"], []).append(web.routes.get(row["path"]))
    for route in by_expect["corrupt"]:
        with pytest.raises(OSError):
            Image.open(io.BytesIO(route.body)).load()
        assert route.truncate_to is None and route.body[:2] == b"\xff\xd8"
    assert [r.headers for r in by_expect["opt_out"]] == [{"X-Robots-Tag": "noai"}]
    assert all(r.fail_times == 1 and r.fail_status == 500 for r in by_expect["server_error_then_ok"])
    assert by_expect["not_image"][0].content_type.startswith("text/html")


def test_near_duplicates_copy_an_ok_scene(web):
    ok_paths = {row["path"]: row for row in web.rows if row["expect"] == "ok"}
    near = [row for row in web.rows if row["expect"] == "near_duplicate"]
    for row in near:
        original = ok_paths[row["duplicate_of"]]
        assert row["true_caption"] == original["true_caption"]
        assert web.routes[row["path"]].body != web.routes[original["path"]].body
    assert len({row["duplicate_of"] for row in near}) == len(near)


def test_vocabulary_is_unambiguous():
    scenes = all_scenes()
    assert len({s.caption() for s in scenes}) == len(scenes)
    assert Scene(1, "orange", "star", "white").caption() == "an orange star on a white background"
    assert Scene(3, "white", "triangle", "orange").caption() == "three white triangles on an orange background"


def test_write_url_list(web, tmp_path):
    path = tmp_path / "urls.parquet"
    write_url_list(web, "http://127.0.0.1:8000/", str(path))
    table = pq.read_table(path)
    assert table.column_names == ["url", "caption", "expect"]
    assert table.column("url")[0].as_py() == "http://127.0.0.1:8000" + web.rows[0]["path"]
    assert table.column("expect").to_pylist() == [row["expect"] for row in web.rows]


def test_too_few_images_is_an_error():
    with pytest.raises(ValueError):
        build_synthetic_web(10)


def test_the_demo_refuses_too_few_images_with_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, ["demo", "--images", "24", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "40" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
