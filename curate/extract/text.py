"""Sentences of a text, for matching images to sentences."""

from __future__ import annotations

import re

# A sentence ends at . ! ? or an ellipsis (optionally followed by closing quotes or brackets) before
# whitespace and an opening quote, a capital, a digit or a CJK character, or right after a CJK full stop, ! or ?.
_STARTS = r"A-Z0-9\u00c0-\u00de\u0400-\u042f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"  # capitals, digits, CJK
_BOUNDARY = re.compile(
    r"([.!?\u2026][\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[" + _STARTS + r"])"
    r"|([\u3002\uff01\uff1f])"
)


def split_sentences(text: str, min_chars: int = 2) -> list[str]:
    """The sentences of `text`: lines first, then sentence ends; pieces shorter than `min_chars` are dropped."""
    marked = _BOUNDARY.sub(lambda m: (m.group(1) or m.group(2)) + "\n", text)
    pieces = (piece.strip() for piece in marked.split("\n"))
    return [piece for piece in pieces if len(piece) >= min_chars]
