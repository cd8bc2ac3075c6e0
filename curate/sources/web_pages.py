"""Web pages as interleaved documents: WARC/ARC files (`warc`) and saved HTML pages (`html_pages`).

Each page goes through curate.extract: charset (HTTP header, `<meta>`, detection), main content
with its images in page order, image URLs resolved against `<base href>` and the page URL (see
curate/extract/html.py for what is left out and why). A page becomes one `interleaved` sample
whose source.url is the page URL; meta records title, language, encoding, canonical URL, the
skipped images by reason and, for WARC, where the record is (file, offset, record id, date).

`warc`: every `response` and `resource` record (ARC records are converted) is one input row;
warcinfo, request, metadata and revisit records are not pages and not counted. Records are
read with warcio, one at a time, the page body up to `max_page_bytes`. A record warcio cannot
parse, or a corrupt gzip member, becomes one row dropped as `malformed_record`; reading then
resumes at the next gzip member or `WARC/` header after it, so one broken record never loses
the rest of the file. A record whose payload is shorter than its Content-Length (or marked
WARC-Truncated) is `truncated_record` unless `keep_truncated`; a failed digest check is
`digest_mismatch` when `verify_digests` (off by default: recompressed archives, e.g.
ClueWeb-style ones, fail it with intact pages).

`html_pages`: a folder of .html/.htm/.xhtml files (optionally .gz), one page file, a glob, or a
list file (.tsv, .csv, .jsonl, .txt = one path a line) naming page files (`path_column`,
relative to the list's folder) and their URLs (`url_column`). Without a URL the page's
canonical link or og:url stands in, and relative image URLs stay unresolved without either.

Drop reasons of both (stage `source`): `malformed_record`, `truncated_record`,
`digest_mismatch`, `http_status` (not a 2xx answer), `not_html`, `too_large`, `opt_out`
(`<meta name="robots">` or X-Robots-Tag with a directive of `opt_out_directives`),
`empty_document` (no text and no image), `bad_input_row` (a listed file that cannot be read).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
from pydantic import Field

from curate.extract.charset import charset_from_content_type, decode_html
from curate.extract.document import DocumentImage, document_sample
from curate.extract.html import ExtractedPage, ExtractParams, extract_page
from curate.extract.inputs import input_files
from curate.schema import sample_key
from curate.sources.base import LocalPathSource, batched_samples
from curate.stage import Params, RecipeError

MALFORMED_RECORD = "malformed_record"
TRUNCATED_RECORD = "truncated_record"
DIGEST_MISMATCH = "digest_mismatch"
HTTP_STATUS = "http_status"
NOT_HTML = "not_html"
TOO_LARGE = "too_large"
OPT_OUT = "opt_out"
EMPTY_DOCUMENT = "empty_document"
BAD_INPUT_ROW = "bad_input_row"

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")
PAGE_SUFFIXES = (".html", ".htm", ".xhtml", ".html.gz", ".htm.gz", ".xhtml.gz")
LIST_SUFFIXES = (".tsv", ".csv", ".jsonl", ".txt")
PAGE_RECORD_TYPES = ("response", "resource")
HTML_TYPES = ("text/html", "application/xhtml+xml")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_SCAN_CHUNK = 1 << 20


class WebPagesParams(Params):
    """What both page sources share."""

    path: str  # relative paths resolve against the recipe's directory
    dataset: str | None = None  # recorded in source.dataset and used in keys; default: the file/folder name
    extract: ExtractParams = ExtractParams()
    max_page_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # larger pages are dropped (too_large)
    opt_out_directives: list[str] = ["noai", "noimageai"]  # robots meta / X-Robots-Tag values that refuse use


class WarcParams(WebPagesParams):
    """WARC/ARC reading policy."""

    keep_truncated: bool = False  # keep pages whose record is shorter than its Content-Length
    verify_digests: bool = False  # drop records whose WARC block/payload digest does not match


class HtmlPagesParams(WebPagesParams):
    """Columns of a page list (when `path` is a .tsv/.csv/.jsonl list)."""

    path_column: str = "path"  # page file, relative to the list's folder
    url_column: str | None = "url"  # the page's URL; None: the list has none


@dataclass
class _Page:
    """One input row: a page body with where it came from, or why there is none."""

    where: str
    url: str | None
    body: bytes | None = None
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    detail: str | None = None


class _PageSource(LocalPathSource):
    """Turns _Page rows into documents; subclasses say where the pages come from."""

    fallback_dataset = "documents"

    Params = WebPagesParams
    params: WebPagesParams
    needs_fetch = True  # page images are URLs: a recipe must run the fetch stage
    suffixes: tuple[str, ...] = ()
    what = "pages"

    def preflight(self) -> None:
        """Check that there is something to read."""
        input_files(self.path, self.suffixes, self.what)

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "path": self.path, "dataset": self.dataset,
                "files": len(input_files(self.path, self.suffixes, self.what))}

    def _pages(self) -> Iterator[_Page]:
        raise NotImplementedError

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` pages, with drop_reason/drop_detail."""
        self.preflight()
        yield from batched_samples((self._sample(index, page) for index, page in enumerate(self._pages())),
                                   batch_rows)

    def _sample(self, index: int, page: _Page) -> tuple[dict[str, Any], str | None, str | None]:
        key = sample_key(self.dataset, index, page.url or page.where)
        meta = {"input": page.where, **page.info}
        reason, detail, items = page.reason, page.detail, []
        if reason is None:
            reason, detail, items = self._document(page, meta)
        url = page.url or meta.get("canonical_url")
        return document_sample(key, self.dataset, str(index), url, items, meta), reason, detail

    def _document(self, page: _Page, meta: dict[str, Any]) -> tuple[str | None, str | None, list]:
        """(reason, detail, items) for a page body; fills `meta`."""
        body = page.body or b""
        if len(body) > self.params.max_page_bytes:
            return TOO_LARGE, f"page of more than {self.params.max_page_bytes} bytes", []
        mime = (page.content_type or "").split(";", 1)[0].strip().lower()
        if mime and mime not in HTML_TYPES and not _looks_like_html(body):
            return NOT_HTML, f"content type {mime}", []
        decoded = decode_html(body, charset_from_content_type(page.content_type))
        extracted = extract_page(decoded.text, page.url, self.params.extract)
        meta.update(_page_meta(extracted, decoded.encoding, decoded.how))
        refused = self._opt_out(extracted, page.headers)
        if refused:
            return OPT_OUT, f"robots directive {refused!r}", []
        items = [DocumentImage(item.url, info=_image_info(item)) if not isinstance(item, str) else item
                 for item in extracted.items]
        if not items:
            return EMPTY_DOCUMENT, "no text and no image in the main content", []
        return None, None, items

    def _opt_out(self, page: ExtractedPage, headers: dict[str, str]) -> str | None:
        wanted = {d.lower() for d in self.params.opt_out_directives}
        header = [d.strip().lower() for d in headers.get("x-robots-tag", "").split(",")]
        for directive in (*page.robots, *header):
            if directive in wanted:
                return directive
        return None


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def _page_meta(page: ExtractedPage, encoding: str, how: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"encoding": encoding, "encoding_from": how}
    for name in ("title", "lang", "canonical_url"):
        if getattr(page, name):
            meta[name] = getattr(page, name)
    if page.base_url:
        meta["base_url"] = page.base_url
    if page.skipped_images:
        meta["skipped_images"] = dict(sorted(Counter(s.reason for s in page.skipped_images).items()))
    return meta


