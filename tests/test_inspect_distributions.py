"""`curate inspect`'s annotations section: each metric over every annotated row, kept and dropped apart, with the
recipe's thresholds, in the terminal and in the HTML report (curate/report/distributions.py).

The demo output's scores come from the project's tiny models: only counts and thresholds are checked, never
what a score says about an image.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_outputs import THRESHOLDS, build_output
from rich.console import Console
from test_report import Page, decode_data_uri
from typer.testing import CliRunner

from curate import registry, schema
from curate.cli import app
from curate.engine.pool import annotation_schema
from curate.manifest.inspect import render_annotations
from curate.metrics import Threshold, read_values
from curate.ops.basic_filter import BasicFilter, BasicFilterParams
from curate.ops.edit_checks import EditChecks, EditChecksParams
from curate.ops.language import LanguageFilter, LanguageParams
from curate.report.distributions import bin_edges, read_annotation_distributions
from curate.report.drop_index import key_numbers
from curate.report.html import build_report, write_report
from curate.report.plots import annotation_pngs
from curate.report.reader import open_output
from curate.safety.faces import FacesParams, FacesStage
from curate.stage import Stage

TINY = {"model": "curate-tiny"}
TINY_HEAD = {"head": "tiny"}
# Every stage with metrics, with each of its numeric selection params set (the contract test checks the list
# is complete).
THRESHOLD_PARAMS = {
    "basic_filter": {"min_side": 32, "max_aspect_ratio": 3.0, "min_caption_chars": 2, "max_caption_chars": 200,
                     "min_caption_words": 1, "max_caption_words": 50},
    "language": {"min_confidence": 0.5, "candidates": ["en", "de"]},
    "clip_score": {"model": TINY, "min_score": 0.2, "max_score": 0.9},
    "aesthetic": {"clip": TINY, "head": TINY_HEAD, "min_score": 4.0, "max_score": 8.0},
    "edit_direction": {"model": TINY, "min_score": 0.1},
    "watermark": {"clip": TINY, "head": TINY_HEAD, "max_score": 0.5},
    "nsfw": {"max_score": 0.5},
    "faces": {"max_faces": 2, "max_face_fraction": 0.5},
    "documents": {"max_failed_image_share": 0.5, "min_images": 1, "max_images": 30, "min_text_chars": 10,
                  "min_text_words": 3, "min_images_per_100_words": 0.1, "max_images_per_100_words": 20.0,
                  "max_duplicate_paragraph_share": 0.5, "max_char_repetition_ratio": 0.5,
                  "max_word_repetition_ratio": 0.5},
    "edit_checks": {"min_change": 2.0},
}

DEFAULT_THRESHOLDS = {"language": ["min_confidence"], "edit_checks": ["min_change"]}  # params with a numeric default


def build(name: str, params: dict) -> Stage:
    cls = registry.load(registry.STAGES, name)
    return cls(cls.Params.model_validate(params))


def flat(text: str) -> str:
    """`text` with every run of whitespace (the terminal's line wrapping) made one space."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- what each stage declares


def test_every_stage_with_numeric_annotations_is_listed():
    with_metrics = sorted(name for name, target in registry.STAGES.items()
                          if registry.import_target(target).metrics is not Stage.metrics)
    assert with_metrics == sorted(THRESHOLD_PARAMS)


@pytest.mark.parametrize("name", sorted(THRESHOLD_PARAMS))
def test_each_numeric_selection_param_is_a_threshold_on_a_metric_of_its_stage(name):
    params = THRESHOLD_PARAMS[name]
    stage = build(name, params)
    names = [metric.name for metric in stage.metrics()]
    assert names and len(set(names)) == len(names)
    thresholds = stage.thresholds()
    numeric = {key for key, value in params.items()
               if key in type(stage).selection_params and isinstance(value, (int, float))}
    assert {t.param for t in thresholds} == numeric
    for threshold in thresholds:
        assert threshold.metric in names and threshold.value == float(params[threshold.param])
        assert threshold.bound == threshold.param.split("_")[0]  # min_... / max_...
    unset = build(name, {key: value for key, value in params.items() if key not in numeric}).thresholds()
    assert [t.param for t in unset] == DEFAULT_THRESHOLDS.get(name, [])


def test_language_without_languages_to_keep_has_no_threshold():
    assert build("language", {"languages": [], "candidates": ["en", "de"]}).thresholds() == []
    (default,) = build("language", {"candidates": ["en", "de"]}).thresholds()
    assert default == Threshold("language.confidence", 0.0, "min", "min_confidence")


def test_basic_filter_thresholds_drop_what_select_drops():
    sizes = [[(100, 100)], [(31, 400)], [(32, 200)], [(100, 301)], [(0, 50)], [(None, None)], [(64, 64), (40, 40)]]
    captions = ["a red circle", "two words", "one", "a b c d e f g h i j k l", "x y", "a caption here", "a b"]
    rows = [{"key": schema.sample_key("t", i, None), "kind": "pair",
             "image_meta": [{"original_width": w, "original_height": h} for w, h in size],
             "captions": [{"name": "alt", "text": caption}]} for i, (size, caption) in enumerate(zip(sizes, captions))]
    stage = BasicFilter(BasicFilterParams(min_side=32, max_aspect_ratio=3.0, min_caption_words=2,
                                          max_caption_chars=20))
    annotated = stage.annotate(schema.from_rows(rows))
    reasons = stage.select(annotated).column("drop_reason").to_pylist()
    values = read_values(annotated, stage.metrics())
    outside = np.zeros(len(rows), dtype=bool)
    for threshold in stage.thresholds():
        outside |= threshold.outside(values[threshold.metric])
    assert [reason is not None for reason in reasons] == outside.tolist()
    assert not all(outside) and any(outside)
    assert np.isinf(values["basic.max_aspect_ratio"][4]) and np.isnan(values["basic.min_side"][5])
    assert values["basic.min_side"].tolist()[:3] == [100, 31, 32]


def test_document_thresholds_drop_what_select_drops():
    prose = " ".join(f"word{i}" for i in range(30))
    documents = [([prose], 1, 0), ([prose], 0, 0), (["Short."], 1, 0), ([prose], 1, 3),
                 ([" ".join(f"w{i}" for i in range(10))], 5, 0), (["The same paragraph again."] * 3, 1, 0), ([], 1, 0)]
    rows = []
    for index, (paragraphs, images, removed) in enumerate(documents):
        gone = [{"index": i, "stage": "fetch", "reason": "http_404"} for i in range(removed)]
        rows.append({"key": schema.sample_key("t", index, None), "kind": "interleaved",
                     "images": [{"bytes": None, "path": None}] * images, "image_meta": [{}] * images,
                     "segments": [{"text": text, "image": None} for text in paragraphs] +
                                 [{"text": None, "image": i} for i in range(images)],
                     "meta": json.dumps({"removed_images": gone}) if gone else None})
    stage = build("documents", {"max_failed_image_share": 0.5, "min_images": 1, "min_text_words": 3,
                                "max_images_per_100_words": 20.0, "max_duplicate_paragraph_share": 0.5})
    annotated = stage.annotate(schema.from_rows(rows))
    reasons = stage.select(annotated).column("drop_reason").to_pylist()
    values = read_values(annotated, stage.metrics())
    outside = np.zeros(len(rows), dtype=bool)
    for threshold in stage.thresholds():
        outside |= threshold.outside(values[threshold.metric])
    assert [reason is not None for reason in reasons] == outside.tolist() and not all(outside) and any(outside)
    assert values["documents.failed_image_share"][3] == pytest.approx(0.75)
    assert np.isinf(values["documents.images_per_100_words"][6])


def test_language_confidence_below_the_threshold_is_what_select_calls_uncertain():
    texts = ["The quick brown fox jumps over the lazy dog near the river bank.", "Der schnelle braune Fuchs springt",
             "ok", "Hello", "12345", "A short English caption about a red bicycle"]
    rows = [{"key": schema.sample_key("t", i, None), "kind": "pair", "captions": [{"name": "alt", "text": text}]}
            for i, text in enumerate(texts)]
    stage = LanguageFilter(LanguageParams(languages=["en", "de"], candidates=["en", "de", "fr"], min_confidence=0.6))
    annotated = stage.annotate(schema.from_rows(rows))
    reasons = stage.select(annotated).column("drop_reason").to_pylist()
    (threshold,) = stage.thresholds()
    confidence = read_values(annotated, stage.metrics())["language.confidence"]
    recorded = [json.loads(meta)["language"]["confidence"] for meta in annotated.column("meta").to_pylist()]
    assert confidence.tolist() == pytest.approx(recorded)
    assert [reason == "language_uncertain" for reason in reasons] == threshold.outside(confidence).tolist()
    assert any(reasons) and not all(reasons)


def test_json_paths_take_a_list_item_count_or_the_weakest_turn():
    metas = [json.dumps({"faces": [[[0, 0, 10, 10], [5, 5, 20, 20]], []],
                         "edit": {"turns": [{"change": 3.5}, {"change": 0.25}]}}),
             json.dumps({"faces": []}), "not json", None]
    sizes = [[{"width": 100, "height": 100}, {"width": 50, "height": 50}], [], [], None]
    table = schema.from_rows({"key": str(i), "meta": meta, "image_meta": size}
                             for i, (meta, size) in enumerate(zip(metas, sizes)))
    faces = read_values(table, FacesStage(FacesParams()).metrics())
    change = read_values(table, EditChecks(EditChecksParams()).metrics())["edit.change"]
    assert faces["faces.count"][0] == 2 and np.isnan(faces["faces.count"][1:]).all()
    assert faces["faces.largest_fraction"][0] == pytest.approx(400 / 10_000)
    assert change[0] == pytest.approx(0.25) and np.isnan(change[1:]).all()


def test_meta_that_arrow_cannot_read_is_read_row_by_row_to_the_same_values():
    metas = [json.dumps({"language": {"code": "en", "confidence": 0.75}, "other": [1, {"x": "y"}]}), None, "",
             json.dumps({"language": {"code": None, "confidence": None}}), json.dumps({"basic": {}})]
    (metric,) = LanguageFilter(LanguageParams(candidates=["en", "de"])).metrics()

    def confidence(rows: list[str | None]) -> list[float]:
        table = schema.from_rows({"key": str(i), "meta": meta} for i, meta in enumerate(rows))
        return read_values(table, [metric])[metric.name].tolist()

    clean = confidence(metas)  # one JSON object per row: Arrow's reader
    assert clean[0] == 0.75 and np.isnan(clean[1:]).all()
    for odd in ("not json", json.dumps({"language": {"confidence": "high"}}), '{"language":\n{"confidence": 1}}'):
        mixed = confidence([*metas, odd])  # row by row
        assert mixed[:-1] == pytest.approx(clean, nan_ok=True)
    assert confidence(['{"language":\n{"confidence": 1}}']) == [1.0]


# --------------------------------------------------------------------------- the pieces, on a hand-made pool


def test_keys_become_numbers_in_one_pass_whatever_their_form():
    keys = [schema.sample_key("t", i, None) for i in range(5)] + ["not a hex key", "ABCDEF0123456789"]
    numbers = key_numbers(pa.array(keys))
    assert numbers[:5].tolist() == [int(key, 16) for key in keys[:5]]
    assert len(set(numbers.tolist())) == len(keys)
    sliced = key_numbers(pa.chunked_array([pa.array(keys).slice(2)]))
    assert sliced.tolist() == numbers[2:].tolist()


def test_bins_are_shared_and_reach_the_thresholds():
    values = np.array([0.2, 0.4, 0.9, np.inf], dtype=np.float32)
    edges = bin_edges([values[:2], values[2:]], [0.1, 50.0], bins=10)
    assert len(edges) == 11 and edges[0] == pytest.approx(0.1) and edges[-1] == pytest.approx(0.9)  # 50: too far
    whole = bin_edges([np.array([3, 5], dtype=np.float32), np.array([7], dtype=np.float32)], [2.0])
    assert whole.tolist() == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]  # one bin per integer, the threshold's too


