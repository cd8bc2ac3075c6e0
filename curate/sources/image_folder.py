"""A local folder of images with optional `.txt` (caption) and `.json` (metadata) sidecars, as `pair` samples.

`photos/cat.jpg` takes its caption from `photos/cat.txt` (UTF-8, line breaks at the end
removed) and its metadata from `photos/cat.json` (a JSON object: the caption under
`json_caption_key` when there is no `.txt`, more named captions, url, license; every other
key into `meta`). The folder is read recursively in a fixed order: within a folder its
files by name, then its subfolders by name; hidden files and folders are skipped. Only one
folder's listing is held at a time.
Symlinked files are read only when they resolve inside the folder, unless `links: follow`;
anything that is not a regular file (a FIFO, a device) is `unreadable`, never opened for reading.

Every image file is one input row, its `source.id` the path relative to the folder. An image
that cannot be read, is above `max_image_bytes` or has no image header, and a sidecar JSON
that does not parse, become rows with a drop reason; so do sidecars whose image is missing
(`orphan_sidecars: drop`, the default).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from curate.sources.stored_images import (
    BAD_INPUT_ROW,
    DEFAULT_MAX_IMAGE_BYTES,
    MISSING_IMAGE,
    UNREADABLE,
    StoredImagesSource,
    StoredRow,
    pair_tables,
    read_image_file,
    text,
)
from curate.stage import Params, RecipeError

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif"]
_SIDECAR_BYTES = 16 * 1024 * 1024


class ImageFolderParams(Params):
    """Where the images are and how their sidecars are read."""

    path: str  # a folder; relative paths resolve against the recipe's directory
    dataset: str | None = None  # recorded in source.dataset and the keys; default: the folder name
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), min_length=1)
    caption_name: str = "alt"  # the name of the caption read from `.txt` (or from `json_caption_key`)
    json_caption_key: str | None = "caption"  # the `.json` key holding the caption when there is no `.txt`
    json_captions: dict[str, str] = {}  # more named captions from `.json` keys, e.g. {long: long_caption}
    url_key: str | None = "url"  # `.json` key recorded as image_meta.url and source.url
    license_key: str | None = "license"  # `.json` key recorded as source.license
    orphan_sidecars: Literal["drop", "ignore"] = "drop"  # `.txt`/`.json` without an image: a drop row, or nothing
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    # inside: a symlinked image or sidecar is read only when it resolves inside the folder (others are `unreadable`);
    # follow: wherever it points (e.g. a Hugging Face cache snapshot, whose files link to ../../blobs)
    links: Literal["inside", "follow"] = "inside"


class ImageFolderSource(StoredImagesSource):
    """Streams an image folder as `pair` samples, one per image file, in a fixed order."""

    name = "image_folder"
    Params = ImageFolderParams
    params: ImageFolderParams

    def preflight(self) -> None:
        """Check the folder exists."""
        if not os.path.isdir(self.path):
            what = "is a file, not a folder" if os.path.exists(self.path) else "not found"
            raise RecipeError(f"image folder {what}: {self.path}", path="source.path")

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` rows, with drop_reason/drop_detail columns."""
        self.preflight()
        yield from pair_tables(self._rows(), self.dataset, batch_rows, self.params.max_image_bytes)

    def describe(self) -> dict[str, Any]:
        """Type, resolved path, dataset name and how sidecars are read."""
        p = self.params
        return {"type": self.name, "path": self.path, "dataset": self.dataset, "extensions": p.extensions,
                "caption_name": p.caption_name, "json_caption_key": p.json_caption_key,
                "json_captions": p.json_captions, "url_key": p.url_key, "license_key": p.license_key,
                "max_image_bytes": p.max_image_bytes}

    # -- reading -------------------------------------------------------------

    def _rows(self) -> Iterator[StoredRow]:
        extensions = {e.lower().lstrip(".") for e in self.params.extensions}
        for folder, names in _walk(self.path):
            for stem, files in _by_stem(names).items():
                images = [name for ext, name in files.items() if ext in extensions]
                sidecars = {ext: os.path.join(folder, files[ext]) for ext in ("txt", "json") if ext in files}
                if not images and sidecars and self.params.orphan_sidecars == "drop":
                    relative = os.path.relpath(os.path.join(folder, stem), self.path)
                    yield StoredRow(Path(relative).as_posix(), reason=MISSING_IMAGE,
                                    detail=f"{', '.join(sorted(files.values()))} without an image")
                for name in images:
                    yield self._row(os.path.join(folder, name), sidecars)

    def _row(self, image_path: str, sidecars: dict[str, str]) -> StoredRow:
        p = self.params
        row = StoredRow(Path(os.path.relpath(image_path, self.path)).as_posix())
        if p.links == "inside":
            outside = [f for f in (image_path, *sidecars.values()) if not _resolves_inside(f, self.path)]
            if outside:
                row.reason, row.detail = UNREADABLE, f"{outside[0]} links outside the folder (source.links: inside)"
                return row
        caption, problem = _read_text(sidecars["txt"]) if "txt" in sidecars else (None, None)
        record, json_problem = _read_json(sidecars["json"]) if "json" in sidecars else ({}, None)
        problem = problem or json_problem
        if problem is not None:
            row.reason, row.detail = problem
            return row
        if caption is None and p.json_caption_key:
            caption = text(record.get(p.json_caption_key))
        if caption is not None:
            row.captions[p.caption_name] = caption
        for name, key in p.json_captions.items():
            row.captions.setdefault(name, text(record.get(key)))
        row.url = text(record.get(p.url_key)) if p.url_key else None
        row.license = text(record.get(p.license_key)) if p.license_key else None
        used = {p.json_caption_key, p.url_key, p.license_key, *p.json_captions.values()}
        row.meta = {k: v for k, v in record.items() if k not in used}
        row.data, row.reason, row.detail = read_image_file(Path(image_path), p.max_image_bytes)
        return row


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for `root` and every folder below it: files first, then subfolders by name."""
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise RecipeError(f"cannot list {folder}: {error.strerror or error}", path="source.path") from error
        visible = [entry for entry in entries if not entry.name.startswith(".")]
        # Symlinked folders are not followed (no cycles); files (symlinked or dangling too) are listed.
        folders = [entry.path for entry in visible if entry.is_dir(follow_symlinks=False)]
        files = [entry.name for entry in visible
                 if not entry.is_dir(follow_symlinks=False) and (entry.is_file() or entry.is_symlink())]
        yield folder, files
        pending.extend(reversed(folders))


def _by_stem(names: list[str]) -> dict[str, dict[str, str]]:
    """Sorted file names grouped by stem (name without its last extension): stem -> {extension: name}."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if dot:
            groups.setdefault(stem, {})[ext.lower()] = name
    return groups


def _resolves_inside(path: str, root: str) -> bool:
    """True when `path`, with every link resolved, is within the folder `root` (resolved too)."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def _read_text(path: str) -> tuple[str | None, tuple[str, str] | None]:
    """A caption file's text without line breaks at its end, or (None, (reason, detail))."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            return None, (UNREADABLE, f"{path} is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(_SIDECAR_BYTES + 1)
    except OSError as error:
        return None, (UNREADABLE, f"cannot read {path}: {error.strerror or error}")
    if len(data) > _SIDECAR_BYTES:
        return None, (BAD_INPUT_ROW, f"{path} is larger than {_SIDECAR_BYTES} bytes")
    return data.decode("utf-8-sig", errors="replace").rstrip("\r\n"), None


def _read_json(path: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """A metadata file's JSON object, or ({}, (reason, detail))."""
    content, problem = _read_text(path)
    if problem is not None:
        return {}, problem
    try:
        record = json.loads(content)
    except ValueError as error:
        return {}, (BAD_INPUT_ROW, f"{path}: not valid JSON: {error}")
    if not isinstance(record, dict):
        return {}, (BAD_INPUT_ROW, f"{path}: not a JSON object but {type(record).__name__}")
    return record, None