def _image_info(image) -> dict[str, Any]:
    info = {"alt": image.alt, "title": image.title, "attribute": image.attribute, "width_attribute": image.width,
            "height_attribute": image.height}
    return {k: v for k, v in info.items() if v is not None}


# -- WARC ---------------------------------------------------------------------


class WarcSource(_PageSource):
    """Streams the HTML responses of WARC/ARC files (Common Crawl and others) as documents."""

    name = "warc"
    Params = WarcParams
    params: WarcParams
    suffixes = WARC_SUFFIXES
    what = "WARC files"

    def _pages(self) -> Iterator[_Page]:
        for path in input_files(self.path, self.suffixes, self.what):
            yield from _warc_pages(path, self.params)


def _warc_pages(path: str, params: WarcParams) -> Iterator[_Page]:
    """The page records of one WARC/ARC file, resuming after records that cannot be read."""
    from warcio.archiveiterator import ArchiveIterator, WARCIterator

    name = os.path.basename(path)
    arc = name.lower().endswith((".arc", ".arc.gz"))  # other files are read as WARC only, never guessed as ARC
    with open(path, "rb") as handle:
        gzipped = handle.read(3) == _GZIP_MAGIC
        start = 0
        while start is not None:
            handle.seek(start)
            iterator = ArchiveIterator if arc else WARCIterator
            records = iterator(handle, arc2warc=arc, check_digests=params.verify_digests)
            try:
                for record in records:
                    if record.rec_type not in PAGE_RECORD_TYPES:
                        continue
                    yield _warc_page(record, f"{name}@{records.offset}", params)
                start = None
            except Exception as error:  # noqa: BLE001 - any parser failure is this record's fault
                failed_at = records.offset
                yield _Page(f"{name}@{failed_at}", None, reason=MALFORMED_RECORD,
                            detail=f"{name} offset {failed_at}: {type(error).__name__}: {error}")
                start = _next_record_start(handle, failed_at + 1, gzipped)


