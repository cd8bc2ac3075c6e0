"""What runs on a Ray worker in the annotation pass: a group of stages' `annotate` over one work shard.

The worker builds its stages once (`setup()`), then for each work shard it is given reads the
shard's view from the pool (curate/engine/pool.py), runs each stage's `annotate` on the rows still
alive, and writes one annotation table per stage (every row of the shard, in order) and then that
table's completion marker, each atomically. A gate's criteria (`select`) run right after its
annotation: rows failing them reach no later stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema, storage
from curate.engine.apply import StageStats, process_isolating_errors
from curate.engine.pool import (
    ANNOTATED,
    DETAIL,
    GATE,
    REASON,
    Provider,
    ShardView,
    annotation_schema,
    overlay,
    scatter,
    table_alive,
)
from curate.engine.worker import StageSpec, build_stages
from curate.files import write_json, write_table
from curate.stage import Stage, StageContext, StageFailure


@dataclass(frozen=True)
class AnnotationTarget:
    """Where one stage's annotation table of one work shard goes, and the fingerprint it is made under."""

    stage: str
    file: str
    marker: str
    fingerprint: str


class AnnotateWorker:
    """Loads a group of stages once, then annotates the work shards handed to it."""

    def __init__(self, specs: list[StageSpec], gates: list[str], context: StageContext, batch_rows: int,
                 storage_config: storage.StorageConfig | None = None):
        storage.configure(storage_config)
        self.stages = build_stages(specs, context)
        self.gates = set(gates)
        self.batch_rows = batch_rows
        self.on_sample_error = context.on_sample_error
        self.with_images = any(s.reads_images or "images" in s.provides for s in self.stages)
        for stage in self.stages:
            stage.setup()

    def run(self, group: str, shard: int, input_file: str, providers: list[Provider],
            targets: list[AnnotationTarget]) -> dict[str, Any]:
        """Annotate work shard `shard`; return the group's marker (rows, seconds, per-stage statistics)."""
        started = time.perf_counter()
        stats = {stage.name: StageStats() for stage in self.stages}
        parts: dict[str, list[pa.Table]] = {stage.name: [] for stage in self.stages}
        rows = 0
        try:
            view = ShardView(input_file, providers, with_images=self.with_images)
            for batch, alive, _ in view.batches(self.batch_rows):
                rows += batch.num_rows
                for stage in self.stages:
                    table = self._annotate(stage, batch, alive, stats[stage.name])
                    parts[stage.name].append(table)
                    batch = overlay(batch, table, tuple(stage.provides))
                    alive = pc.and_(alive, table_alive(table))
        except Exception as error:  # a stage-level failure: stop the run, naming the shard
            raise StageFailure(f"phase {group!r}, work shard {shard:05d}: {type(error).__name__}: {error}") from error
        for stage, target in zip(self.stages, targets):
            table_schema = annotation_schema(tuple(stage.provides))
            tables = [t.cast(table_schema) for t in parts[stage.name]]
            write_table(storage.location(target.file), pa.concat_tables(tables) if tables
                        else table_schema.empty_table())
            write_json(storage.location(target.marker), {
                "stage": stage.name, "shard": shard, "fingerprint": target.fingerprint, "rows": rows,
                "stats": stats[stage.name].to_json(),
                "models": stage.model_info()})
        return {"phase": group, "shard": shard, "rows_in": rows, "seconds": round(time.perf_counter() - started, 3),
                "stages": {name: entry.to_json() for name, entry in stats.items()}}

    def _annotate(self, stage: Stage, batch: pa.Table, alive: pa.Array, stats: StageStats) -> pa.Table:
        """One stage's annotation table for `batch`: its provided columns and hard drops on the alive rows."""
        started = time.perf_counter()
        flags = alive.to_pylist()
        positions = [i for i, live in enumerate(flags) if live]
        everyone = len(positions) == batch.num_rows
        live = batch if everyone else batch.take(pa.array(positions, pa.int64()))  # no copy of the bytes when all live
        result = live
        if live.num_rows:
            if self.on_sample_error == "drop":
                result = process_isolating_errors(stage, live, "annotate")
            else:
                result = stage.annotate(live)
            if result.num_rows != live.num_rows:
                raise RuntimeError(f"stage {stage.name!r} returned {result.num_rows} rows for {live.num_rows}; "
                                   "stages must mark drops with drop_reason, not remove rows")
        reasons = _column(result, schema.DROP_REASON)
        details = _column(result, schema.DROP_DETAIL)
        gate = pa.nulls(result.num_rows, pa.bool_())
        if stage.name in self.gates and result.num_rows:
            cleared = result.drop_columns([c for c in (schema.DROP_REASON, schema.DROP_DETAIL)
                                           if c in result.column_names])
            selected = stage.select(cleared)
            gate = pc.is_null(_column(selected, schema.DROP_REASON))
        provided = [c for c in schema.SAMPLE_SCHEMA.names if c in stage.provides]
        status_table = pa.table({REASON: reasons, DETAIL: details, GATE: gate})
        if everyone:
            columns = {c: result.column(c) for c in provided}
            status = {c: status_table.column(c) for c in (REASON, DETAIL, GATE)}
        else:
            columns = scatter(batch.num_rows, positions, result, provided)
            status = scatter(batch.num_rows, positions, status_table, [REASON, DETAIL, GATE])
        table = pa.table({"key": batch.column("key"), **columns, ANNOTATED: alive, **status})
        stats.rows_in += live.num_rows
        dropped = [r for r in reasons.to_pylist() if r is not None]
        stats.rows_out += live.num_rows - len(dropped)
        stats.dropped.update(dropped)
        stats.seconds += time.perf_counter() - started
        stats.counters.update(stage.take_counters())
        return table

    def shutdown(self) -> None:
        """Release the stages' resources."""
        for stage in self.stages:
            stage.teardown()


def _column(table: pa.Table, name: str) -> pa.Array:
    if name in table.column_names:
        return table.column(name).combine_chunks().cast(pa.string())
    return pa.nulls(table.num_rows, pa.string())
