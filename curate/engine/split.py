"""Split a source into deterministic work shards (the input of the first phase)."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema, storage
from curate.engine.apply import StageStats, split_drops
from curate.files import RunLayout, read_json, write_json, write_table
from curate.redact import redact_sample_urls
from curate.sources.base import Source

INPUT_PHASE = "input"
SOURCE_STAGE = "source"


def _rechunk(batches: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Regroup a stream of tables into tables of exactly `rows` rows (the last may be shorter)."""
    pending: list[pa.Table] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.concat_tables(pending).combine_chunks()
                pending, count = [], 0
    if count:
        yield pa.concat_tables(pending).combine_chunks()


@contextlib.contextmanager
def _fewer_collections(first_generation: int = 50_000):
    """Run the cyclic garbage collector less often: a source builds millions of short-lived dicts, and
    the default threshold (a collection every 700 allocations) made about half of the split's time."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(first_generation, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def split_source(source: Source, layout: RunLayout, rows_per_shard: int, scope: Any = None) -> dict:
    """Write the source's rows as work shards under _pool/input/; return the split summary.

    The split is done once: a finished split (its summary file exists) is reused, unless `scope` (what
    part of the source the run takes: its trial settings) differs from the one it was made for: then
    the rows not in it yet are split into new shards after it (a trial's pool extended by a bigger
    trial or the full run; the caller checked that the new part holds the old one).
    Rows the source could not turn into samples go to the shard's drop log.
    """
    summary_path = layout.phase_dir(INPUT_PHASE) / "_SUCCESS.json"
    previous = read_json(summary_path) if summary_path.exists() else None
    if previous is not None and previous.get("scope") == scope:
        if previous.get("rows_read") is not None:
            source.rows_read = previous["rows_read"]  # a trial's count of source rows, for its manifest
        return previous
    started = time.perf_counter()
    totals = StageStats()
    shards = 0
    seen: set[str] = set()
    if previous is not None:
        totals = StageStats.from_json(previous["stats"])
        shards = previous["shards"] if previous["stats"]["rows_in"] else 0  # an empty split's placeholder goes
        for shard in range(shards):
            for file in (layout.shard_file(INPUT_PHASE, shard), layout.drops_file(INPUT_PHASE, shard)):
                seen.update(storage.read_table(str(file), columns=["key"]).column("key").to_pylist())
    read_rows = max(1, min(rows_per_shard, 8192))
    first = shards
    with _fewer_collections():
        for shard, table in enumerate(_rechunk(_unseen(source.iter_batches(read_rows), seen), rows_per_shard),
                                      start=first):
            table = redact_sample_urls(table)  # a URL's password never reaches work shards, shards or drop logs
            kept, drops = split_drops(table, SOURCE_STAGE)
            write_table(layout.shard_file(INPUT_PHASE, shard), kept)
            write_table(layout.drops_file(INPUT_PHASE, shard), drops)
            totals.rows_in += table.num_rows
            totals.rows_out += kept.num_rows
            totals.dropped.update(drops.column("reason").to_pylist())
            shards += 1
    if shards == 0:  # an empty input still gets one (empty) work shard so every phase has a file
        write_table(layout.shard_file(INPUT_PHASE, 0), schema.empty_table())
        write_table(layout.drops_file(INPUT_PHASE, 0), schema.empty_table(schema.DROP_SCHEMA))
        shards = 1
    totals.seconds += time.perf_counter() - started
    summary = {"shards": shards, "rows_per_shard": rows_per_shard, "stats": totals.to_json(),
               "rows_read": getattr(source, "rows_read", None), "scope": scope,
               **({"extended_from": previous["shards"]} if previous is not None else {})}
    write_json(summary_path, summary)
    return summary


def _unseen(batches: Iterator[pa.Table], seen: set[str]) -> Iterator[pa.Table]:
    """The rows of `batches` whose key is not in `seen` (the rows an earlier split holds)."""
    if not seen:
        yield from batches
        return
    keys = pa.array(sorted(seen), pa.string())
    for batch in batches:
        fresh = batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=keys)))
        if fresh.num_rows:
            yield fresh


def input_shards(layout: RunLayout) -> list[storage.Location]:
    """The work shard files of the split, in order."""
    return sorted(layout.phase_dir(INPUT_PHASE).glob("[0-9]*[0-9].parquet"))
