"""Atomic writes and the layout of a run's output folder, local or on object storage (curate/storage.py)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.storage import Location, StoragePath, atomic_output, location, open_input

# A temporary path beside a local target renamed into place, or a local scratch file uploaded once to a
# store's key: see curate/storage.py for what atomic means on each store.
atomic_path = atomic_output


def write_json(path: Location, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Location) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


def write_table(path: Location, table: pa.Table) -> None:
    """Write an Arrow table as Parquet, atomically (work shards and drop logs)."""
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd", write_page_index=False)


def sha256_file(path: str | os.PathLike | StoragePath, chunk: int = 4 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open_input(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class RunLayout:
    """Paths of one run's output folder.

    OUT/manifest.json, OUT/drops.parquet, OUT/<format>/part-NNNNN.<ext> and the
    work area OUT/_work/ (input split, one folder per phase, write markers).
    The root is a local `Path` or a `StoragePath` (s3://, gs://, ...); every path below is of the same kind.
    """

    def __init__(self, root: Location | str):
        self.root = location(root)
        self.work = self.root / "_work"

    @property
    def manifest(self) -> Location:
        return self.root / "manifest.json"

    @property
    def drops(self) -> Location:
        return self.root / "drops.parquet"

    @property
    def run_info(self) -> Location:
        return self.work / "run.json"

    def phase_dir(self, phase: str) -> Location:
        return self.work / phase

    def shard_file(self, phase: str, shard: int) -> Location:
        return self.phase_dir(phase) / f"{shard:05d}.parquet"

    def drops_file(self, phase: str, shard: int) -> Location:
        return self.phase_dir(phase) / f"{shard:05d}.drops.parquet"

    def marker(self, phase: str, shard: int) -> Location:
        return self.phase_dir(phase) / f"{shard:05d}.done.json"

    def output_file(self, sink_name: str, index: int, extension: str) -> Location:
        return self.root / sink_name / f"part-{index:05d}{extension}"
