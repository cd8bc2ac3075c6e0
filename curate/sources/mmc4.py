"""MMC4 documents (JSON Lines, one document per line) as interleaved samples.

A document is {"url", "text_list": [sentences], "image_info": [{"image_name", "raw_url",
"matched_text_index", "matched_sim", "face_detections"}], "similarity_matrix": [images x
sentences]} (+ `could_have_url_duplicate` in some shards). Each sentence becomes a text segment
in order; each image is placed right after the sentence MMC4 matched it to (images matched to
the same sentence keep their image_info order; an image whose matched index is missing or out
of range goes to the end, marked `unplaced`). Everything except `url` and `text_list` is kept
in `meta`, verbatim (`image_info` with every image's raw_url, `similarity_matrix`).

Input: a .jsonl file, .jsonl.gz, a .zip shard as MMC4 distributes them (every .jsonl/.json
member in order), a folder of those, or a glob. Files are streamed line by line. A zip without
its central directory (a cut-off download) is read from its local headers; a file that ends
mid-stream yields its complete lines and then one row dropped as `truncated_input`.
"""

from __future__ import annotations

import gzip
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

from curate.extract.document import DocumentImage, document_sample
from curate.extract.inputs import input_files
from curate.schema import sample_key
from curate.sources.base import LocalPathSource, batched_samples
from curate.stage import Params

BAD_INPUT_ROW = "bad_input_row"
TRUNCATED_INPUT = "truncated_input"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".zip")
_CHUNK = 1 << 20
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


class Mmc4Params(Params):
    """Where the MMC4 shards are."""

    path: str  # file, folder or glob; relative paths resolve against the recipe's directory
    dataset: str | None = None  # recorded in source.dataset and used in keys; default: the file/folder name


@dataclass
class _Line:
    """One input line (or the end of a file that stopped mid-stream)."""

    where: str
    record: dict[str, Any] | None
    error: str | None = None
    truncated: bool = False


