"""Trial runs: a recipe over the first N input rows (`--limit`) or a seeded sample of them (`--sample`).

A row is in a sample of fraction f when the hash of (seed, key) falls below f, so with the same
seed a bigger sample holds every row of a smaller one. `limit` then takes the first N rows that
are left, in input order, and stops reading the source there. Rows left out are not input rows
of the trial: they are counted in the manifest's `trial.rows_skipped`, not in the drop log.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import pyarrow as pa


def sample_position(key: str, seed: int) -> float:
    """Where `key` falls in [0, 1) for `seed`: a row is in a sample of fraction f when this is below f."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class TrialSource:
    """The rows of `inner` a trial takes: a seeded sample by key, then the first `limit` of them."""

    def __init__(self, inner: Any, limit: int | None, sample: float | None, seed: int):
        self.inner = inner
        self.limit, self.sample, self.seed = limit, sample, seed
        self.name = inner.name
        self.params = inner.params
        self.rows_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # path, dataset, ... of the wrapped source

    def preflight(self) -> None:
        """The wrapped source's checks."""
        self.inner.preflight()

    def iter_batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """The wrapped source's batches, restricted to the trial's rows; stops reading once `limit` is reached."""
        taken = 0
        for batch in self.inner.iter_batches(batch_rows):
            self.rows_read += batch.num_rows
            if self.sample is not None:
                keep = [sample_position(key, self.seed) < self.sample for key in batch.column("key").to_pylist()]
                batch = batch.filter(pa.array(keep, pa.bool_()))
            if self.limit is not None:
                batch = batch.slice(0, self.limit - taken)
            taken += batch.num_rows
            if batch.num_rows:
                yield batch
            if self.limit is not None and taken >= self.limit:
                return

    def describe(self) -> dict[str, Any]:
        """The wrapped source's description plus the trial's settings."""
        return {**self.inner.describe(), "trial": {"limit": self.limit, "sample": self.sample, "seed": self.seed}}

    def input_file_state(self) -> dict[str, int] | None:
        """The wrapped source's input file state."""
        return self.inner.input_file_state()
