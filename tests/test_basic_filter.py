"""BasicFilter: each rule, its boundary (a value equal to the limit is kept), and the drop details."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.ops.basic_filter import BasicFilter, BasicFilterParams, image_extremes
from curate.schema import from_rows, sample_key


def pair(caption: str | None = "a red circle on a blue background", sizes=((100, 100),), index: int = 0) -> dict:
    return {
        "key": sample_key("t", index, None),
        "kind": "pair",
        "image_meta": [{"original_width": w, "original_height": h} for w, h in sizes],
        "captions": [] if caption is None else [{"name": "alt", "text": caption}],
    }


def run(rows: list[dict], **params) -> list[tuple[str | None, str | None]]:
    batch = from_rows({**row, "key": sample_key("t", i, None)} for i, row in enumerate(rows))
    out = BasicFilter(BasicFilterParams(**params)).process(batch)
    assert out.num_rows == batch.num_rows
    return list(zip(out.column("drop_reason").to_pylist(), out.column("drop_detail").to_pylist()))


def test_min_side_applies_to_every_image_and_keeps_the_limit():
    rows = [pair(sizes=[(64, 200)]), pair(sizes=[(63, 200)]), pair(sizes=[(300, 300), (200, 32)]), pair(sizes=[])]
    assert run(rows, min_side=64) == [
        (None, None),
        ("too_small", "min side 63 < 64"),
        ("too_small", "min side 32 < 64"),
        (None, None),
    ]


def test_unknown_sizes_are_not_checked():
    rows = [pair(sizes=[(None, None)]), pair(sizes=[(None, None), (10, 10)])]
    assert [r for r, _ in run(rows, min_side=64, max_aspect_ratio=2.0)] == [None, "too_small"]


def test_aspect_ratio_either_orientation_and_limit_kept():
    rows = [
        pair(sizes=[(500, 100)]),
        pair(sizes=[(100, 501)]),
        pair(sizes=[(501, 100)]),
        pair(sizes=[(100, 100), (100, 600)]),
    ]
    assert run(rows, max_aspect_ratio=5.0) == [
        (None, None),
        ("aspect_ratio", "aspect ratio 5.01 > 5"),
        ("aspect_ratio", "aspect ratio 5.01 > 5"),
        ("aspect_ratio", "aspect ratio 6.00 > 5"),
    ]


def test_too_small_wins_over_aspect_ratio_and_caption():
    assert run([pair(caption="", sizes=[(10, 100)])], min_side=32, max_aspect_ratio=2.0) == [
        ("too_small", "min side 10 < 32")
    ]


@pytest.mark.parametrize("caption", [None, "", "   \n"])
def test_empty_captions(caption):
    assert run([pair(caption=caption)]) == [("empty_caption", "caption is empty")]
    assert run([pair(caption=caption)], drop_empty_captions=False, min_caption_chars=5) == [(None, None)]


def test_caption_chars_limits_are_inclusive_and_ignore_surrounding_space():
    rows = [pair(" abcd "), pair("abcde"), pair("abcdefghij"), pair("abcdefghijk")]
    assert run(rows, min_caption_chars=5, max_caption_chars=10) == [
        ("caption_too_short", "caption 4 chars < 5"),
        (None, None),
        (None, None),
        ("caption_too_long", "caption 11 chars > 10"),
    ]


def test_caption_words_limits_are_inclusive():
    rows = [pair("one two"), pair("one two three"), pair("a b c d e"), pair("a b c d e f")]
    assert run(rows, min_caption_words=3, max_caption_words=5) == [
        ("caption_too_short", "caption 2 words < 3"),
        (None, None),
        (None, None),
        ("caption_too_long", "caption 6 words > 5"),
    ]


def test_pair_caption_prefers_alt():
    row = pair()
    row["captions"] = [{"name": "synthetic", "text": "a long synthetic caption here"}, {"name": "alt", "text": "x"}]
    assert run([row], min_caption_chars=2) == [("caption_too_short", "caption 1 chars < 2")]


def test_other_kinds_use_all_text_segments():
    document = {
        "kind": "interleaved",
        "segments": [{"text": "first part"}, {"image": 0}, {"text": "second part"}],
        "image_meta": [{"original_width": 200, "original_height": 200}],
    }
    assert run([document], min_caption_words=4) == [(None, None)]
    assert run([document], max_caption_words=3) == [("caption_too_long", "caption 4 words > 3")]
    no_text = {"kind": "interleaved", "segments": [{"image": 0}]}
    assert run([no_text]) == [("empty_caption", "caption is empty")]


def test_earlier_drop_reason_is_kept():
    batch = (
        from_rows([pair(caption="")])
        .append_column("drop_reason", pa.array(["http_404"]))
        .append_column("drop_detail", pa.array(["not found"]))
    )
    out = BasicFilter(BasicFilterParams()).process(batch)
    assert out.column("drop_reason").to_pylist() == ["http_404"]


def test_image_extremes_over_chunks():
    batch = pa.concat_tables(
        [from_rows([pair(sizes=[(40, 80)])]), from_rows([pair(sizes=[(90, 30), (50, 50)], index=1)])]
    )
    smallest, largest = image_extremes(batch.column("image_meta"))
    assert smallest.tolist() == [40.0, 30.0]
    assert largest.tolist() == [2.0, 3.0]


def test_params_reject_inconsistent_limits():
    with pytest.raises(ValidationError):
        BasicFilterParams(min_caption_words=5, max_caption_words=4)
    with pytest.raises(ValidationError):
        BasicFilterParams(max_aspect_ratio=0.5)
    with pytest.raises(ValidationError):
        BasicFilterParams(min_sides=3)
