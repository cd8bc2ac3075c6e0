"""Image URLs in HTML: resolving against the page, `srcset` candidates, lazy-loading attributes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

# Attributes lazy-loading scripts read the real image URL from, most specific first.
LAZY_SRC_ATTRIBUTES = (
    "data-src", "data-lazy-src", "data-original", "data-lazy", "data-url", "data-hi-res-src",
    "data-full-src", "data-orig-file", "data-large-file", "data-echo", "data-img-src",
)
LAZY_SRCSET_ATTRIBUTES = ("data-srcset", "data-lazy-srcset", "data-original-set")

_INNER_WHITESPACE = re.compile(r"[\t\n\r\f]+")


@dataclass(frozen=True)
class SrcsetCandidate:
    """One `srcset` entry: URL and its width (`800w`) or pixel density (`2x`) descriptor."""

    url: str
    width: int | None = None
    density: float | None = None


def is_data_uri(value: str | None) -> bool:
    """True for an inline `data:` URI (a placeholder, never a fetchable image)."""
    return bool(value) and value.strip()[:5].lower() == "data:"


def resolve(base: str | None, value: str | None) -> str | None:
    """`value` made absolute against `base`; None unless the result is an http(s) URL with a host."""
    if not value:
        return None
    value = _INNER_WHITESPACE.sub("", value.strip())
    if not value or is_data_uri(value) or value.startswith("#"):
        return None
    try:
        url = urljoin(base, value) if base else value
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return url


def parse_srcset(value: str | None) -> list[SrcsetCandidate]:
    """Candidates of a `srcset` attribute, following the HTML parsing rules.

    A URL runs up to whitespace (commas inside URLs are kept; trailing commas end it), then
    descriptors run up to the next comma outside parentheses.
    """
    if not value:
        return []
    candidates, position, length = [], 0, len(value)
    while position < length:
        while position < length and (value[position].isspace() or value[position] == ","):
            position += 1
        start = position
        while position < length and not value[position].isspace():
            position += 1
        url = value[start:position]
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            depth, start = 0, position
            while position < length and (value[position] != "," or depth):
                depth += {"(": 1, ")": -1}.get(value[position], 0)
                position += 1
            descriptors = value[start:position]
        if url:
            candidates.append(_candidate(url, descriptors.split()))
    return candidates


def _candidate(url: str, descriptors: list[str]) -> SrcsetCandidate:
    width = density = None
    for descriptor in descriptors:
        number, unit = descriptor[:-1], descriptor[-1:].lower()
        try:
            if unit == "w":
                width = int(float(number))
            elif unit == "x":
                density = float(number)
        except ValueError:
            continue
    return SrcsetCandidate(url, width, density)


def largest_candidate(candidates: list[SrcsetCandidate]) -> SrcsetCandidate | None:
    """The candidate with the largest width descriptor, else the largest density, else the first."""
    usable = [c for c in candidates if not is_data_uri(c.url)]
    if not usable:
        return None
    if any(c.width for c in usable):
        return max(usable, key=lambda c: c.width or 0)
    return max(usable, key=lambda c: c.density or 1.0)
