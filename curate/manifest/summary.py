"""Bounded-memory summaries for the manifest: value quantiles and drop-reason counts.

A manifest is built at the end of every run, so its statistics must not hold one Python object per
row: a 10M-row run would need gigabytes in the driver at its very last step. `ValueSummary` keeps
count, mean, minimum and maximum exactly and at most `limit` values for the quantiles: every value
while there are no more than `limit`, so the quantiles are exact, and beyond that a uniform
reservoir sample of `limit` values drawn with a fixed seed, so the same run gives the same
manifest. `reason_counts` / `drop_log_counts` count a drop log's reasons one record batch at a time,
whole-sample rows apart from the rows of images removed from kept documents.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.drop_log import IMAGE, iter_drops

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
SAMPLE_LIMIT = 1_000_000  # values kept per field for the quantiles (8 MB as float64)


class ValueSummary:
    """Count, mean and quantiles of a stream of numbers, in bounded memory."""

    def __init__(self, limit: int = SAMPLE_LIMIT, seed: int = 0):
        self.limit = limit
        self.count = 0
        self.total = 0.0
        self.minimum = np.inf
        self.maximum = -np.inf
        self._kept = np.empty(0, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, values: Any) -> None:
        """Add numbers (a sequence, numpy or Arrow array); nulls and NaN are skipped."""
        array = _floats(values)
        if array.size == 0:
            return
        self.total += float(array.sum())
        self.minimum = min(self.minimum, float(array.min()))
        self.maximum = max(self.maximum, float(array.max()))
        room = max(0, self.limit - self._kept.size)
        if room:
            self._kept = np.concatenate([self._kept, array[:room]])
        rest = array[room:]
        if rest.size:  # reservoir sampling (Algorithm R), vectorised: value n replaces a kept one with p = limit/(n+1)
            positions = np.arange(self.count + room, self.count + array.size)
            slots = self._rng.integers(0, positions + 1)
            chosen = slots < self.limit
            self._kept[slots[chosen]] = rest[chosen]  # repeated slots: the later value wins, as in the sequential form
        self.count += int(array.size)

    @property
    def exact(self) -> bool:
        """True while every value is kept, i.e. the quantiles are exact."""
        return self.count <= self.limit

    def to_json(self) -> dict[str, Any]:
        """{"count"} when empty, else {"count", "mean", "quantiles": {"p0": min, ..., "p100": max}}."""
        if self.count == 0:
            return {"count": 0}
        quantiles = {}
        for q in QUANTILES:
            if q == 0.0:
                value = self.minimum
            elif q == 1.0:
                value = self.maximum
            else:
                value = float(np.quantile(self._kept, q))
            quantiles[f"p{int(q * 100)}"] = round(value, 4)
        return {"count": self.count, "mean": round(self.total / self.count, 4), "quantiles": quantiles}


def reason_counts(drop_log: Any, images: bool = False) -> dict[str, int]:
    """Rows per drop reason of a drop log Parquet file, read one record batch at a time.

    Sample rows only (whole samples dropped, `image` null: what reconciles with the input); with
    `images`, the image rows instead (images removed from kept documents). See curate/drop_log.py.
    """
    counts = drop_log_counts(drop_log)
    return counts["images_by_reason" if images else "by_reason"]


def drop_log_counts(drop_log: Any) -> dict[str, Any]:
    """`rows` and `by_reason` of the sample rows, `image_rows` and `images_by_reason` of the image rows.

    A drop log without the `image` column (written before image rows existed) is all sample rows.
    """
    samples: Counter = Counter()
    images: Counter = Counter()
    for table in iter_drops(drop_log, ["reason", IMAGE]):
        is_image = pc.is_valid(table.column(IMAGE))
        for counter, mask in ((samples, pc.invert(is_image)), (images, is_image)):
            counted = pc.value_counts(table.column("reason").filter(mask))
            counter.update(dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))
    return {"rows": sum(samples.values()), "image_rows": sum(images.values()),
            "by_reason": dict(sorted(samples.items())), "images_by_reason": dict(sorted(images.items()))}


def _floats(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.drop_null(values).to_numpy(zero_copy_only=False)
    elif not isinstance(values, np.ndarray):
        values = [v for v in values if v is not None]
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[~np.isnan(array)]