SCORES = [0.1, 0.6, 0.8, None, 0.3, 0.9, 0.75, 0.2, 0.65]
ANNOTATED = [True, True, True, True, False, True, True, True, True]
SIDES = [100, 0, 64, 20, 10, 300, 40, 50, 31]
DROPPED = {0: "clip_score", 3: "clip_score", 4: "basic_filter", 6: "dedup_exact", 7: "clip_score", 8: "aesthetic"}
SHARDS = ((0, 5), (5, 9))


def hand_made_output(root: Path) -> Path:
    """An output folder with only what the annotations section reads: the resolved recipe, a drop log with an
    image row, and two work shards of basic_filter and clip_score tables (one key not hexadecimal)."""
    keys = [schema.sample_key("t", i, None) for i in range(8)] + ["a key of another form"]
    resolved = {"basic_filter": {"min_side": 32}, "clip_score": {"model": TINY, "min_score": 0.5}}
    (root / "manifest.json").parent.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"recipe": {"resolved": {"stages": resolved}},
                                                    "pool": {"kept": True}, "decisions": {}}))
    drops = [{"key": keys[i], "stage": stage, "reason": "r"} for i, stage in DROPPED.items()]
    drops.append({"key": keys[2], "stage": "documents", "reason": "image_too_small", "image": 0})  # not a sample drop
    pq.write_table(pa.Table.from_pylist(drops, schema=schema.DROP_SCHEMA), root / "drops.parquet")
    for number, (start, end) in enumerate(SHARDS):
        rows = range(start, end)
        clip = {"key": [keys[i] for i in rows], "scores": [None if SCORES[i] is None else {"clip_score": SCORES[i]}
                                                          for i in rows],
                "_annotated": [ANNOTATED[i] for i in rows], "_reason": ["corrupt" if i == 3 else None for i in rows]}
        basic = {"key": [keys[i] for i in rows], "_annotated": [True] * len(rows),
                 "meta": [json.dumps({"basic": {"min_side": SIDES[i], "max_aspect_ratio": None if SIDES[i] == 0
                                                else 1.5, "caption_chars": 9, "caption_words": 2}}) for i in rows]}
        for stage, columns, provides in (("clip_score", clip, ("scores",)), ("basic_filter", basic, ("meta",))):
            folder = root / "_pool" / "annotations" / stage
            folder.mkdir(parents=True, exist_ok=True)
            table_schema = annotation_schema(provides)
            full = {name: columns.get(name, [None] * len(rows)) for name in table_schema.names}
            pq.write_table(pa.table(full, schema=table_schema), folder / f"{number:05d}.parquet")
            (folder / f"{number:05d}.done.json").write_text("{}")
    return root