def _warc_page(record, where: str, params: WarcParams) -> _Page:
    """A page from one warcio record (body read here, before the iterator moves on)."""
    headers = record.rec_headers
    url = headers.get_header("WARC-Target-URI")
    info = {"warc": {k: v for k, v in {"record": where, "id": headers.get_header("WARC-Record-ID"),
                                         "date": headers.get_header("WARC-Date")}.items() if v}}
    http = record.http_headers
    content_type = http.get_header("Content-Type") if http else headers.get_header("Content-Type")
    page = _Page(where, url, content_type=content_type, info=info)
    if http is not None:
        page.headers = {"x-robots-tag": ", ".join(v for k, v in http.headers if k.lower() == "x-robots-tag")}
        status = http.get_statuscode() or ""
        if not status.startswith("2"):
            page.reason, page.detail = HTTP_STATUS, f"HTTP status {status or 'missing'}"
            return page
    try:
        page.body = record.content_stream().read(params.max_page_bytes + 1)
    except Exception as error:  # noqa: BLE001 - a broken body (bad chunking, bad gzip) is this record's fault
        page.reason, page.detail = MALFORMED_RECORD, f"{where}: body cannot be read: {type(error).__name__}: {error}"
        return page
    if len(page.body) <= params.max_page_bytes:
        missing = getattr(record.raw_stream, "limit", 0) or 0
        marked = headers.get_header("WARC-Truncated")
        if (missing > 0 or marked) and not params.keep_truncated:
            page.reason = TRUNCATED_RECORD
            page.detail = f"{where}: " + (f"WARC-Truncated: {marked}" if marked else
                                          f"record ends {missing} bytes short of its Content-Length")
            return page
        checker = getattr(record, "digest_checker", None)
        if params.verify_digests and checker is not None and checker.problems:
            page.reason, page.detail = DIGEST_MISMATCH, f"{where}: {'; '.join(checker.problems)}"
    return page


