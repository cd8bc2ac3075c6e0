"""LanguageFilter on real alt text and hand-written captions: keeps, drops, meta annotation, setup, registry."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

import curate.ops.language as language
from curate.engine.apply import apply_stages
from curate.ops.language import LanguageFilter, LanguageParams
from curate.registry import STAGES, load
from curate.schema import from_rows, sample_key

URL_LIST = Path(__file__).parent / "data" / "url-caption-list" / "img2dataset_test_rows_894_999.parquet"

# Pandas index values of the captions in URL_LIST that are not plainly English, labelled by
# reading them: other languages (it 937, nl 941, fr 983, sv 996), mixed text (912, 915, 967,
# 976, 994, 1016) and strings that are mostly names or codes (928, 935, 947, 972, 977, 995, 1017).
NOT_ENGLISH = {912, 915, 928, 935, 937, 941, 947, 967, 972, 976, 977, 983, 994, 995, 996, 1016, 1017}
DUTCH = 941

SIX = ["en", "de", "fr", "es", "zh", "ja"]

FOREIGN = {
    "de": "Ein kleiner Hund spielt im Garten mit einem roten Ball.",
    "fr": "Une femme lit un livre sur un banc dans le parc.",
    "es": "Un niño come helado en la playa durante el verano.",
    "ja": "公園のベンチで本を読んでいる女性",
}


def url_list_captions() -> dict[int, str]:
    table = pq.read_table(URL_LIST)
    return dict(zip(table.column("__index_level_0__").to_pylist(), table.column("TEXT").to_pylist()))


def english_captions() -> list[str]:
    return [text for index, text in url_list_captions().items() if index not in NOT_ENGLISH]


def pair(text: str | None, meta: str | None = None) -> dict:
    return {"kind": "pair", "captions": [] if text is None else [{"name": "alt", "text": text}], "meta": meta}


def batch_of(rows: list[dict]):
    return from_rows({**row, "key": sample_key("t", i, None)} for i, row in enumerate(rows))


def run(stage: LanguageFilter, rows: list[dict]) -> list[tuple[str | None, str | None, dict]]:
    """(drop reason, detail, meta object) per row."""
    out = stage.process(batch_of(rows))
    assert out.num_rows == len(rows)
    return list(
        zip(
            out.column("drop_reason").to_pylist(),
            out.column("drop_detail").to_pylist(),
            [json.loads(m) for m in out.column("meta").to_pylist()],
        )
    )


def stage(**params) -> LanguageFilter:
    built = LanguageFilter(LanguageParams(**params))
    built.setup()
    return built


@pytest.fixture(scope="module")
def all_languages() -> LanguageFilter:
    """Defaults: keep en, all 75 candidates (loading their models takes some seconds, once)."""
    return stage()


def test_full_sentence_english_captions_are_kept_with_defaults(all_languages):
    captions = url_list_captions()
    sentences = [captions[i] for i in (922, 944, 952, 956, 968, 969, 984, 1000, 1002)]
    results = run(all_languages, [pair(text) for text in sentences])
    assert [reason for reason, _, _ in results] == [None] * len(sentences)
    assert all(meta["language"]["code"] == "en" and meta["language"]["confidence"] >= 0.5 for _, _, meta in results)


def test_english_alt_text_is_mostly_kept_with_defaults(all_languages):
    """Defaults follow DataComp's rule (the top language decides): most short English alt text is kept."""
    captions = english_captions()
    results = run(all_languages, [pair(text) for text in captions])
    reasons = [reason for reason, _, _ in results]
    assert reasons.count(None) >= 0.9 * len(captions)
    assert "language_uncertain" not in reasons


def test_a_confidence_floor_turns_mislabels_into_uncertain_not_into_other_languages():
    """Short English alt text is often uncertain with 75 candidates, but not confidently mislabelled."""
    results = run(stage(min_confidence=0.5), [pair(text) for text in english_captions()])
    reasons = [reason for reason, _, _ in results]
    assert "language" not in reasons
    assert reasons.count(None) >= 25


def test_english_alt_text_is_kept_with_six_candidates():
    captions = english_captions()
    results = run(stage(candidates=SIX, min_confidence=0.5), [pair(text) for text in captions])
    reasons = [reason for reason, _, _ in results]
    assert reasons.count(None) >= 0.9 * len(captions)
    assert set(reasons) <= {None, "language_uncertain"}


def test_other_languages_are_dropped_with_the_detected_code(all_languages):
    texts = [*FOREIGN.values(), url_list_captions()[DUTCH]]
    results = run(all_languages, [pair(text) for text in texts])
    for (reason, detail, meta), code in zip(results, [*FOREIGN, "nl"]):
        assert reason == "language"
        assert detail.startswith(f"detected {code} (") and detail.endswith("), keep en")
        assert meta["language"]["code"] == code


def test_keeping_several_languages(all_languages):
    keep_de_fr = stage(languages=["de", "FR"])
    results = run(keep_de_fr, [pair(FOREIGN["de"]), pair(FOREIGN["fr"]), pair(FOREIGN["es"])])
    assert [reason for reason, _, _ in results] == [None, None, "language"]
    assert results[2][1].endswith("keep de, fr")


