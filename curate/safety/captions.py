"""Caption screening: whole-word matching of sample texts against term lists.

The bundled list (nsfw_words.txt) holds sexually explicit terms; recipes add terms
inline or from files. A match names the list and the term's entry number, never the
caption or the term itself, so drop logs do not repeat the text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

BUNDLED_WORDS = Path(__file__).parent / "nsfw_words.txt"
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, compatibility-normalised, every run of non-word characters a single space, padded."""
    return f" {_NON_WORD.sub(' ', unicodedata.normalize('NFKC', text).casefold()).strip()} "


@dataclass(frozen=True)
class TermSource:
    """Where a term came from: the list's name and the term's 1-based entry number in it."""

    list_name: str
    entry: int


class CaptionScreen:
    """Finds the first listed term in a text (whole words, case-insensitive)."""

    def __init__(self, lists: list[tuple[str, list[str]]]):
        self.sources: dict[str, TermSource] = {}
        for list_name, terms in lists:
            for entry, term in enumerate(terms, 1):
                key = normalise(term).strip()
                if key and key not in self.sources:
                    self.sources[key] = TermSource(list_name, entry)
        terms_by_length = sorted(self.sources, key=len, reverse=True)
        self.pattern = re.compile(" (" + "|".join(map(re.escape, terms_by_length)) + ") ") if terms_by_length else None

    def __len__(self) -> int:
        return len(self.sources)

    def match(self, texts: list[str]) -> TermSource | None:
        """The source of the first listed term found in any of `texts`, else None."""
        if self.pattern is None:
            return None
        for text in texts:
            found = self.pattern.search(normalise(text))
            if found:
                return self.sources[found.group(1)]
        return None


def read_terms(path: str | Path) -> list[str]:
    """Terms of a word-list file: one per line, blank lines and lines starting with # skipped.

    Comment and blank lines do not count as entries.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
