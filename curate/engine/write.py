"""Cut the final work shards into output shards and write them with every configured sink."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray

from curate import registry, storage
from curate.engine.crash import crash_if_asked
from curate.engine.worker import build_stages
from curate.files import RunLayout, atomic_path, read_json, sha256_file, write_json
from curate.sinks.base import FinishedOutput
from curate.stage import StageContext, StageFailure

WRITE_PHASE = "write"


@dataclass(frozen=True)
class SinkSpec:
    """What a writer task needs to rebuild a sink: its name, import target and parameters as JSON."""

    name: str
    target: str
    params: dict[str, Any]

    def build(self) -> Any:
        """The sink itself, with its parameters validated."""
        cls = registry.import_target(self.target)
        return cls(cls.Params.model_validate(self.params))


@dataclass
class Segment:
    """Rows [start, stop) of one work shard file."""

    file: str
    start: int
    stop: int


@dataclass
class OutputShard:
    """One output shard: its index and the work-shard segments it is made of, in order."""

    index: int
    segments: list[Segment]
    rows: int


def row_image_bytes(path: storage.Location) -> list[int]:
    """Per-row total of encoded image bytes in a work shard (reads only `image_meta`)."""
    table = storage.read_table(path, columns=["image_meta"])
    if table.num_rows == 0:
        return []
    flat = pc.list_flatten(table.column("image_meta"))
    sizes = pc.fill_null(pc.struct_field(flat, "num_bytes"), 0).to_pylist()
    lengths = pc.fill_null(pc.list_value_length(table.column("image_meta")), 0).to_pylist()
    totals, offset = [], 0
    for length in lengths:
        totals.append(sum(sizes[offset : offset + length]))
        offset += length
    return totals


def plan_output_shards(files: list[storage.Location], shard_rows: int | None,
                       shard_bytes: int | None) -> list[OutputShard]:
    """Cut the rows of `files`, in order, into shards of at most `shard_rows` rows / about `shard_bytes` bytes.

    Deterministic: the same work shards always give the same output shards.
    """
    shards: list[OutputShard] = []
    segments: list[Segment] = []
    rows = size = 0

    def close() -> None:
        nonlocal segments, rows, size
        if rows:
            shards.append(OutputShard(len(shards), segments, rows))
        segments, rows, size = [], 0, 0

    for file in files:
        start = 0
        for position, row_bytes in enumerate(row_image_bytes(file)):
            rows += 1
            size += row_bytes
            if (shard_rows and rows >= shard_rows) or (shard_bytes and size >= shard_bytes):
                segments.append(Segment(str(file), start, position + 1))
                start = position + 1
                close()
        end = storage.parquet_file(file).metadata.num_rows
        if end > start:
            segments.append(Segment(str(file), start, end))
    close()
    return shards


@dataclass(frozen=True)
class PoolImages:
    """Where the pool holds the image bytes of each work shard: the annotation tables of `stage`, else the split,
    in this output's pool or (`files`: shard -> file, as the run resolved them) another output's."""

    root: str
    stage: str | None
    files: dict[int, str] | None = None

    def file(self, shard: int) -> storage.Location:
        """The pool file holding work shard `shard`'s image bytes."""
        if self.files is not None and shard in self.files:
            return storage.location(self.files[shard])
        layout = RunLayout(self.root)
        return layout.shard_file(layout.annotation_phase(self.stage) if self.stage else "input", shard)


def shard_of(file: str) -> int:
    """The work shard index of a work-area file named NNNNN.parquet."""
    return int(storage.location(file).name.split(".")[0])


def _with_pool_images(tables: Iterator[tuple[Segment, pa.Table]], images: PoolImages | None) -> Iterator[pa.Table]:
    """Each table with its rows' image bytes from the pool (looked up by key in the work shard's image file)."""
    loaded: tuple[int, dict[str, int], pa.ChunkedArray] | None = None
    for segment, table in tables:
        if images is None:
            yield table
            continue
        shard = shard_of(segment.file)
        if loaded is None or loaded[0] != shard:
            pool = storage.read_table(images.file(shard), columns=["key", "images"])
            loaded = (shard, {key: i for i, key in enumerate(pool.column("key").to_pylist())},
                      pool.column("images"))
        _, positions, column = loaded
        rows = [positions[key] for key in table.column("key").to_pylist()]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            taken = column.slice(rows[0], len(rows))  # consecutive rows (nothing dropped between): no copy
        else:
            taken = column.take(pa.array(rows, pa.int64()))
        yield table.set_column(table.schema.get_field_index("images"), table.schema.field("images"), taken)