def test_a_hand_made_pool_splits_kept_and_dropped_by_the_drop_log(tmp_path):
    result = read_annotation_distributions(hand_made_output(tmp_path / "out"))
    assert result.pool and result.notes == []
    by_name = {d.metric.name: d for d in result.metrics}
    clip = by_name["clip_score"]
    scored = [i for i, (score, annotated) in enumerate(zip(SCORES, ANNOTATED)) if annotated and score is not None]
    assert clip.annotated == sum(ANNOTATED) and clip.missing == 1  # the corrupt row has no score
    assert sorted(clip.kept.tolist()) == pytest.approx(sorted(SCORES[i] for i in scored if i not in DROPPED))
    assert sorted(clip.dropped.tolist()) == pytest.approx(sorted(SCORES[i] for i in scored if i in DROPPED))
    assert clip.dropped_counts() == dict(Counter(DROPPED[i] for i in scored if i in DROPPED))
    ((threshold, outside),) = clip.cuts()
    assert threshold == Threshold("clip_score", 0.5, "min", "min_score")
    assert outside == sum(SCORES[i] < 0.5 for i in scored)
    histogram = clip.histogram()
    assert histogram.kept.sum() == clip.kept.size
    assert histogram.own.sum() == clip.dropped_counts()["clip_score"]
    assert histogram.own.sum() + histogram.other.sum() == clip.dropped.size
    assert histogram.position(0.5) is not None
    side = by_name["basic.min_side"]
    assert side.annotated == len(SIDES) and side.kept.size == len(SIDES) - len(DROPPED)
    assert side.cuts()[0][1] == sum(value < 32 for value in SIDES)
    ratio = by_name["basic.max_aspect_ratio"]
    assert np.isinf(ratio.dropped).sum() + np.isinf(ratio.kept).sum() == SIDES.count(0)
    assert set(annotation_pngs(result)) == {f"{d.stage}:{d.metric.name}" for d in result.metrics}