def _next_record_start(handle: BinaryIO, offset: int, gzipped: bool) -> int | None:
    """The offset of the next readable record at or after `offset`: a gzip member that starts a
    WARC/ARC record, or a `WARC/` line in an uncompressed file; None when there is none."""
    marker = _GZIP_MAGIC if gzipped else b"WARC/1."
    position = offset
    while True:
        handle.seek(position)
        chunk = handle.read(_SCAN_CHUNK + len(marker))
        if len(chunk) < len(marker):
            return None
        found = chunk.find(marker)
        while found != -1 and found < _SCAN_CHUNK:
            candidate = position + found
            if not gzipped or _starts_record(handle, candidate):
                if not gzipped and candidate > 0:
                    handle.seek(candidate - 1)
                    if handle.read(1) != b"\n":
                        found = chunk.find(marker, found + 1)
                        continue
                return candidate
            found = chunk.find(marker, found + 1)
        position += _SCAN_CHUNK


def _starts_record(handle: BinaryIO, offset: int) -> bool:
    """True when a gzip member at `offset` decompresses to the start of a WARC or ARC record."""
    handle.seek(offset)
    try:
        head = zlib.decompressobj(31).decompress(handle.read(4096), 64)
    except zlib.error:
        return False
    return head.startswith((b"WARC/", b"filedesc://", b"http://", b"https://"))


# -- HTML pages ---------------------------------------------------------------


class HtmlPagesSource(_PageSource):
    """Saved HTML pages (a folder, a file, a glob or a list with page URLs) as documents."""

    name = "html_pages"
    Params = HtmlPagesParams
    params: HtmlPagesParams
    suffixes = PAGE_SUFFIXES
    what = "HTML pages"

    def _is_list(self) -> bool:
        return os.path.isfile(self.path) and self.path.lower().endswith(LIST_SUFFIXES)

    def preflight(self) -> None:
        """Check the pages (or the page list and its columns) exist."""
        if not self._is_list():
            input_files(self.path, self.suffixes, self.what)
            return
        first = next(iter(self._list_rows()), None)
        if first is not None and self.params.path_column not in first:
            raise RecipeError(f"column {self.params.path_column!r} not in page list {self.path}",
                              path="source.path_column")
        if first is not None and self.params.url_column and self.params.url_column not in first:
            raise RecipeError(f"column {self.params.url_column!r} not in page list {self.path}",
                              path="source.url_column")

    def describe(self) -> dict[str, Any]:
        if self._is_list():
            return {"type": self.name, "path": self.path, "dataset": self.dataset, "list": True}
        return super().describe()

    def _pages(self) -> Iterator[_Page]:
        if not self._is_list():
            root = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
            for path in input_files(self.path, self.suffixes, self.what):
                yield _read_page(path, os.path.relpath(path, root), None)
            return
        folder = os.path.dirname(self.path)
        for row in self._list_rows():
            listed = (row.get(self.params.path_column) or "").strip()
            url = (row.get(self.params.url_column) or "").strip() or None if self.params.url_column else None
            if not listed:
                yield _Page(f"{os.path.basename(self.path)}: empty path", url, reason=BAD_INPUT_ROW,
                            detail=f"{self.params.path_column!r} is empty")
                continue
            yield _read_page(os.path.join(folder, os.path.expanduser(listed)), listed, url)

    def _list_rows(self) -> Iterator[dict[str, str]]:
        lower = self.path.lower()
        with open(self.path, encoding="utf-8", newline="") as handle:
            if lower.endswith(".txt"):
                for line in handle:
                    if line.strip():
                        yield {self.params.path_column: line.strip()}
            elif lower.endswith(".jsonl"):
                for line in handle:
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError:
                            record = None
                        yield {k: str(v) for k, v in record.items()} if isinstance(record, dict) else {}
            else:
                yield from csv.DictReader(handle, delimiter="\t" if lower.endswith(".tsv") else ",")


def _read_page(path: str, where: str, url: str | None) -> _Page:
    try:
        with open(path, "rb") as handle:
            body = handle.read()
        if path.lower().endswith(".gz"):
            body = gzip.GzipFile(fileobj=io.BytesIO(body)).read()
    except (OSError, EOFError, zlib.error) as error:
        return _Page(where, url, reason=BAD_INPUT_ROW, detail=f"cannot read {path}: {error}")
    return _Page(where, url, body=body, info={})