def _transformed(tables: Iterator[pa.Table], stages: list[Any]) -> Iterator[pa.Table]:
    for table in tables:
        for stage in stages:
            table = stage.transform(table)
        yield table


def _without_embeddings(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    for table in tables:
        index = table.schema.get_field_index("embeddings")
        yield table.set_column(
            index, table.schema.field(index), pa.nulls(table.num_rows, table.schema.field(index).type)
        )


def _segment_tables(segments: list[Segment], batch_rows: int = 256) -> Iterator[tuple[Segment, pa.Table]]:
    for segment in segments:
        parquet = storage.parquet_file(segment.file)
        position = 0
        for record_batch in parquet.iter_batches(batch_size=batch_rows):
            batch_start, batch_stop = position, position + record_batch.num_rows
            position = batch_stop
            lo, hi = max(batch_start, segment.start), min(batch_stop, segment.stop)
            if lo < hi:
                yield segment, pa.Table.from_batches([record_batch.slice(lo - batch_start, hi - lo)])
            if position >= segment.stop:
                break


def write_output_shard(
    shard: OutputShard, sinks: list[SinkSpec], root: str, keep_embeddings: bool = False,
    storage_config: storage.StorageConfig | None = None, images: PoolImages | None = None,
    transforms: list[Any] | None = None, context: StageContext | None = None,
) -> dict[str, Any]:
    """Write `shard` with every sink (atomically), then its marker; return the marker.

    The rows come from the selection with their image bytes from the pool (`images`), and the stages in
    `transforms` (StageSpecs of stages with `write_transform`) change them first, e.g. blurring faces.
    Size and sha256 are taken from the complete file before it is moved (or uploaded) into place.
    """
    storage.configure(storage_config)  # the driver's store settings, so URLs open the same store here
    layout = RunLayout(root)
    stages = build_stages(transforms or [], context or StageContext())
    files = []
    counters: dict[str, Counter] = {}
    for position, spec in enumerate(sinks):
        sink = spec.build()
        name = spec.name
        final = layout.output_file(name, shard.index, sink.extension)
        with atomic_path(final) as temporary:
            tables = _transformed(_with_pool_images(_segment_tables(shard.segments), images), stages)
            written = sink.write(tables if keep_embeddings else _without_embeddings(tables), str(temporary))
            if written != shard.rows:
                raise RuntimeError(f"{name} sink wrote {written} rows to {final.name}, expected {shard.rows}")
            size, digest = temporary.stat().st_size, sha256_file(temporary)
        for stage in stages:  # counted once, though every sink transforms the same rows
            taken = stage.take_counters()
            if position == 0 and taken:
                counters.setdefault(stage.name, Counter()).update(taken)
        files.append(
            {
                "format": name,
                "path": str(final.relative_to(layout.root)),
                "rows": written,
                "bytes": size,
                "sha256": digest,
            }
        )
    marker = {"index": shard.index, "rows": shard.rows, "files": files,
              **({"counters": {k: dict(v) for k, v in counters.items()}} if counters else {})}
    write_json(layout.marker(WRITE_PHASE, shard.index), marker)
    return marker


def image_formats(files: list[storage.Location]) -> dict[str, Counter]:
    """How many images of each kind of sample are in each format, over `files` (reads two columns only)."""
    counts: dict[str, Counter] = {}
    for file in files:
        table = storage.read_table(file, columns=["kind", "image_meta"])
        for kind, metas in zip(table.column("kind").to_pylist(), table.column("image_meta").to_pylist()):
            counts.setdefault(kind, Counter()).update(m["format"] for m in metas or [] if m and m.get("format"))
    return counts


def adapt_sinks(sinks: list[SinkSpec], files: list[storage.Location]) -> list[SinkSpec]:
    """The sinks with the parameters each needs for this output (Sink.adapt), decided once for every shard."""
    formats = image_formats(files)
    adapted = []
    for spec in sinks:
        changes = spec.build().adapt(formats)
        adapted.append(SinkSpec(spec.name, spec.target, {**spec.params, **changes}))
    return adapted


def write_outputs(
    layout: RunLayout,
    files: list[storage.Location],
    sinks: list[SinkSpec],
    shard_rows: int | None,
    shard_bytes: int | None,
    cpus_per_task: float,
    max_in_flight: int,
    on_progress: Callable[[int], None],
    keep_embeddings: bool = False,
    images: PoolImages | None = None,
    transforms: list[Any] | None = None,
    release: Callable[[int], None] | None = None,
    context: StageContext | None = None,
    in_process: bool = False,
) -> list[dict[str, Any]]:
    """Plan and write all output shards, skipping those already written; return their markers in order.

    `release(shard)` is called for each work shard once every output shard holding its rows is written
    (at once for a work shard that kept no row), so its pool data can go. `in_process` writes in this
    process, one shard after the other, instead of as Ray tasks.
    """
    plan_path = layout.phase_dir(WRITE_PHASE) / "plan.json"
    saved = read_json(plan_path) if plan_path.exists() else None
    if isinstance(saved, dict):  # a resumed write uses the same cut and the same sink parameters
        shards = [OutputShard(s["index"], [Segment(**g) for g in s["segments"]], s["rows"]) for s in saved["shards"]]
        sinks = [SinkSpec(**spec) for spec in saved["sinks"]]
    else:
        shards = plan_output_shards(files, shard_rows, shard_bytes)
        sinks = adapt_sinks(sinks, files)
        write_json(plan_path, {"shards": [asdict(s) for s in shards], "sinks": [asdict(s) for s in sinks]})
    remote_write = ray.remote(write_output_shard).options(num_cpus=cpus_per_task, max_retries=3)
    outputs_of = {shard_of(str(f)): set() for f in files}
    for shard in shards:
        for segment in shard.segments:
            outputs_of[shard_of(segment.file)].add(shard.index)

    def written(index: int) -> None:
        for work_shard, pending in outputs_of.items():
            if index in pending:
                pending.discard(index)
                if not pending and release is not None:
                    release(work_shard)

    waiting = []
    for shard in shards:
        if layout.marker(WRITE_PHASE, shard.index).exists():
            on_progress(shard.rows)
        else:
            waiting.append(shard)
    if release is not None:
        for work_shard, pending in outputs_of.items():
            if not pending or not pending & {s.index for s in waiting}:
                pending.clear()
                release(work_shard)
    if in_process:  # a small re-selection: no Ray to start for a few shards
        for shard in waiting:
            marker = write_output_shard(shard, sinks, str(layout.root), keep_embeddings, storage.current_config(),
                                        images, transforms, context)
            on_progress(shard.rows)
            crash_if_asked(WRITE_PHASE, marker["index"])
            written(marker["index"])
        waiting = []
    in_flight: dict[ray.ObjectRef, OutputShard] = {}
    while waiting or in_flight:
        while waiting and len(in_flight) < max_in_flight:
            shard = waiting.pop(0)
            in_flight[remote_write.remote(shard, sinks, str(layout.root), keep_embeddings,
                                          storage.current_config(), images, transforms, context)] = shard
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            try:
                marker = ray.get(ref)
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", error)
                raise StageFailure(
                    f"phase 'write', output shard {in_flight[ref].index:05d}: {type(cause).__name__}: {cause}"
                ) from None
            on_progress(in_flight.pop(ref).rows)
            crash_if_asked(WRITE_PHASE, marker["index"])
            written(marker["index"])
    return [read_json(layout.marker(WRITE_PHASE, s.index)) for s in shards]


def finish_outputs(sinks: list[SinkSpec], root: storage.Location, shards: list[dict[str, Any]],
                   drops: storage.Location, started_at: float, seconds: float) -> None:
    """Let every sink describe the whole output (e.g. `sizes.json`), from its shards as listed in the manifest."""
    for spec in sinks:
        own = [shard for shard in shards if shard["format"] == spec.name]
        spec.build().finish(FinishedOutput(root, own, drops, started_at, seconds))


def sinks_of(resolved_recipe: dict[str, Any]) -> list[SinkSpec]:
    """The sinks of a resolved recipe (as recorded in a manifest)."""
    output = resolved_recipe["output"]
    return [SinkSpec(name, registry.SINKS[name], output.get(name) or {}) for name in output["formats"]]
