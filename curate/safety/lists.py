"""Reading user lists (blocklists, takedown lists) and normalising their entries.

A list is a file: `.txt` (or any other suffix) holds one entry per line, blank lines
and lines starting with ``#`` skipped; `.csv` and `.parquet` hold the entries in a
column (`column`, default the first). Entries are numbered from 1 in file order
(skipped lines not counted), so a match can name its list and entry without
repeating the entry.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from curate.stage import Params, RecipeError

SHA256_DIGITS = 64
PHASH_BITS = 64


class ListFile(Params):
    """A list file and, for CSV and Parquet, the column holding the entries."""

    path: str
    column: str | None = None  # default: the first column


def as_list_file(item: str | ListFile) -> ListFile:
    return ListFile(path=item) if isinstance(item, str) else item


def list_path(item: ListFile, recipe_dir: str) -> Path:
    """Where a list file is: its path as given, relative ones from the recipe's folder."""
    path = Path(item.path).expanduser()
    return path if path.is_absolute() else Path(recipe_dir) / path


def read_entries(item: ListFile, recipe_dir: str, where: str) -> list[str]:
    """The entries of a list file as stripped strings (empty cells and nulls skipped)."""
    path = list_path(item, recipe_dir)
    if not path.is_file():
        raise RecipeError(f"list file {path} does not exist", path=where)
    try:
        if path.suffix.lower() in (".csv", ".parquet"):
            table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pa_csv.read_csv(path)
            column = item.column or table.column_names[0]
            if column not in table.column_names:
                raise RecipeError(f"list file {path} has no column {column!r} (columns: {table.column_names})",
                                  path=where)
            values = table.column(column).to_pylist()
            return [str(v).strip() for v in values if v is not None and str(v).strip()]
        lines = path.read_text(encoding="utf-8").splitlines()
    except RecipeError:
        raise
    except Exception as error:  # unreadable file of any kind: the same recipe problem
        raise RecipeError(f"cannot read list file {path}: {error}", path=where) from error
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def normalise_url(url: str) -> str:
    """Scheme and host lower-cased, default port and fragment removed; path and query kept as they are."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".")
        port = parts.port
    except ValueError:
        return url.strip()
    if not parts.scheme or not host:
        return url.strip()
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def url_host(url: str | None) -> str | None:
    """The lower-case host name of `url` (no trailing dot), or None."""
    if not url:
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


def normalise_domain(entry: str) -> str:
    """A domain list entry: a host name, `*.host`, `.host` or a URL, lower-cased without trailing dot."""
    entry = entry.strip().lower()
    if "://" in entry:
        entry = url_host(entry) or ""
    entry = entry.removeprefix("*.").lstrip(".").rstrip(".")
    if not entry:
        raise ValueError("empty domain")
    return entry


def host_suffixes(host: str) -> list[str]:
    """The host and every parent domain of it (an IP address only itself): a.b.c -> a.b.c, b.c, c."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        labels = host.split(".")
        return [".".join(labels[i:]) for i in range(len(labels))]


def normalise_sha256(entry: str) -> str:
    """A sha256 list entry as 64 lower-case hex digits (an optional `sha256:` prefix is dropped)."""
    value = entry.strip().lower().removeprefix("sha256:")
    if len(value) != SHA256_DIGITS or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("not a sha256 (64 hex digits)")
    return value


def parse_phash(entry: str) -> int:
    """A perceptual hash list entry as an unsigned 64-bit int.

    Accepted: 16 hex digits (optionally 0x-prefixed), or a decimal integer, signed (as in
    `image_meta.phash`) or unsigned.
    """
    text = entry.strip().lower()
    if text.startswith("0x") or (len(text) == 16 and all(c in "0123456789abcdef" for c in text)):
        value = int(text.removeprefix("0x"), 16)
    else:
        value = int(text)
    if not -(1 << 63) <= value < (1 << 64):
        raise ValueError("not a 64-bit perceptual hash")
    return value & ((1 << 64) - 1)


def as_unsigned(phash: int) -> np.uint64:
    """image_meta.phash (signed int64) as the unsigned 64-bit pattern lists use."""
    return np.uint64(phash & ((1 << 64) - 1))
