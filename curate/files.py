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

    OUT/manifest.json, OUT/drops.parquet, OUT/<format>/part-NNNNN.<ext>, the pool OUT/_pool/ (the input
    split and every stage's annotation tables, image bytes stored once; it outlives the run unless
    `engine.keep_pool: false`) and the work area OUT/_work/ (selection steps, decisions, write markers).
    The root is a local `Path` or a `StoragePath` (s3://, gs://, ...); every path below is of the same kind.
    """

    POOL_PHASES = ("input",)
    ANNOTATIONS = "annotations"

    def __init__(self, root: Location | str):
        self.root = location(root)
        self.work = self.root / "_work"
        self.pool = self.root / "_pool"

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
        """The folder of a step: the split and annotation tables are in the pool, the rest in the work area."""
        if phase in self.POOL_PHASES or phase.startswith(self.ANNOTATIONS + "/"):
            return self.pool / phase
        return self.work / phase

    def annotation_phase(self, stage: str) -> str:
        """The step name under which `stage`'s annotation tables are kept."""
        return f"{self.ANNOTATIONS}/{stage}"

    def shard_file(self, phase: str, shard: int) -> Location:
        return self.phase_dir(phase) / f"{shard:05d}.parquet"

    def drops_file(self, phase: str, shard: int) -> Location:
        """A step's drop log of one work shard (the split's is in the pool: a re-selection writes it again)."""
        return self.phase_dir(phase) / f"{shard:05d}.drops.parquet"

    def marker(self, phase: str, shard: int) -> Location:
        return self.phase_dir(phase) / f"{shard:05d}.done.json"

    def output_file(self, sink_name: str, index: int, extension: str) -> Location:
        return self.root / sink_name / f"part-{index:05d}{extension}"