def test_empty_language_list_annotates_only(all_languages):
    annotate = stage(languages=[], min_confidence=1.0)
    texts = [*FOREIGN.values(), "ok", "12345"]
    results = run(annotate, [pair(text) for text in texts])
    assert [reason for reason, _, _ in results] == [None] * len(texts)
    assert [meta["language"]["code"] for _, _, meta in results] == [*FOREIGN, "zu", None]


def test_short_or_ambiguous_text_is_uncertain_with_a_high_min_confidence():
    strict = stage(candidates=SIX, min_confidence=0.9)
    results = run(strict, [pair("ok"), pair("BMW M6 Gran Coupe"), pair("Grocer and Customer"), pair(FOREIGN["ja"])])
    for reason, detail, meta in results[:3]:
        assert reason == "language_uncertain"
        assert detail == f"top {meta['language']['code']} {meta['language']['confidence']:g} < 0.9"
        assert meta["language"]["confidence"] < 0.9
    assert results[3][0] == "language"


def test_text_without_letters_is_uncertain_whatever_the_threshold():
    lenient = stage(candidates=SIX, min_confidence=0.0)
    [(reason, detail, meta)] = run(lenient, [pair("12345 ★★★")])
    assert (reason, detail) == ("language_uncertain", "no language identified")
    assert meta["language"] == {"code": None, "confidence": 0.0}


def test_empty_and_short_texts_are_not_judged():
    judge_from_12 = stage(candidates=SIX, min_chars=12)
    results = run(judge_from_12, [pair(None), pair("   "), pair("  Hund  Ball "), pair(FOREIGN["de"])])
    assert [reason for reason, _, _ in results] == [None, None, None, "language"]
    assert [meta["language"] for _, _, meta in results[:3]] == [{"code": None, "confidence": None}] * 3


def test_other_kinds_use_their_text_segments():
    german = [{"image": 0}, {"text": "Ein kleiner Hund spielt"}, {"text": "im Garten."}]
    english = [{"image": 0}, {"text": "Make the sky a deep orange sunset colour"}, {"image": 1}]
    rows = [{"kind": "interleaved", "segments": german}, {"kind": "edit", "segments": english}]
    results = run(stage(candidates=SIX), rows)
    assert [meta["language"]["code"] for _, _, meta in results] == ["de", "en"]
    assert [reason for reason, _, _ in results] == ["language", None]


def test_meta_is_merged_as_compact_sorted_json():
    rows = [
        pair(FOREIGN["fr"], meta='{"width": "640", "alt_source": "img", "language": "old"}'),
        pair(FOREIGN["fr"], meta="not json"),
        pair(FOREIGN["fr"], meta="[1, 2]"),
        pair(FOREIGN["fr"], meta=None),
    ]
    out = stage(candidates=SIX, languages=[]).process(batch_of(rows))
    metas = out.column("meta").to_pylist()
    confidence = json.loads(metas[3])["language"]["confidence"]
    detected = f'"language":{{"code":"fr","confidence":{confidence}}}'
    assert metas == [
        f'{{"alt_source":"img",{detected},"width":"640"}}',
        f'{{{detected},"original":"not json"}}',
        f'{{{detected},"original":"[1, 2]"}}',
        f"{{{detected}}}",
    ]


def test_detector_is_built_once_per_stage(monkeypatch):
    calls = []
    real = language.build_detector

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(language, "build_detector", counting)
    prepared = stage(candidates=SIX)
    for _ in range(3):
        prepared.process(batch_of([pair(FOREIGN["es"]), pair("a dog on a beach")]))
    assert calls == [(SIX, False)]

    lazy = LanguageFilter(LanguageParams(candidates=["en", "de"], low_accuracy_mode=True))
    lazy.process(batch_of([pair("a dog")]))
    lazy.process(batch_of([pair("ein Hund")]))
    assert calls[1:] == [(["en", "de"], True)]


def test_through_the_engine_drops_go_to_the_drop_log():
    rows = [pair("A dog runs across the beach at sunset."), pair(FOREIGN["de"])]
    kept, drops = apply_stages([stage(candidates=SIX)], batch_of(rows), {})
    assert kept.num_rows == 1
    assert json.loads(kept.column("meta")[0].as_py())["language"]["code"] == "en"
    [log] = drops
    assert log.column("stage").to_pylist() == ["language"]
    assert log.column("reason").to_pylist() == ["language"]


def test_registry_and_params():
    cls = load(STAGES, "language")
    assert cls is LanguageFilter
    assert (cls.name, cls.phase) == ("language", "prepare")
    params = cls.Params(languages=[" EN", "en"], candidates=["de", "EN"])
    assert (params.languages, params.candidates) == (["en"], ["de", "en"])
    small = LanguageFilter(LanguageParams(candidates=SIX)).resources.memory_bytes
    assert 0 < small < LanguageFilter(LanguageParams()).resources.memory_bytes


@pytest.mark.parametrize(
    "params, message",
    [
        ({"languages": ["xx"]}, "unknown language codes ['xx']"),
        ({"candidates": ["en"]}, "at least two languages"),
        ({"languages": ["en", "nl"], "candidates": SIX}, "languages ['nl'] are not among candidates"),
        ({"min_confidence": 1.5}, "less than or equal to 1"),
        ({"threshold": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_rejected(params, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LanguageParams(**params)
