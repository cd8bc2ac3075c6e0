"""The sink contract: write one output shard from a stream of sample tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import pyarrow as pa

from curate.stage import Params
from curate.storage import Location


@dataclass(frozen=True)
class FinishedOutput:
    """A written output as a sink's `finish` sees it."""

    root: Location
    shards: list[dict[str, Any]]  # this sink's shards as the manifest lists them: path (relative to root), rows
    drops: Location  # the output's drop log
    started_at: float  # the run's start (seconds since the epoch) and duration
    seconds: float


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

    def adapt(self, image_formats: dict[str, Counter]) -> dict[str, Any]:
        """Parameter changes this output needs, given how many images of each kind of sample are in each format.

        Called once per output before any shard is written, so every shard is written alike; none by default.
        """
        return {}

    def finish(self, output: FinishedOutput) -> None:
        """Write the files that describe the whole output, beside the shards (none by default).

        Called once every shard and the drop log are written, and again after `curate retry`
        merged new shards in; so it derives everything from the output as it stands.
        """
