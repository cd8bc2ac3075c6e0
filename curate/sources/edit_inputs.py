"""Read the rows of an edit dataset as records (column -> value), streamed, in a fixed order.

Formats:

  parquet       one .parquet file, or a folder of them (sorted by path, subfolders included),
                e.g. a Hugging Face dataset as downloaded from the Hub
  hf_disk       a folder written by `datasets` `save_to_disk` (Arrow stream files listed in
                state.json); a DatasetDict folder (dataset_dict.json) needs `split`
  jsonl         JSON Lines; image cells are paths (relative to the file's folder) or URLs
  ip2p_folders  InstructPix2Pix's on-disk layout: <prompt_dir>/prompt.json ({"edit", and
                optionally "input" / "output" captions}) with <seed>_0.<ext> (source) and
                <seed>_1.<ext> (edited); the seeds listed in seeds.json at the root when it
                exists, else every <seed>_0 found. Records have the columns of IP2P_COLUMNS.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.stage import RecipeError

FORMATS = ("parquet", "hf_disk", "jsonl", "ip2p_folders")
IP2P_COLUMNS = ("id", "prompt_dir", "seed", "original_image", "edited_image", "edit_prompt", "original_prompt",
                "edited_prompt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SEED_SOURCE = re.compile(r"^(?P<seed>[^_/]+)_0(?P<ext>\.[A-Za-z]+)$")
_JSONL_HEADER_LINES = 100


@dataclass
class InputRecord:
    """One input row: its position, its values (None when unreadable) and why it could not be read."""

    index: int
    values: dict[str, Any] | None
    error: str | None = None


def detect_format(path: Path) -> str | None:
    """The format of `path` from what it is: a file's extension, or a folder's marker files."""
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        if name.endswith((".jsonl", ".ndjson", ".json")):
            return "jsonl"
        return None
    if not path.is_dir():
        return None
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf_disk"
    if (path / "seeds.json").is_file() or next(path.rglob("prompt.json"), None) is not None:
        return "ip2p_folders"
    if next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    return None


class EditInput:
    """An edit dataset on disk in one of FORMATS."""

    def __init__(self, path: Path, fmt: str, split: str | None = None):
        self.path = path
        self.format = fmt
        self.split = split

    @property
    def base_dir(self) -> Path:
        """The folder that relative image paths in the records are resolved against."""
        return self.path if self.path.is_dir() else self.path.parent

    # -- layout ----------------------------------------------------------------

    def files(self) -> list[Path]:
        """The data files, in reading order; raises RecipeError when there are none."""
        if self.format == "parquet":
            found = [self.path] if self.path.is_file() else sorted(self.path.rglob("*.parquet"))
        elif self.format == "hf_disk":
            found = self._arrow_files()
        else:
            found = [self.path]
        if not found:
            raise RecipeError(f"no {self.format} data files in {self.path}", path="source.path")
        return found

    def _arrow_files(self) -> list[Path]:
        folder = self._split_folder()
        try:
            state = json.loads((folder / "state.json").read_text())
            names = [entry["filename"] for entry in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"{folder / 'state.json'} does not list data files: {error}",
                              path="source.path") from error
        return [folder / name for name in names]

    def _split_folder(self) -> Path:
        splits_file = self.path / "dataset_dict.json"
        if not splits_file.is_file():
            if self.split is not None:
                raise RecipeError(f"{self.path} holds a single dataset, not splits; remove source.split",
                                  path="source.split")
            return self.path
        try:
            splits = json.loads(splits_file.read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"cannot read the splits of {splits_file}: {error}", path="source.path") from error
        split = self.split if self.split is not None else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise RecipeError(f"choose one of the splits {', '.join(splits)} with source.split", path="source.split")
        return self.path / split

    def column_names(self) -> list[str]:
        """The columns of the records, read from the first data file's header."""
        if self.format == "ip2p_folders":
            return list(IP2P_COLUMNS)
        first = self.files()[0]
        try:
            if self.format == "parquet":
                return pq.read_schema(first).names
            if self.format == "hf_disk":
                with pa.memory_map(str(first)) as source:
                    return pa.ipc.open_stream(source).schema.names
            return self._first_json_keys(first)
        except (pa.ArrowInvalid, OSError) as error:
            raise RecipeError(f"cannot read {first} as {self.format}: {error}", path="source.path") from error

    def _first_json_keys(self, file: Path) -> list[str]:
        with open(file, "rb") as lines:
            for number, line in enumerate(lines):
                if number >= _JSONL_HEADER_LINES:
                    break
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return list(value)
        raise RecipeError(f"no JSON object in the first lines of {file}", path="source.path")

    # -- reading ---------------------------------------------------------------

    def records(self, columns: list[str] | None, batch_rows: int) -> Iterator[InputRecord]:
        """Every row in order, reading `batch_rows` rows at a time (`columns`: None = all)."""
        if self.format == "jsonl":
            yield from self._json_records()
        elif self.format == "ip2p_folders":
            yield from self._ip2p_records()
        else:
            index = 0
            for batch in self._arrow_batches(columns, batch_rows):
                for values in batch.to_pylist():
                    yield InputRecord(index, values)
                    index += 1

    def _arrow_batches(self, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        for file in self.files():
            if self.format == "parquet":
                with pq.ParquetFile(file) as parquet:
                    yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)
                continue
            with pa.memory_map(str(file)) as source:
                for batch in pa.ipc.open_stream(source):
                    if columns is not None:
                        batch = batch.select(columns)
                    for start in range(0, batch.num_rows, batch_rows):
                        yield batch.slice(start, batch_rows)

    def _json_records(self) -> Iterator[InputRecord]:
        index = 0
        with open(self.path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    values = json.loads(line)
                    error = None if isinstance(values, dict) else f"not a JSON object but {type(values).__name__}"
                except ValueError as exc:
                    values, error = None, str(exc)
                yield InputRecord(index, values if error is None else None,
                                  None if error is None else f"line {number}: {error}")
                index += 1

    def _ip2p_records(self) -> Iterator[InputRecord]:
        index = 0
        for prompt_dir, seeds in self._ip2p_listing():
            folder = self.path / prompt_dir
            prompt, error = _read_prompt(folder / "prompt.json")
            for seed in seeds:
                if error is not None:
                    yield InputRecord(index, None, f"{prompt_dir}: {error}")
                else:
                    yield InputRecord(index, {
                        "id": f"{prompt_dir}/{seed}",
                        "prompt_dir": prompt_dir,
                        "seed": seed,
                        "original_image": _seed_image(folder, seed, 0),
                        "edited_image": _seed_image(folder, seed, 1),
                        "edit_prompt": prompt.get("edit"),
                        "original_prompt": prompt.get("input"),
                        "edited_prompt": prompt.get("output"),
                    })
                index += 1

    def _ip2p_listing(self) -> Iterator[tuple[str, list[str]]]:
        """(prompt_dir, seeds) pairs: from seeds.json when present, else found on disk, sorted."""
        listing = self.path / "seeds.json"
        if listing.is_file():
            try:
                entries = json.loads(listing.read_text())
                pairs = [(str(name), [str(seed) for seed in seeds]) for name, seeds in entries]
            except (ValueError, TypeError) as error:
                raise RecipeError(f"{listing} is not a list of [prompt_dir, [seeds]]: {error}",
                                  path="source.path") from error
            yield from pairs
            return
        for prompt_file in sorted(self.path.rglob("prompt.json")):
            folder = prompt_file.parent
            seeds = sorted(match["seed"] for name in os.listdir(folder) if (match := _SEED_SOURCE.match(name))
                           and match["ext"].lower() in IMAGE_SUFFIXES)
            yield folder.relative_to(self.path).as_posix(), seeds


def _read_prompt(file: Path) -> tuple[dict[str, Any], str | None]:
    try:
        prompt = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return {}, f"unreadable prompt.json: {error}"
    if not isinstance(prompt, dict):
        return {}, "prompt.json is not a JSON object"
    return prompt, None


def _seed_image(folder: Path, seed: str, which: int) -> str | None:
    """The path of `<seed>_<which>.<ext>` in `folder`, None when there is no such image."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{seed}_{which}{suffix}", folder / f"{seed}_{which}{suffix.upper()}"):
            if candidate.is_file():
                return str(candidate)
    return None
