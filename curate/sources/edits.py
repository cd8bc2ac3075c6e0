"""Image-edit datasets (InstructPix2Pix, MagicBrush, UltraEdit, OmniEdit, ...) as `edit` samples.

The recipe maps the dataset's columns to roles (source image, instruction, target
image, optional mask, captions, chain and turn); `layout` fills the usual column
names of a known dataset. How a chain of turns sits in the unified schema is
described in curate/edit_sample.py. Rows of one chain (same value in the chain
column, e.g. MagicBrush's img_id) must be contiguous; they become one sample,
ordered by the turn column. Images are read as they are (never re-encoded).

A row (or chain) that cannot become a sample is yielded with a drop reason:
bad_input_row, edit_missing_image, edit_missing_instruction, corrupt,
decompression_bomb or edit_chain_broken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa

from curate.edit_sample import EDIT_KIND, META_KEY, ChainTurn, dump_meta, lay_out_chain
from curate.schema import from_rows, sample_key
from curate.sources.base import Source
from curate.sources.edit_images import CellImage, ImageCellError, read_cell
from curate.sources.edit_inputs import FORMATS, EditInput, InputRecord, detect_format
from curate.stage import Params, RecipeError, with_drops

BAD_INPUT_ROW = "bad_input_row"
EDIT_MISSING_IMAGE = "edit_missing_image"
EDIT_MISSING_INSTRUCTION = "edit_missing_instruction"
EDIT_CHAIN_BROKEN = "edit_chain_broken"

READ_ROWS = 64  # input rows read at a time: image datasets hold megabytes per row

ROLES = ("source_image", "instruction", "target_image", "mask", "source_caption", "target_caption", "chain", "turn",
         "id", "license")
REQUIRED_ROLES = ("source_image", "instruction", "target_image")

# Column names of known datasets. A layout's optional roles are used only when the input has the column.
LAYOUTS: dict[str, dict[str, str]] = {
    "instructpix2pix": {"source_image": "original_image", "instruction": "edit_prompt",
                        "target_image": "edited_image", "source_caption": "original_prompt",
                        "target_caption": "edited_prompt", "id": "id"},
    "magicbrush": {"source_image": "source_img", "instruction": "instruction", "target_image": "target_img",
                   "mask": "mask_img", "chain": "img_id", "turn": "turn_index"},
    "ultraedit": {"source_image": "source_image", "instruction": "edit_prompt", "target_image": "edited_image",
                  "mask": "mask_image", "source_caption": "source_caption", "target_caption": "target_caption",
                  "id": "idx"},
    "omniedit": {"source_image": "src_img", "instruction": "edited_prompt_list", "target_image": "edited_img",
                 "id": "omni_edit_id"},
}


class EditColumns(Params):
    """Which column plays which role; a role set to null is not used (even if the layout names it)."""

    source_image: str | None = None  # HF Image struct {bytes, path}, bytes, a path or an http(s) URL
    instruction: str | None = None  # a string, or a list of alternative instructions (the first is the main one)
    target_image: str | None = None
    mask: str | None = None  # optional edit mask per turn
    source_caption: str | None = None  # caption of the first image
    target_caption: str | None = None  # caption of the final image
    chain: str | None = None  # rows with the same value form one multi-turn sample
    turn: str | None = None  # order of the turns within a chain
    id: str | None = None  # recorded in source.id (default: the chain value or the row number)
    license: str | None = None


class EditTripletParams(Params):
    """Where the edit dataset is, in which format and layout, and which columns mean what."""

    path: str  # a file or folder; relative paths resolve against the recipe's directory
    format: Literal["auto", "parquet", "hf_disk", "jsonl", "ip2p_folders"] = "auto"
    layout: Literal["custom", "instructpix2pix", "magicbrush", "ultraedit", "omniedit"] = "custom"
    columns: EditColumns = EditColumns()
    split: str | None = None  # for a DatasetDict saved with save_to_disk
    extra_columns: list[str] | Literal["all"] = "all"  # other columns carried into `meta` (binary values skipped)
    dataset: str | None = None  # recorded in source.dataset and the keys; default: the file or folder name


class _Drop(Exception):
    """Why a row or chain cannot become a sample: a drop reason and its detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Group:
    """Input rows that become one sample: one row, or the rows of one chain."""

    records: list[InputRecord]
    chain: str | None = None
    error: tuple[str, str] | None = None  # (reason, detail) found while grouping