def test_the_terminal_block_shows_counts_quantiles_histogram_and_threshold(tmp_path):
    result = read_annotation_distributions(hand_made_output(tmp_path / "out"))
    buffer = io.StringIO()
    render_annotations(result, Console(file=buffer, width=200))
    text = buffer.getvalue()
    clip = next(d for d in result.metrics if d.metric.name == "clip_score")
    by = ", ".join(f"{stage} {count}" for stage, count in clip.dropped_counts().items())
    assert f"{clip.annotated} annotated: {clip.kept.size} kept, {clip.dropped.size} dropped ({by})" in text
    assert f"min_score 0.5: {clip.cuts()[0][1]} of {clip.kept.size + clip.dropped.size}" in text
    kept_line = next(line for line in text.splitlines() if line.startswith("  kept    │"))
    mark_line = next(line for line in text.splitlines() if "▲ min_score 0.5" in line)
    assert mark_line.index("▲") - kept_line.index("│") - 1 == clip.histogram().position(0.5)


def test_released_tables_and_a_missing_pool_are_said(tmp_path):
    root = hand_made_output(tmp_path / "out")
    (root / "_pool" / "annotations" / "clip_score" / "00001.parquet").unlink()  # released; its marker stays
    result = read_annotation_distributions(root)
    assert any("clip_score: 1 of 2 work shards" in note for note in result.notes)
    clip = next(d for d in result.metrics if d.metric.name == "clip_score")
    assert clip.annotated == sum(ANNOTATED[:SHARDS[0][1]])
    shutil.rmtree(root / "_pool")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "pool": {"kept": False}}))
    gone = read_annotation_distributions(root)
    assert not gone.pool and not gone.metrics and "engine.keep_pool: false" in gone.notes[0]


