"""Selection: decide which rows are kept from the pool's annotations alone, without image bytes.

The selection is cut into segments at corpus-wide stages. A segment, per work shard:
1. starts from the rows that survived the segment before (the first starts from every row of the
   shard, as the pool's annotation tables show it);
2. applies the decision of the corpus-wide stage that opens it, if any;
3. applies, in recipe order, each per-sample stage's hard drops (recorded with its annotations)
   and then its criteria (`select`); a row is dropped under the first stage that drops it;
4. writes the surviving rows (image bytes left out) as the next segment's input, with the drop
   log and a completion marker.
A corpus-wide stage decides over the surviving rows of every shard of the segment before it, so it
sees the rows that passed the criteria before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import registry, schema, storage
from curate.engine.apply import StageStats, split_drops
from curate.engine.decision import ApplyDecision, ApplyDecisionParams
from curate.engine.pool import ANNOTATED, DETAIL, REASON, Provider, ShardView, fixed_batches, without_image_bytes
from curate.engine.worker import StageSpec
from curate.files import write_json, write_table
from curate.stage import Stage, StageContext, StageFailure, with_drops

SELECT_BATCH_ROWS = 8192


@dataclass
class SegmentSpec:
    """One segment of the selection: its name, the one before it, the decision it opens with, its stages."""

    name: str
    input_segment: str | None  # None: the first segment reads the pool
    stages: list[StageSpec] = field(default_factory=list)
    decision: str | None = None  # the decision file of the corpus-wide stage that opens the segment
    corpus_stage: str | None = None
    corpus: StageSpec | None = None  # that stage itself, for its decision
    # live rows a stage never annotated: an error ("raise"), or dropped as NOT_ANNOTATED (a what-if counts them)
    unannotated: str = "raise"


NOT_ANNOTATED = "not_annotated"  # a what-if's count of rows a run would annotate first

@dataclass(frozen=True)
class SegmentShard:
    """The files of one work shard that a segment reads and writes."""

    shard: int
    input_file: str  # the pool's input shard
    providers: list[Provider]  # every annotation table of the shard, in recipe order
    previous: str | None  # the previous segment's surviving rows
    output: str
    drops: str
    marker: str


def select_shard(spec: SegmentSpec, files: SegmentShard, context: StageContext,
                 storage_config: storage.StorageConfig | None = None) -> dict[str, Any]:
    """Run one segment over one work shard (a Ray task); return its marker."""
    storage.configure(storage_config)
    started = time.perf_counter()
    stages = _build(spec, context)
    stats: dict[str, StageStats] = {stage.name: StageStats() for stage in stages}
    hard = _hard_drops(files.providers, {s.name for s in stages})
    kept_tables, drop_tables = [], []
    rows_in = 0
    try:
        for batch in _input_batches(files):
            rows_in += batch.num_rows
            for stage in stages:
                if batch.num_rows == 0:
                    break
                batch, drops = _apply(stage, batch, hard.get(stage.name), stats[stage.name], spec.unannotated)
                if drops.num_rows:
                    drop_tables.append(drops)
            kept_tables.append(batch)
    except Exception as error:
        raise StageFailure(f"selection {spec.name!r}, work shard {files.shard:05d}: "
                           f"{type(error).__name__}: {error}") from error
    kept = pa.concat_tables(kept_tables) if kept_tables else schema.empty_table()
    write_table(storage.location(files.output), kept)
    drops = pa.concat_tables(drop_tables) if drop_tables else schema.empty_table(schema.DROP_SCHEMA)
    write_table(storage.location(files.drops), drops)
    marker = {"phase": spec.name, "shard": files.shard, "rows_in": rows_in, "rows_out": kept.num_rows,
              "rows_dropped": drops.num_rows, "seconds": round(time.perf_counter() - started, 3),
              "stages": {name: entry.to_json() for name, entry in stats.items()}}
    write_json(storage.location(files.marker), marker)
    return marker


def _build(spec: SegmentSpec, context: StageContext) -> list[Stage]:
    stages: list[Stage] = []
    if spec.decision is not None:
        stages.append(ApplyDecision(ApplyDecisionParams(decision=spec.decision, stage_name=spec.corpus_stage),
                                    context))
    for stage_spec in spec.stages:
        cls = registry.import_target(stage_spec.target)
        stages.append(cls(cls.Params.model_validate(stage_spec.params), context))
    return stages


def _input_batches(files: SegmentShard):
    """The rows the segment starts from: every row of the shard's view, or the previous segment's survivors."""
    if files.previous is None:
        view = ShardView(files.input_file, files.providers, with_images=False)
        for batch, _, _ in view.batches(SELECT_BATCH_ROWS):
            yield batch
        return
    for batch in fixed_batches(files.previous, SELECT_BATCH_ROWS, None):
        yield without_image_bytes(schema.conform(batch))


def _hard_drops(providers: list[Provider], names: set[str]) -> dict[str, pa.Table]:
    """Per stage of the segment: its annotation table's key, _annotated, _reason and _detail columns."""
    return {provider.stage: storage.read_table(provider.file, columns=["key", ANNOTATED, REASON, DETAIL])
            for provider in providers if provider.stage in names}


def _looked_up(hard: pa.Table, keys: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(annotated, reason, detail) of each key, from a stage's annotation table (annotated false: not there)."""
    positions = pc.index_in(keys, value_set=hard.column("key"))
    annotated = pc.fill_null(pc.take(hard.column(ANNOTATED), positions), False)
    return (annotated.combine_chunks() if isinstance(annotated, pa.ChunkedArray) else annotated,
            pc.take(hard.column(REASON), positions), pc.take(hard.column(DETAIL), positions))


def _apply(stage: Stage, batch: pa.Table, hard: pa.Table | None, stats: StageStats,
           unannotated: str = "raise") -> tuple[pa.Table, pa.Table]:
    """One stage's hard drops, then its criteria, over the live rows of `batch`; return (kept, drops)."""
    started = time.perf_counter()
    if hard is not None:
        annotated, reasons, details = _looked_up(hard, batch.column("key"))
        missing = pc.invert(annotated)
        if unannotated == "raise" and pc.any(missing).as_py():
            first = batch.column("key").filter(missing)[0].as_py()
            raise RuntimeError(f"{pc.sum(missing).as_py()} live rows were never annotated by {stage.name!r} "
                               f"(e.g. {first}); run again with --overwrite")
        reasons = pc.if_else(missing, pa.scalar(NOT_ANNOTATED), reasons)
        details = pc.if_else(missing, pa.scalar("a run annotates this row first"), details)
        rows_in = batch.num_rows
        batch, hard_drops = split_drops(with_drops(batch, reasons.to_pylist(), details.to_pylist()), stage.name)
        kept, drops = split_drops(stage.select(batch), stage.name) if batch.num_rows else (batch, hard_drops)
        if batch.num_rows and hard_drops.num_rows:
            drops = pa.concat_tables([hard_drops, drops])
    else:
        rows_in = batch.num_rows
        kept, drops = split_drops(stage.process(batch), stage.name)
    stats.rows_in += rows_in
    stats.rows_out += kept.num_rows
    stats.dropped.update(drops.column("reason").to_pylist())
    stats.seconds += time.perf_counter() - started
    return kept, drops

