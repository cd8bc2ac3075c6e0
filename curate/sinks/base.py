"""The sink contract: write one output shard from a stream of sample tables."""

from __future__ import annotations

from typing import ClassVar, Iterable

import pyarrow as pa

from curate.stage import Params


class Sink:
    """Writes output shards of one format.

    The engine decides which samples go into which shard (deterministically) and
    hands `write` the shard's tables in order plus a temporary path; it renames
    the file into place once `write` returns. A sink must write the same bytes
    for the same input (no timestamps, owners or random ids in the file).
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    extension: ClassVar[str]  # ".parquet", ".tar"

    def __init__(self, params: Params):
        self.params = params

    def write(self, tables: Iterable[pa.Table], path: str) -> int:
        """Write the samples of `tables` (SAMPLE_SCHEMA) to `path`; return the number of samples."""
        raise NotImplementedError

    def count_rows(self, path: str) -> int:
        """Count the samples in a shard this sink wrote (used by `curate verify`)."""
        raise NotImplementedError
