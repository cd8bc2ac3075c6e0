"""Run a chain of per-sample stages over one batch, splitting off dropped rows."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema
from curate.drop_log import input_locators
from curate.stage import Stage, with_drops


@dataclass
class StageStats:
    """Counts of one stage over everything it processed."""

    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    counters: Counter = field(default_factory=Counter)  # what the stage counted (Stage.count), e.g. images blurred

    def add(self, other: "StageStats") -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.dropped.update(other.dropped)
        self.seconds += other.seconds
        self.counters.update(other.counters)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(sorted(self.dropped.items())),
            "seconds": round(self.seconds, 3),
            **({"counters": dict(sorted(self.counters.items()))} if self.counters else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageStats":
        return cls(data["rows_in"], data["rows_out"], Counter(data["dropped"]), data["seconds"],
                   Counter(data.get("counters", {})))


def split_drops(table: pa.Table, stage_name: str) -> tuple[pa.Table, pa.Table]:
    """Split `table` into (kept rows in SAMPLE_SCHEMA, drop-log rows in DROP_SCHEMA)."""
    if schema.DROP_REASON not in table.column_names:
        return schema.conform(table), schema.empty_table(schema.DROP_SCHEMA)
    reasons = table.column(schema.DROP_REASON)
    dropped_mask = pc.is_valid(reasons)
    details = table.column(schema.DROP_DETAIL) if schema.DROP_DETAIL in table.column_names else pa.nulls(
        table.num_rows, pa.string())
    dropped = table.filter(dropped_mask)
    drops = pa.table(
        {
            "key": dropped.column("key"),
            "url": pa.array(input_locators(dropped), pa.string()),
            "stage": pa.array([stage_name] * dropped.num_rows, pa.string()),
            "reason": reasons.filter(dropped_mask),
            "detail": details.filter(dropped_mask),
            "image": pa.nulls(dropped.num_rows, pa.int32()),  # a whole sample (image rows: drop_log.py)
        }
    ).cast(schema.DROP_SCHEMA)
    kept = table.filter(pc.invert(dropped_mask)).drop_columns(
        [c for c in (schema.DROP_REASON, schema.DROP_DETAIL) if c in table.column_names]
    )
    return schema.conform(kept), drops


STAGE_ERROR = "stage_error"


def process_isolating_errors(stage: Stage, batch: pa.Table, step: str = "process") -> pa.Table:
    """`stage.<step>(batch)` (process, annotate or select); if it raises, run it row by row and drop the
    rows that raise.

    When every row of a batch of several rows raises, the failure is the stage's,
    not the samples': the first error is raised again.
    """
    run = getattr(stage, step)
    try:
        return run(batch)
    except Exception as error:  # narrowed down to the failing samples below
        stage.take_counters()  # the failed batch's partial counts; the rows are counted again one by one
        if batch.num_rows == 1:
            return with_drops(batch, [STAGE_ERROR], [_describe(error)])
    results, failures = [], []
    for index in range(batch.num_rows):
        row = batch.slice(index, 1)
        try:
            results.append(_with_drop_columns(run(row)))
        except Exception as error:  # the sample's failure: recorded as its drop reason
            failures.append(error)
            results.append(with_drops(row, [STAGE_ERROR], [_describe(error)]))
    if len(failures) == batch.num_rows:
        raise failures[0]
    return pa.concat_tables(results, promote_options="permissive")


def _with_drop_columns(table: pa.Table) -> pa.Table:
    if schema.DROP_REASON in table.column_names:
        return table
    return with_drops(table, [None] * table.num_rows)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def apply_stages(stages: list[Stage], batch: pa.Table, stats: dict[str, StageStats],
                 on_sample_error: str = "drop") -> tuple[pa.Table, list[pa.Table]]:
    """Run `stages` in order over `batch`; return kept rows and the drop-log tables.

    `stats` (stage name -> StageStats) is updated in place. With `on_sample_error`
    "drop", a sample whose processing raises is dropped with reason `stage_error`;
    with "raise", any exception propagates and stops the run.
    """
    drop_tables = []
    for stage in stages:
        if batch.num_rows == 0:
            break
        started = time.perf_counter()
        if on_sample_error == "drop":
            result = process_isolating_errors(stage, batch)
        else:
            result = stage.process(batch)
        if result.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {stage.name!r} returned {result.num_rows} rows for {batch.num_rows}; "
                               "stages must mark drops with drop_reason, not remove rows")
        kept, drops = split_drops(result, stage.name)
        entry = stats.setdefault(stage.name, StageStats())
        entry.rows_in += batch.num_rows
        entry.rows_out += kept.num_rows
        entry.dropped.update(drops.column("reason").to_pylist())
        entry.seconds += time.perf_counter() - started
        entry.counters.update(stage.take_counters())
        if drops.num_rows:
            drop_tables.append(drops)
        batch = kept
    return batch, drop_tables
