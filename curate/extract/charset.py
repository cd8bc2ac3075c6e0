"""Decode the bytes of an HTML page to text: byte-order mark, declared charset, then detection.

Order (as browsers do, with a check that the declaration fits the bytes): a BOM wins; then the
charset of the HTTP Content-Type header, then a `<meta charset>` / `<meta http-equiv>` in the
first bytes; a declared charset is used when the bytes decode with it (up to a few broken
bytes); otherwise UTF-8 if the bytes are valid UTF-8, else charset-normalizer's best guess.
Legacy labels are mapped to the superset decoders the WHATWG Encoding standard prescribes
(gb2312 -> gb18030, iso-8859-1 -> windows-1252, shift_jis -> cp932, ...).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

PRESCAN_BYTES = 8192
MAX_BROKEN_SHARE = 0.005  # a declared charset may leave this share of characters undecodable

_META_CHARSET = re.compile(rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# WHATWG Encoding standard: labels whose bytes are decoded with a superset encoding.
_SUPERSETS = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "gb_2312-80": "gb18030", "cn-gb": "gb18030",
    "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "iso8859-1": "cp1252", "l1": "cp1252",
    "us-ascii": "cp1252", "ascii": "cp1252", "iso-8859-9": "cp1254", "latin5": "cp1254",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "windows-31j": "cp932",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949", "tis-620": "cp874", "iso-8859-11": "cp874",
    "big5": "big5hkscs", "utf8": "utf-8", "unicode": "utf-16-le",
}


@dataclass(frozen=True)
class Decoded:
    """Page text and how it was decoded (`how`: bom, http, meta, utf-8, detected, fallback)."""

    text: str
    encoding: str
    how: str


def codec_for(label: str | None) -> str | None:
    """The Python codec for a charset label, or None when unknown."""
    if not label:
        return None
    label = label.strip().strip("'\"").lower()
    label = _SUPERSETS.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def charset_from_content_type(content_type: str | None) -> str | None:
    """The `charset=` parameter of a Content-Type header value, if any."""
    if not content_type:
        return None
    match = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", content_type, re.IGNORECASE)
    return match.group(1) if match else None


def declared_in_meta(body: bytes) -> str | None:
    """The charset a `<meta>` tag declares in the first PRESCAN_BYTES bytes, if any."""
    match = _META_CHARSET.search(body[:PRESCAN_BYTES])
    return match.group(1).decode("ascii", "replace") if match else None


def _decode_if_fits(body: bytes, codec: str) -> str | None:
    """`body` decoded with `codec` when at most MAX_BROKEN_SHARE of it is undecodable, else None."""
    try:
        return body.decode(codec)
    except UnicodeDecodeError:
        pass
    except LookupError:
        return None
    text = body.decode(codec, errors="replace")
    broken = text.count("\ufffd")
    return text if broken <= max(1, len(text) * MAX_BROKEN_SHARE) else None


def decode_html(body: bytes, http_charset: str | None = None) -> Decoded:
    """Decode an HTML page; never raises (undecodable bytes become U+FFFD as a last resort)."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return Decoded(body[len(bom):].decode(codec, errors="replace"), codec, "bom")
    for how, label in (("http", http_charset), ("meta", declared_in_meta(body))):
        codec = codec_for(label)
        if codec is not None:
            text = _decode_if_fits(body, codec)
            if text is not None:
                return Decoded(text, codec, how)
    try:
        return Decoded(body.decode("utf-8"), "utf-8", "utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(body[: 1 << 20]).best()
    if best is not None:
        codec = codec_for(best.encoding) or "utf-8"
        return Decoded(body.decode(codec, errors="replace"), codec, "detected")
    return Decoded(body.decode("utf-8", errors="replace"), "utf-8", "fallback")