class EditTripletSource(Source):
    """Streams an edit dataset as `edit` samples: one per row, or one per chain of turns."""

    name = "edit_triplets"
    Params = EditTripletParams
    params: EditTripletParams

    @property
    def path(self) -> Path:
        """The dataset's absolute path (`params.path` resolved against the recipe directory)."""
        return Path(os.path.abspath(os.path.join(self.recipe_dir, os.path.expanduser(self.params.path))))

    @property
    def format(self) -> str:
        """`params.format`, or the one detected from the path."""
        if self.params.format != "auto":
            return self.params.format
        fmt = detect_format(self.path)
        if fmt is None:
            raise RecipeError(
                f"cannot tell the format of {self.path}; set source.format to one of {', '.join(FORMATS)}",
                path="source.format",
            )
        return fmt

    @property
    def dataset(self) -> str:
        """The dataset name recorded in `source.dataset` and used as the key's source id."""
        if self.params.dataset:
            return self.params.dataset
        name = self.path.name
        return name.rsplit(".", 1)[0] if self.path.is_file() and "." in name else name

    def _input(self) -> EditInput:
        if not self.path.exists():
            raise RecipeError(f"edit dataset not found: {self.path}", path="source.path")
        return EditInput(self.path, self.format, self.params.split)

    def columns(self, names: list[str]) -> dict[str, str | None]:
        """The column of every role, given the input's column names. Raises RecipeError for a missing one."""
        preset = LAYOUTS.get(self.params.layout, {})
        chosen: dict[str, str | None] = {
            role: column if role in REQUIRED_ROLES or column in names else None
            for role in ROLES
            for column in [preset.get(role)]
        }
        explicit = self.params.columns
        for role in explicit.model_fields_set:
            chosen[role] = getattr(explicit, role)
        for role in ROLES:
            column = chosen[role]
            if column is None and role in REQUIRED_ROLES:
                raise RecipeError(f"no column for the {role.replace('_', ' ')}; set source.columns.{role} "
                                  "or a source.layout", path=f"source.columns.{role}")
            if column is not None and column not in names:
                raise RecipeError(f"column {column!r} not in {self.path}; available columns: {', '.join(names)}",
                                  path=f"source.columns.{role}")
        if chosen["turn"] is not None and chosen["chain"] is None:
            raise RecipeError("a turn column needs a chain column", path="source.columns.chain")
        return chosen

    def preflight(self) -> None:
        """Check the dataset exists, its format is known and it has the configured columns."""
        names = self._input().column_names()
        columns = self.columns(names)
        if isinstance(self.params.extra_columns, list):
            for column in self.params.extra_columns:
                if column not in names:
                    raise RecipeError(f"column {column!r} not in {self.path}", path="source.extra_columns")
                if column == META_KEY:
                    raise RecipeError(f"{META_KEY!r} is the meta key of the edit turns; it cannot be an extra column",
                                      path="source.extra_columns")
        self._columns = columns

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Yield SAMPLE_SCHEMA tables of at most `batch_rows` samples, with drop_reason/drop_detail columns."""
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        edit_input = self._input()
        names = edit_input.column_names()
        self._columns = self.columns(names)
        self._base_dir = edit_input.base_dir
        chunk: list[tuple[dict[str, Any], str | None, str | None]] = []
        records = edit_input.records(self._read_columns(names), min(batch_rows, READ_ROWS))
        for group in self._groups(records):
            chunk.append(self._sample(group))
            if len(chunk) == batch_rows:
                yield self._table(chunk)
                chunk = []
        if chunk:
            yield self._table(chunk)

    def describe(self) -> dict[str, Any]:
        """Type, path, format, dataset name, layout and the column of every role."""
        described: dict[str, Any] = {"type": self.name, "path": str(self.path), "dataset": self.dataset,
                                     "layout": self.params.layout, "split": self.params.split}
        try:
            edit_input = self._input()
            described["format"] = edit_input.format
            described["columns"] = self.columns(edit_input.column_names())
        except RecipeError as error:
            described["error"] = str(error)
        described["extra_columns"] = self.params.extra_columns
        return described

    # -- grouping rows into samples ----------------------------------------------

    def _read_columns(self, names: list[str]) -> list[str] | None:
        if self.params.extra_columns == "all":
            return None
        wanted = [c for c in self._columns.values() if c is not None] + list(self.params.extra_columns)
        return [name for name in names if name in set(wanted)]

    def _groups(self, records: Iterator[InputRecord]) -> Iterator[_Group]:
        """Single rows, or runs of rows with the same chain value (a value seen before is a broken chain)."""
        chain_column = self._columns["chain"]
        if chain_column is None:
            for record in records:
                yield _Group([record])
            return
        finished: set[str] = set()
        current: _Group | None = None
        for record in records:
            value = None if record.values is None else record.values.get(chain_column)
            chain = None if value is None else str(value)
            if current is not None and chain is not None and chain == current.chain:
                current.records.append(record)
                continue
            if current is not None:
                yield current
                finished.add(current.chain)
            if chain is None:
                current = None
                yield _Group([record], None, None if record.values is None else
                             (EDIT_CHAIN_BROKEN, f"row {record.index}: the chain column {chain_column!r} is null"))
            elif chain in finished:
                current = _Group([record], chain, (EDIT_CHAIN_BROKEN, f"rows of chain {chain!r} are not contiguous "
                                                   "(sort the input by chain and turn)"))
            else:
                current = _Group([record], chain)
        if current is not None:
            yield current

    # -- building one sample -----------------------------------------------------

    def _sample(self, group: _Group) -> tuple[dict[str, Any], str | None, str | None]:
        """The sample of a group, plus its drop reason and detail (None when kept)."""
        first = group.records[0]
        identity = group.chain or self._row_id(first) or str(first.index)
        sample: dict[str, Any] = {
            "key": sample_key(self.dataset, first.index, identity),
            "kind": EDIT_KIND,
            "images": [],
            "image_meta": [],
            "segments": [],
            "captions": [],
            "scores": None,
            "roles": [],
            "source": {"dataset": self.dataset, "id": identity, "url": None,
                       "license": _text(self._value(first, "license"))},
            "meta": None,
        }
        broken = next((r for r in group.records if r.values is None), None)
        if broken is not None:
            return sample, BAD_INPUT_ROW, broken.error
        if group.error is not None:
            return sample, *group.error
        try:
            records = self._ordered(group)
            self._fill(sample, records)
        except _Drop as drop:
            return sample, drop.reason, drop.detail
        return sample, None, None

    def _ordered(self, group: _Group) -> list[InputRecord]:
        turn_column = self._columns["turn"]
        if turn_column is None:
            return group.records
        turns = [record.values.get(turn_column) for record in group.records]
        if any(turn is None for turn in turns):
            raise _Drop(EDIT_CHAIN_BROKEN, f"chain {group.chain!r}: a turn is null")
        if len(set(turns)) != len(turns):
            raise _Drop(EDIT_CHAIN_BROKEN, f"chain {group.chain!r}: repeated turns {turns}")
        try:
            return [record for _, record in sorted(zip(turns, group.records), key=lambda pair: pair[0])]
        except TypeError as error:
            raise _Drop(EDIT_CHAIN_BROKEN, f"chain {group.chain!r}: turns {turns} cannot be ordered") from error

    def _fill(self, sample: dict[str, Any], records: list[InputRecord]) -> None:
        """Read every turn's images and instructions into `sample` (raises _Drop)."""
        chain: list[ChainTurn] = []
        target_digests: list[str] = []
        for number, record in enumerate(records, start=1):
            where = f"turn {number}: " if len(records) > 1 else ""
            source = self._image(record, "source_image", where)
            target = self._image(record, "target_image", where)
            mask_cell = self._value(record, "mask")
            mask = None if mask_cell is None else self._image(record, "mask", where)
            instructions = _instructions(self._value(record, "instruction"))
            if not instructions:
                column = self._columns["instruction"]
                raise _Drop(EDIT_MISSING_INSTRUCTION, f"{where}no instruction in {column!r}")
            chain.append(ChainTurn(source, source.digest, target, instructions, mask))
            target_digests.append(target.digest)
        layout = lay_out_chain(chain, target_digests)
        images: list[CellImage] = layout.images
        sample["images"] = [image.as_image() for image in images]
        sample["image_meta"] = [image.meta for image in images]
        sample["segments"] = layout.segments
        sample["source"]["url"] = images[0].meta.get("url")
        captions = [("source", self._value(records[0], "source_caption")),
                    ("target", self._value(records[-1], "target_caption"))]
        sample["captions"] = [{"name": name, "text": text} for name, text in captions if _text(text)]
        if self._columns["turn"] is not None:
            for turn, record in zip(layout.turns, records):
                turn.extra["turn"] = record.values.get(self._columns["turn"])
        meta = self._extras(records[0])
        for turn, record in zip(layout.turns[1:], records[1:]):
            changed = {k: v for k, v in self._extras(record).items() if meta.get(k) != v}
            if changed:
                turn.extra["columns"] = changed
        meta[META_KEY] = {"turns": [turn.to_json() for turn in layout.turns]}
        sample["meta"] = dump_meta(meta)

    def _image(self, record: InputRecord, role: str, where: str) -> CellImage:
        column = self._columns[role]
        try:
            return read_cell(record.values.get(column), self._base_dir, EDIT_MISSING_IMAGE)
        except ImageCellError as error:
            raise _Drop(error.reason, f"{where}{role.replace('_', ' ')} ({column!r}): {error.detail}") from None

    def _value(self, record: InputRecord, role: str) -> Any:
        column = self._columns[role]
        return None if column is None or record.values is None else record.values.get(column)

    def _row_id(self, record: InputRecord) -> str | None:
        value = self._value(record, "id")
        return None if value is None else str(value)

    def _extras(self, record: InputRecord) -> dict[str, Any]:
        """The row's other columns, JSON-ready; binary values (other images) are left out."""
        if self.params.extra_columns == "all":
            used = {c for c in self._columns.values() if c is not None}
            names = [name for name in record.values if name not in used and name != META_KEY]
        else:
            names = list(self.params.extra_columns)
        return {name: record.values.get(name) for name in names if not _is_binary(record.values.get(name))}

    def _table(self, chunk: list[tuple[dict[str, Any], str | None, str | None]]) -> pa.Table:
        samples, reasons, details = zip(*chunk)
        return with_drops(from_rows(samples), list(reasons), list(details))


def _instructions(value: Any) -> list[str]:
    """A string or a list of strings as the non-empty, stripped instructions."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [text.strip() for text in (_text(v) for v in values) if text and text.strip()]


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _is_binary(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview)) or (isinstance(value, dict) and "bytes" in value)