# --------------------------------------------------------------------------- a real output of the demo recipe


@pytest.fixture(scope="module")
def output(local_ray, _loopback_server, tmp_path_factory) -> Path:
    """Output A of report_outputs: the demo recipe (tiny models) over a small synthetic web, pool kept."""
    return build_output("a", _loopback_server, tmp_path_factory)


def sample_drops(output: Path) -> dict[str, str]:
    rows = pq.read_table(output / "drops.parquet", columns=["key", "stage", "image"]).to_pylist()
    return {row["key"]: row["stage"] for row in rows if row["image"] is None}


def test_a_real_output_splits_every_score_as_the_pool_and_the_drop_log_say(output):
    manifest = open_output(output).manifest
    result = read_annotation_distributions(output)
    assert result.pool and result.notes == []
    drops = sample_drops(output)
    stages = {stage["name"]: stage for stage in manifest["stages"]}
    resolved = manifest["recipe"]["resolved"]["stages"]
    shown = {(d.stage, d.metric.name) for d in result.metrics}
    assert {("clip_score", "clip_score"), ("aesthetic", "aesthetic"), ("watermark", "watermark"),
            ("basic_filter", "basic.min_side")} <= shown
    for distribution in result.metrics:
        stage, name = distribution.stage, distribution.metric.name
        assert distribution.annotated == stages[stage]["annotated"]
        # every kept row went through every stage and has every value
        assert distribution.kept.size == manifest["outputs"]["rows"]
        for threshold in distribution.thresholds:
            assert threshold.value == resolved[stage][threshold.param]
            assert not threshold.outside(distribution.kept).any()
        if not name.startswith("basic."):
            check_score_split(output, distribution, drops, stages[stage])
    clip = next(d for d in result.metrics if d.metric.name == "clip_score")
    ((threshold, outside),) = clip.cuts()
    assert threshold.value == THRESHOLDS["a"]
    # behind the basic_filter gate, clip_score is the first criterion its rows meet: it cuts what it dropped
    low = stages["clip_score"]["dropped"].get("clip_score_low", 0)
    assert low > 0 and outside == low


