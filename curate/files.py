"""Atomic writes and the layout of a run's output folder."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


def write_table(path: Path, table: pa.Table) -> None:
    """Write an Arrow table as Parquet, atomically (work shards and drop logs)."""
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd", write_page_index=False)


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class RunLayout:
    """Paths of one run's output folder.

    OUT/manifest.json, OUT/drops.parquet, OUT/<format>/part-NNNNN.<ext> and the
    work area OUT/_work/ (input split, one folder per phase, write markers).
    """

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "_work"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def drops(self) -> Path:
        return self.root / "drops.parquet"

    @property
    def run_info(self) -> Path:
        return self.work / "run.json"

    def phase_dir(self, phase: str) -> Path:
        return self.work / phase

    def shard_file(self, phase: str, shard: int) -> Path:
        return self.phase_dir(phase) / f"{shard:05d}.parquet"

    def drops_file(self, phase: str, shard: int) -> Path:
        return self.phase_dir(phase) / f"{shard:05d}.drops.parquet"

    def marker(self, phase: str, shard: int) -> Path:
        return self.phase_dir(phase) / f"{shard:05d}.done.json"

    def output_file(self, sink_name: str, index: int, extension: str) -> Path:
        return self.root / sink_name / f"part-{index:05d}{extension}"
