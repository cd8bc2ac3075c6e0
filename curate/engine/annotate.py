"""What runs on a Ray worker in the annotation pass: a group of stages' `annotate` over one work shard.

The worker builds its stages once and sets each up (`setup()`: models loaded) only when a row first
needs it. For each work shard it is given, it reads the shard's view from the pool
(curate/engine/pool.py) and, per stage, the table an earlier run made under the same fingerprint, if
any: rows annotated then are kept as they are, and only the live rows never annotated (a loosened
gate, rows an upstream stage now lets through) or hard-dropped for a reason a changed setting may cure
are computed. It writes one annotation table per stage (every row of the shard, in order) and then
that table's completion marker (fingerprint, rows computed and reused, digests of the live rows
before and after the stage), each atomically. A gate's criteria (`select`, as the recipe sets them
now) run over every live row right after its annotation: rows failing them reach no later stage.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

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
    fixed_batches,
    overlay,
    scatter,
    table_alive,
)
from curate.engine.worker import StageSpec, build_stages
from curate.files import write_json, write_table
from curate.stage import Stage, StageContext, StageFailure


@dataclass(frozen=True)
class AnnotationTarget:
    """Where one stage's annotation table of one work shard goes, what it is made under, and what it reuses.

    `previous`: the table an earlier run made under the same fingerprint (in this output's pool or the one it
    reads), None to compute every live row. Of its rows, those annotated before are kept, except those whose
    hard drop is one of `redo` (reasons a changed setting may now cure); live rows it never annotated (a
    loosened gate, an upstream stage that now lets them through) are computed.
    """

    stage: str
    file: str
    marker: str
    fingerprint: str
    previous: str | None = None
    redo: tuple[str, ...] = ()
    admission: dict | None = None  # the stage's admission params, recorded in the marker
    gate: dict | None = None  # the gate's criteria (its selection params) when the stage is a gate
    previous_marker: dict | None = None  # the marker of `previous`


def _where() -> dict[str, Any]:
    """The node, GPUs and process this worker runs in (for the run's timeline)."""
    where: dict[str, Any] = {"pid": os.getpid(), "node": None, "gpus": []}
    if ray.is_initialized():
        where["node"] = ray.get_runtime_context().get_node_id()
        where["gpus"] = [str(gpu) for gpu in ray.get_gpu_ids()]
    return where


class AnnotateWorker:
    """Holds a group of stages, set up (models loaded) only once a row needs them, and annotates work shards."""

    def __init__(self, specs: list[StageSpec], gates: list[str], context: StageContext, batch_rows: int,
                 storage_config: storage.StorageConfig | None = None):
        storage.configure(storage_config)
        self.stages = build_stages(specs, context)
        self.gates = set(gates)
        self.batch_rows = batch_rows
        self.on_sample_error = context.on_sample_error
        self.with_images = any(s.reads_images or "images" in s.provides for s in self.stages)
        self.ready: set[str] = set()

    def run(self, group: str, shard: int, input_file: str, providers: list[Provider],
            targets: list[AnnotationTarget]) -> dict[str, Any]:
        """Annotate work shard `shard`; return the group's marker (rows, seconds, per-stage statistics, and where
        and when it ran)."""
        started, started_at = time.perf_counter(), time.time()
        stats = {stage.name: StageStats() for stage in self.stages}
        tallies = {stage.name: _Tally() for stage in self.stages}
        parts: dict[str, list[pa.Table]] = {stage.name: [] for stage in self.stages}
        set_up_before = set(self.ready)
        rows = 0
        try:
            view = ShardView(input_file, providers, with_images=self.with_images)
            previous = [_previous_batches(target, self.batch_rows) for target in targets]
            for batch, alive, _ in view.batches(self.batch_rows):
                rows += batch.num_rows
                for stage, target, earlier in zip(self.stages, targets, previous):
                    tally = tallies[stage.name]
                    tally.alive_in.update(alive)
                    table = self._annotate(stage, target, batch, alive, next(earlier, None), stats[stage.name],
                                           tally)
                    parts[stage.name].append(table)
                    batch = overlay(batch, table, tuple(stage.provides))
                    alive = pc.and_(alive, table_alive(table))
                    tally.alive_out.update(alive)
        except Exception as error:  # a stage-level failure: stop the run, naming the shard
            raise StageFailure(f"phase {group!r}, work shard {shard:05d}: {type(error).__name__}: {error}") from error
        tables = {}
        for stage, target in zip(self.stages, targets):
            table_schema = annotation_schema(tuple(stage.provides))
            parts_of = [t.cast(table_schema) for t in parts[stage.name]]
            table = pa.concat_tables(parts_of) if parts_of else table_schema.empty_table()
            tally = tallies[stage.name]
            marker = {
                "stage": stage.name, "shard": shard, "fingerprint": target.fingerprint, "rows": rows,
                "admission": target.admission or {}, "gate": target.gate,
                "alive_in": tally.alive_in.digest(), "alive_out": tally.alive_out.digest(),
                "annotated": tally.annotated, "computed": tally.computed, "reused": tally.reused,
                "reasons": _reason_counts(table), "stats": stats[stage.name].to_json(),
                "counters": _counters(target, stats[stage.name]), "models": stage.model_info()}
            unchanged = _unchanged(target, marker, tally, table)
            if not unchanged:
                write_table(storage.location(target.file), table)
                write_json(storage.location(target.marker), marker)
            tables[stage.name] = {"written": not unchanged, "computed": tally.computed, "reused": tally.reused}
        return {"phase": group, "shard": shard, "rows_in": rows, "seconds": round(time.perf_counter() - started, 3),
                "started_at": round(started_at, 3), "ended_at": round(time.time(), 3), **_where(),
                "set_up": sorted(self.ready - set_up_before), "tables": tables,
                "stages": {name: entry.to_json() for name, entry in stats.items()}}

    def _annotate(self, stage: Stage, target: AnnotationTarget, batch: pa.Table, alive: pa.Array,
                  previous: pa.Table | None, stats: StageStats, tally: "_Tally") -> pa.Table:
        """One stage's annotation table for `batch`: the previous table's rows where they still stand, the stage's
        columns and hard drops computed for the other live rows, and the gate's verdict on every live row."""
        if previous is not None and previous.num_rows != batch.num_rows:
            raise RuntimeError(f"annotation table {target.previous} does not match its work shard")
        need = alive
        if previous is not None:
            before = pc.fill_null(previous.column(ANNOTATED), False)
            redo = pc.is_in(previous.column(REASON), value_set=pa.array(list(target.redo), pa.string()))
            need = pc.and_(alive, pc.or_(pc.invert(before), pc.fill_null(redo, False))).combine_chunks()
        table = self._compute(stage, batch, need, stats)
        computed = pc.sum(need).as_py() or 0
        if previous is not None:
            table = _merge(previous, table, need, tuple(stage.provides))
            tally.reused += (pc.sum(pc.fill_null(previous.column(ANNOTATED), False)).as_py() or 0) - (
                pc.sum(pc.and_(need, pc.fill_null(previous.column(ANNOTATED), False))).as_py() or 0)
        tally.computed += computed
        tally.annotated += pc.sum(table.column(ANNOTATED)).as_py() or 0
        if stage.name in self.gates:
            return self._gate(stage, overlay(batch, table, tuple(stage.provides)), table, alive)
        if previous is not None and previous.column(GATE).null_count != previous.num_rows:
            table = table.set_column(table.schema.get_field_index(GATE), GATE, pa.nulls(table.num_rows, pa.bool_()))
        return table

    def _compute(self, stage: Stage, batch: pa.Table, need: pa.Array, stats: StageStats) -> pa.Table:
        """The stage's annotation of the rows of `need` (the others: not annotated, all nulls)."""
        started = time.perf_counter()
        flags = need.to_pylist()
        positions = [i for i, live in enumerate(flags) if live]
        everyone = len(positions) == batch.num_rows
        live = batch if everyone else batch.take(pa.array(positions, pa.int64()))  # no copy of the bytes when all live
        result = live
        if live.num_rows:
            if stage.name not in self.ready:
                stage.setup()
                self.ready.add(stage.name)
            if self.on_sample_error == "drop":
                result = process_isolating_errors(stage, live, "annotate")
            else:
                result = stage.annotate(live)
            if result.num_rows != live.num_rows:
                raise RuntimeError(f"stage {stage.name!r} returned {result.num_rows} rows for {live.num_rows}; "
                                   "stages must mark drops with drop_reason, not remove rows")
        reasons = _column(result, schema.DROP_REASON)
        details = _column(result, schema.DROP_DETAIL)
        provided = [c for c in schema.SAMPLE_SCHEMA.names if c in stage.provides]
        status_table = pa.table({REASON: reasons, DETAIL: details})
        if everyone:
            columns = {c: result.column(c) for c in provided}
            status = {c: status_table.column(c) for c in (REASON, DETAIL)}
        else:
            columns = scatter(batch.num_rows, positions, result, provided)
            status = scatter(batch.num_rows, positions, status_table, [REASON, DETAIL])
        table = pa.table({"key": batch.column("key"), **columns, ANNOTATED: need, **status,
                          GATE: pa.nulls(batch.num_rows, pa.bool_())})
        stats.rows_in += live.num_rows
        dropped = [r for r in reasons.to_pylist() if r is not None]
        stats.rows_out += live.num_rows - len(dropped)
        stats.dropped.update(dropped)
        stats.seconds += time.perf_counter() - started
        stats.counters.update(stage.take_counters())
        return table

    def _gate(self, stage: Stage, view: pa.Table, table: pa.Table, alive: pa.Array) -> pa.Table:
        """`table` with `_gate` set, by the stage's criteria as they are now, on every live row it annotated
        without a hard drop (null elsewhere)."""
        judged = pc.and_(pc.and_(alive, pc.fill_null(table.column(ANNOTATED), False)),
                         pc.is_null(table.column(REASON))).combine_chunks()
        positions = [i for i, flag in enumerate(judged.to_pylist()) if flag]
        verdict = pa.nulls(table.num_rows, pa.bool_())
        if positions:
            rows = view.take(pa.array(positions, pa.int64()))
            rows = rows.drop_columns([c for c in (schema.DROP_REASON, schema.DROP_DETAIL) if c in rows.column_names])
            passed = pc.is_null(_column(stage.select(rows), schema.DROP_REASON))
            verdict = scatter(table.num_rows, positions, pa.table({GATE: passed}), [GATE])[GATE]
        return table.set_column(table.schema.get_field_index(GATE), GATE, verdict)

    def shutdown(self) -> None:
        """Release the stages' resources."""
        for stage in self.stages:
            if stage.name in self.ready:
                stage.teardown()


class _Digest:
    """A short digest of a shard's row mask, built batch by batch: "all:N" when every row is set."""

    def __init__(self) -> None:
        self.hash = hashlib.blake2b(digest_size=12)
        self.rows = self.set = 0

    def update(self, mask: pa.Array) -> None:
        values = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        self.hash.update(np.packbits(values).tobytes() + len(values).to_bytes(8, "little"))
        self.rows += len(values)
        self.set += int(values.sum())

    def digest(self) -> str:
        return f"all:{self.rows}" if self.set == self.rows else self.hash.hexdigest()


@dataclass
class _Tally:
    """What one stage did on one shard: rows computed and reused, and the live rows before and after it."""

    computed: int = 0
    reused: int = 0
    annotated: int = 0
    alive_in: _Digest = field(default_factory=_Digest)
    alive_out: _Digest = field(default_factory=_Digest)


def all_alive(rows: int) -> str:
    """The digest of a shard's mask where all `rows` rows are live (what the first stage sees)."""
    return f"all:{rows}"


def _counters(target: AnnotationTarget, stats: StageStats) -> dict[str, int]:
    """The stage's counters over every row its table holds: the previous table's and this computation's."""
    total = Counter(stats.counters)
    if target.previous is not None and target.previous_marker is not None:
        old = target.previous_marker
        total.update(old.get("counters", old.get("stats", {}).get("counters", {})))
    return dict(sorted(total.items()))


def _unchanged(target: AnnotationTarget, marker: dict[str, Any], tally: _Tally, table: pa.Table) -> bool:
    """Whether the stage's table and marker would be written as they are (then they stay where they are,
    perhaps in another output's pool)."""
    old = target.previous_marker
    if old is None or target.previous is None or tally.computed:
        return False
    same = ("fingerprint", "admission", "gate", "alive_in", "alive_out", "annotated", "reasons", "counters")
    if any(old.get(key) != marker[key] for key in same):
        return False
    if target.gate is None:
        return True
    gates = storage.read_table(target.previous, columns=[GATE]).column(GATE)
    return gates.equals(table.column(GATE))


def _previous_batches(target: AnnotationTarget, batch_rows: int) -> Iterator[pa.Table]:
    if target.previous is None:
        return iter(())
    return fixed_batches(target.previous, batch_rows, None)


def _merge(previous: pa.Table, computed: pa.Table, need: pa.Array, provides: tuple[str, ...]) -> pa.Table:
    """The rows of `computed` where `need`, the rows of `previous` elsewhere."""
    if not (pc.any(need).as_py() or False):
        return previous
    columns = {}
    for name in computed.column_names:
        if name == "key":
            columns[name] = computed.column(name)
        elif name == ANNOTATED:
            columns[name] = pc.or_(pc.fill_null(previous.column(name), False), need)
        else:
            old = previous.column(name).cast(computed.schema.field(name).type)
            columns[name] = pc.if_else(need, computed.column(name), old)
    return pa.table(columns)


def _reason_counts(table: pa.Table) -> dict[str, int]:
    """How many rows of an annotation table carry each hard drop reason."""
    counts = pc.value_counts(table.column(REASON).drop_null()).to_pylist() if table.num_rows else []
    return {entry["values"]: entry["counts"] for entry in counts}


def _column(table: pa.Table, name: str) -> pa.Array:
    if name in table.column_names:
        return table.column(name).combine_chunks().cast(pa.string())
    return pa.nulls(table.num_rows, pa.string())
