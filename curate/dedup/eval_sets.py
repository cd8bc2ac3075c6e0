"""Evaluation sets to decontaminate against: a folder of images or a Parquet file of images.

A folder gives one item per image file (jpg, jpeg, png, webp, gif, bmp, tif, tiff), named by its
path relative to the folder, with the caption of a `.txt` sidecar of the same stem if there is
one. A Parquet file gives one item per row: its image column holds image bytes or a
`{bytes, path}` struct (as `datasets` writes Image features), an optional id column names it
(else the row number) and an optional caption column gives its text (a string or a list of
strings, e.g. COCO's five captions).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from curate.stage import Params, RecipeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class EvalSetSpec(Params):
    """One evaluation set: where it is and which Parquet columns hold what."""

    name: str
    path: str
    image_column: str = "image"
    id_column: str | None = None
    caption_column: str | None = None


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image (bytes) and its captions."""

    set_name: str
    item_id: str
    data: bytes
    captions: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.set_name}/{self.item_id}"


def resolve(spec: EvalSetSpec, recipe_dir: str) -> Path:
    """The set's path, relative paths taken from the recipe's folder; a clear error if it is missing."""
    path = Path(spec.path).expanduser()
    if not path.is_absolute():
        path = Path(recipe_dir) / path
    if not path.exists():
        raise RecipeError(f"evaluation set {spec.name!r}: {path} does not exist")
    if path.is_file() and path.suffix != ".parquet":
        raise RecipeError(f"evaluation set {spec.name!r}: {path} is neither a folder nor a .parquet file")
    return path


def iter_items(spec: EvalSetSpec, recipe_dir: str) -> Iterator[EvalItem]:
    """The set's items in a fixed order (sorted paths; Parquet row order)."""
    path = resolve(spec, recipe_dir)
    if path.is_dir():
        yield from _folder_items(spec.name, path)
    else:
        yield from _parquet_items(spec, path)


def _folder_items(name: str, folder: Path) -> Iterator[EvalItem]:
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        sidecar = image.with_suffix(".txt")
        captions = (sidecar.read_text(encoding="utf-8", errors="replace").strip(),) if sidecar.exists() else ()
        yield EvalItem(name, image.relative_to(folder).as_posix(), image.read_bytes(), captions)


def _parquet_items(spec: EvalSetSpec, path: Path) -> Iterator[EvalItem]:
    parquet = pq.ParquetFile(path)
    columns = [c for c in (spec.image_column, spec.id_column, spec.caption_column) if c]
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise RecipeError(f"evaluation set {spec.name!r}: {path} has no column(s) {missing}; "
                          f"it has {parquet.schema_arrow.names}")
    row = 0
    for batch in parquet.iter_batches(batch_size=256, columns=columns):
        records = batch.to_pylist()
        for record in records:
            image = record[spec.image_column]
            if isinstance(image, dict):
                image = image.get("bytes") or _read_path(image.get("path"), path.parent)
            item_id = str(record[spec.id_column]) if spec.id_column else str(row)
            row += 1
            if not image:
                continue
            yield EvalItem(spec.name, item_id, bytes(image), _captions(record.get(spec.caption_column or "")))


def _read_path(location: str | None, base: Path) -> bytes | None:
    if not location:
        return None
    path = Path(location) if Path(location).is_absolute() else base / location
    return path.read_bytes() if path.is_file() else None


def _captions(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value if v)


def open_image(data: bytes):
    """Decode an evaluation image to RGB (Pillow), or None when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - a broken evaluation image is reported, not fatal
        return None
