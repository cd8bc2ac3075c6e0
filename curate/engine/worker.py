"""What runs on a Ray worker: one phase's stages over one work shard at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import registry, schema, storage
from curate.engine.apply import StageStats, apply_stages
from curate.files import atomic_path, write_json, write_table
from curate.stage import Stage, StageContext, StageFailure


@dataclass(frozen=True)
class StageSpec:
    """What a worker needs to rebuild a stage: its name, import target and parameters as JSON."""

    name: str
    target: str
    params: dict[str, Any]


def build_stages(specs: list[StageSpec], context: StageContext) -> list[Stage]:
    """Instantiate stages from their specs."""
    stages = []
    for spec in specs:
        cls = registry.import_target(spec.target)
        stages.append(cls(cls.Params.model_validate(spec.params), context))
    return stages


class PhaseWorker:
    """Loads a phase's stages once, then processes work shards handed to it.

    For each shard it streams the input Parquet in batches, runs the stages, and
    writes kept rows, the drop log and finally the completion marker (with the
    stage statistics), each atomically.
    """

    def __init__(self, specs: list[StageSpec], context: StageContext, batch_rows: int,
                 storage_config: storage.StorageConfig | None = None):
        storage.configure(storage_config)  # the driver's store settings, so URLs open the same store here
        self.stages = build_stages(specs, context)
        self.batch_rows = batch_rows
        self.on_sample_error = context.on_sample_error
        for stage in self.stages:
            stage.setup()

    def run(self, phase: str, shard: int, input_path: str, output_path: str, drops_path: str,
            marker_path: str) -> dict[str, Any]:
        """Process work shard `shard`; return the marker's content."""
        started = time.perf_counter()
        stats: dict[str, StageStats] = {stage.name: StageStats() for stage in self.stages}
        drop_tables: list[pa.Table] = []
        rows_in = rows_out = 0
        try:
            with atomic_path(storage.location(output_path)) as temporary:
                with pq.ParquetWriter(temporary, schema.SAMPLE_SCHEMA, compression="zstd") as writer:
                    source = storage.parquet_file(input_path)
                    for record_batch in source.iter_batches(batch_size=self.batch_rows):
                        batch = pa.Table.from_batches([record_batch])
                        rows_in += batch.num_rows
                        kept, drops = apply_stages(self.stages, batch, stats, self.on_sample_error)
                        drop_tables.extend(drops)
                        rows_out += kept.num_rows
                        writer.write_table(kept)
        except Exception as error:  # a stage-level failure: stop the run, naming the shard
            raise StageFailure(f"phase {phase!r}, work shard {shard:05d}: {type(error).__name__}: {error}") from error
        drops = pa.concat_tables(drop_tables) if drop_tables else schema.empty_table(schema.DROP_SCHEMA)
        write_table(storage.location(drops_path), drops)
        marker = {
            "phase": phase,
            "shard": shard,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_dropped": drops.num_rows,
            "seconds": round(time.perf_counter() - started, 3),
            "stages": {name: entry.to_json() for name, entry in stats.items()},
            "models": [info for stage in self.stages for info in stage.model_info()],
        }
        write_json(storage.location(marker_path), marker)
        return marker

    def shutdown(self) -> None:
        """Release the stages' resources."""
        for stage in self.stages:
            stage.teardown()