def check_score_split(output: Path, distribution, drops: dict[str, str], stage: dict) -> None:
    """The split of a score against the stage's annotation table read here, row by row."""
    name = distribution.metric.name
    files = sorted((output / "_pool" / "annotations" / distribution.stage).glob("[0-9]*.parquet"))
    rows = pq.read_table(files, columns=["key", "_annotated", "scores"]).to_pylist()
    scored = [(row["key"], row["scores"][name]) for row in rows
              if row["_annotated"] and row["scores"] and row["scores"][name] is not None]
    assert sorted(distribution.kept.tolist()) == sorted(v for k, v in scored if k not in drops)
    assert sorted(distribution.dropped.tolist()) == sorted(v for k, v in scored if k in drops)
    assert distribution.dropped_counts() == dict(Counter(drops[k] for k, _ in scored if k in drops))
    own = sum(count for reason, count in stage["dropped"].items() if reason != "corrupt")
    assert distribution.dropped_counts().get(distribution.stage, 0) == own


def test_inspect_prints_each_metric_with_its_counts_and_thresholds(output):
    result = read_annotation_distributions(output)
    printed = CliRunner().invoke(app, ["inspect", str(output)])
    assert printed.exit_code == 0, printed.output
    text = flat(printed.output)
    assert "Annotations: kept and dropped" in text and text.index("Funnel") < text.index("Annotations")
    for distribution in result.metrics:
        assert (f"{distribution.annotated:,} annotated: {distribution.kept.size:,} kept, "
                f"{distribution.dropped.size:,} dropped") in text, distribution.metric.name
        for threshold, outside in distribution.cuts():
            assert f"{threshold.param} {threshold.value:g}: {outside:,} of" in text


def test_the_html_report_draws_each_metric_kept_and_dropped(output, tmp_path):
    result = read_annotation_distributions(output)
    page = Page(write_report(output, tmp_path / "report.html", kept=4, per_reason=1).read_text(encoding="utf-8"))
    section = flat(page.text("annotations"))
    charts = {image["data-chart"]: image for image in page.images if image["section"] == "annotations"}
    assert set(charts) == {f"{d.stage}:{d.metric.name}" for d in result.metrics}
    for image in charts.values():
        assert decode_data_uri(image["src"])[0] == "image/png"
    for distribution in result.metrics:
        assert f"{distribution.annotated:,} annotated rows" in section
        for stage, count in distribution.dropped_counts().items():
            assert f"dropped by {stage} {count:,}" in section
        for threshold, outside in distribution.cuts():
            assert f"{threshold.param} {threshold.bound} {threshold.value:.4g} {outside:,}" in section


def test_without_the_pool_inspect_and_the_report_say_so(output, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("_work", "_pool"))
    printed = CliRunner().invoke(app, ["inspect", str(copy)])
    assert printed.exit_code == 0, printed.output
    assert "no pool in this output" in flat(printed.output)
    page = Page(build_report(open_output(copy), kept=4, per_reason=1))
    assert "no pool in this output" in page.text("annotations") and "kept samples only" in page.text("annotations")
    assert not [image for image in page.images if image["section"] == "annotations"]