def _lines_of(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Complete lines from a stream of byte chunks (a final line without newline included)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def _file_chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(_CHUNK):
        yield chunk


def _zip_local_members(handle: BinaryIO) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Members of a zip read from their local headers (for zips whose central directory is missing).

    Each member's data must be read through before asking for the next one.
    """
    while True:
        signature = handle.read(4)
        if signature == b"PK\x07\x08":  # the data descriptor after a member: crc, sizes
            handle.read(12)
            continue
        if signature != b"PK\x03\x04":
            return  # the central directory, the end of the file, or something else: no more members
        header = signature + handle.read(_LOCAL_HEADER.size - 4)
        if len(header) < _LOCAL_HEADER.size:
            raise EOFError("the file ends inside a member header")
        _, _, flags, method, _, _, _, compressed, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        name = handle.read(name_length).decode("utf-8", "replace")
        handle.read(extra_length)
        if method == 8:
            yield name, _inflate(handle)
        elif method == 0 and not flags & 0x08:
            yield name, iter([handle.read(compressed)])
        else:
            raise zipfile.BadZipFile(f"member {name}: compression method {method} without sizes is not supported")


def _inflate(handle: BinaryIO) -> Iterator[bytes]:
    """Raw-deflate data from `handle` up to the end of the stream; EOFError when the file ends first."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflater.eof:
        chunk = handle.read(_CHUNK)
        if not chunk:
            raise EOFError("the file ends inside a compressed member")
        yield inflater.decompress(chunk)
    handle.seek(-len(inflater.unused_data), 1)  # give back the start of what follows


class Mmc4Source(LocalPathSource):
    """Streams MMC4 documents as `interleaved` samples, one per line, in file order."""

    fallback_dataset = "documents"

    name = "mmc4"
    Params = Mmc4Params
    params: Mmc4Params
    needs_fetch = True  # images are URLs: a recipe must run the fetch stage

    def preflight(self) -> None:
        """Check that there are MMC4 files to read."""
        input_files(self.path, SUFFIXES, "MMC4 shards")

    def describe(self) -> dict[str, Any]:
        files = input_files(self.path, SUFFIXES, "MMC4 shards")
        return {"type": self.name, "path": self.path, "dataset": self.dataset, "files": len(files)}

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` documents, with drop_reason/drop_detail."""
        yield from batched_samples((self._sample(index, line) for index, line in enumerate(self._lines())),
                                   batch_rows)

    # -- reading ---------------------------------------------------------------

    def _lines(self) -> Iterator[_Line]:
        for path in input_files(self.path, SUFFIXES, "MMC4 shards"):
            count = 0
            try:
                for where, raw in self._raw_lines(path):
                    count += 1
                    if raw.strip():
                        yield self._parse(where, raw)
            except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as error:
                yield _Line(path, None, f"{path}: ends mid-stream after {count} lines ({error})", truncated=True)

    def _raw_lines(self, path: str) -> Iterator[tuple[str, bytes]]:
        lower = path.lower()
        if lower.endswith(".zip"):
            yield from self._zip_lines(path)
        elif lower.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                for number, line in enumerate(_lines_of(_file_chunks(handle)), start=1):
                    yield f"{path}:{number}", line
        else:
            with open(path, "rb") as handle:
                for number, line in enumerate(_lines_of(_file_chunks(handle)), start=1):
                    yield f"{path}:{number}", line

    def _zip_lines(self, path: str) -> Iterator[tuple[str, bytes]]:
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            archive = None
        if archive is not None:
            with archive:
                for info in archive.infolist():
                    if info.filename.lower().endswith((".jsonl", ".json")):
                        with archive.open(info) as handle:
                            for number, line in enumerate(_lines_of(_file_chunks(handle)), start=1):
                                yield f"{path}!{info.filename}:{number}", line
            return
        with open(path, "rb") as handle:
            for name, chunks in _zip_local_members(handle):
                lines = _lines_of(chunks)
                if not name.lower().endswith((".jsonl", ".json")):
                    for _ in lines:  # read through to reach the next member
                        pass
                    continue
                for number, line in enumerate(lines, start=1):
                    yield f"{path}!{name}:{number}", line

    @staticmethod
    def _parse(where: str, raw: bytes) -> _Line:
        try:
            record = json.loads(raw)
        except ValueError as error:
            return _Line(where, None, f"{where}: not valid JSON ({error})")
        if not isinstance(record, dict):
            return _Line(where, None, f"{where}: not a JSON object but {type(record).__name__}")
        if not isinstance(record.get("text_list"), list) or not isinstance(record.get("image_info"), list):
            return _Line(where, None, f"{where}: no text_list / image_info lists")
        return _Line(where, record)

    # -- building samples ------------------------------------------------------

    def _sample(self, index: int, line: _Line) -> tuple[dict[str, Any], str | None, str | None]:
        record = line.record or {}
        url = record.get("url") if isinstance(record.get("url"), str) else None
        key = sample_key(self.dataset, index, url)
        if line.record is None:
            empty = document_sample(key, self.dataset, str(index), url, [], {"input": line.where})
            return empty, TRUNCATED_INPUT if line.truncated else BAD_INPUT_ROW, line.error
        items = self._items(record)
        meta = {k: v for k, v in record.items() if k not in ("url", "text_list")}
        return document_sample(key, self.dataset, str(index), url, items, meta), None, None

    @staticmethod
    def _items(record: dict[str, Any]) -> list[str | DocumentImage]:
        """Sentences in order, each followed by the images MMC4 matched to it."""
        sentences = [s if isinstance(s, str) else "" for s in record["text_list"]]
        after: dict[int, list[DocumentImage]] = {}
        unplaced = []
        for info in record["image_info"]:
            info = info if isinstance(info, dict) else {}
            raw_url = info.get("raw_url") if isinstance(info.get("raw_url"), str) else None
            position = info.get("matched_text_index")
            if isinstance(position, int) and 0 <= position < len(sentences):
                after.setdefault(position, []).append(DocumentImage(raw_url))
            else:
                unplaced.append(DocumentImage(raw_url, info={"unplaced": True}))
        items: list[str | DocumentImage] = []
        for position, sentence in enumerate(sentences):
            items.append(sentence)
            items.extend(after.get(position, []))
        return items + unplaced
