"""Open a finished output folder: its manifest, its shard files, and row groups or tar samples to read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.files import RunLayout
from curate.sinks.webdataset import read_samples, row_from_members


class OutputUnreadable(ValueError):
    """The folder is not a readable curate output (no manifest, or a manifest that is not JSON)."""


@dataclass
class Output:
    """A finished output folder and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root)

    def shard_files(self, fmt: str) -> list[Path]:
        """The files of format `fmt` listed in the manifest that exist, in shard order."""
        entries = [entry for entry in self.manifest.get("outputs", {}).get("shards", []) if entry["format"] == fmt]
        return [self.root / entry["path"] for entry in entries if (self.root / entry["path"]).is_file()]

    @property
    def formats(self) -> list[str]:
        return list(self.manifest.get("outputs", {}).get("formats", []))

    def stage_phases(self) -> list[str]:
        """Phase names in run order, from the manifest's funnel (`input` first)."""
        phases: list[str] = []
        for stage in self.manifest.get("stages", []):
            if stage["phase"] not in phases:
                phases.append(stage["phase"])
        return phases


def open_output(path: str | Path) -> Output:
    """Open an output folder, or its manifest.json; raise OutputUnreadable with the reason if it cannot be read."""
    path = Path(path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    if not manifest_path.is_file():
        raise OutputUnreadable(f"no manifest at {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise OutputUnreadable(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or "stages" not in manifest or "recipe" not in manifest:
        raise OutputUnreadable(f"{manifest_path}: not a curate manifest (no `stages` or `recipe`)")
    return Output(manifest_path.parent.resolve(), manifest)


@dataclass(frozen=True)
class RowGroup:
    """One row group of one Parquet file."""

    file: Path
    index: int
    rows: int


def row_groups(files: list[Path]) -> list[RowGroup]:
    """Every row group of `files`, in file order."""
    groups = []
    for file in files:
        metadata = pq.ParquetFile(file).metadata
        groups.extend(RowGroup(file, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups))
    return groups


def spread(groups: list[RowGroup], max_rows: int) -> list[RowGroup]:
    """Row groups evenly spaced over `groups` holding at least `max_rows` rows (all of them if fewer)."""
    total = sum(group.rows for group in groups)
    if total <= max_rows:
        return groups
    average = total / len(groups)
    wanted = min(len(groups), max(1, int(-(-max_rows // max(average, 1)))))
    step = len(groups) / wanted
    return [groups[int(i * step)] for i in range(wanted)]


def read_group(group: RowGroup, columns: list[str]) -> pa.Table:
    """Read the leaf columns `columns` (dotted leaf paths, e.g. `scores.clip_score`) of one row group.

    Columns the file does not have are skipped, so outputs written before a column existed still read.
    """
    handle = pq.ParquetFile(group.file)
    present = {handle.schema.column(i).path for i in range(len(handle.schema))}
    return handle.read_row_group(group.index, columns=[column for column in columns if column in present])


def iter_tar_samples(files: list[Path], with_images: bool = False) -> Iterator[dict[str, Any]]:
    """The samples of WebDataset tars as SAMPLE_SCHEMA rows rebuilt from their `.json` record.

    Image bytes are read only when asked (`images` is empty otherwise; image 0 only in the members layout).
    """
    def wanted(suffix: str) -> bool:
        return suffix == "json" or (with_images and suffix != "txt" and (suffix == "images.mp" or "." not in suffix))

    for file in files:
        for key, members in read_samples(file, wanted):
            yield row_from_members(key, members)
