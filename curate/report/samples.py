"""Example samples for the report: kept ones from the shards, dropped ones from the drop log.

The drop log holds no image bytes or captions. A dropped sample's caption, scores and image are
filled in from legitimate local copies only: the work area (`OUT/_work/`, kept with
`engine.keep_work: true`) holds every sample as it entered the phase that dropped it; otherwise
the captions are read back from the source named in the recipe, when that file still exists
(bounded by `max_source_rows`). Nothing is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import registry, schema
from curate.drop_log import IMAGE, iter_drops, sample_drops
from curate.report.reader import Output, iter_tar_samples, read_group, row_groups
from curate.stage import RecipeError

SAMPLE_COLUMNS = ["key", "kind", "images.list.element.bytes", "image_meta.list.element.url",
                  "image_meta.list.element.width", "image_meta.list.element.height", "captions.list.element.name",
                  "captions.list.element.text", "scores.clip_score", "scores.aesthetic"]
DROP_COLUMNS = ["key", "url", "stage", "reason", "detail"]
DEFAULT_MAX_SOURCE_ROWS = 500_000


@dataclass
class Sample:
    """What the report shows of one sample; `reason` is None for a kept sample."""

    key: str
    kind: str | None = None
    caption: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    url: str | None = None
    stage: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass
class DropExamples:
    """Examples of one drop reason of one stage, with the manifest's count for it."""

    stage: str
    reason: str
    count: int
    samples: list[Sample]


def sample_from_row(row: dict[str, Any], sample: Sample | None = None) -> Sample:
    """Fill `sample` (or a new one) from a SAMPLE_SCHEMA row read with (a subset of) `SAMPLE_COLUMNS`."""
    sample = sample or Sample(key=row["key"])
    sample.kind = row.get("kind") or sample.kind
    images = row.get("images") or []
    metas = row.get("image_meta") or []
    if images and images[0] and images[0].get("bytes"):
        sample.image = images[0]["bytes"]
    if metas and metas[0]:
        sample.width, sample.height = metas[0].get("width"), metas[0].get("height")
        sample.url = sample.url or metas[0].get("url")
    sample.caption = schema.caption_text(row.get("captions")) or sample.caption
    scores = row.get("scores") or {}
    sample.scores = {name: float(v) for name, v in scores.items() if v is not None and np.isfinite(v)} or sample.scores
    return sample


def kept_samples(output: Output, count: int = 24, max_row_groups: int = 3) -> list[Sample]:
    """About `count` kept samples spread over at most `max_row_groups` row groups (or the first tar samples)."""
    groups = row_groups(output.shard_files("parquet"))
    if not groups:
        samples = []
        for row in iter_tar_samples(output.shard_files("webdataset"), with_images=True):
            if len(samples) >= count:
                break
            samples.append(sample_from_row(row))
        return samples
    spread_over = min(max_row_groups, len(groups))
    chosen = [groups[int(i * len(groups) / spread_over)] for i in range(spread_over)]
    per_group = -(-count // len(chosen))
    samples = []
    for group in chosen:
        table = read_group(group, SAMPLE_COLUMNS)
        if table.num_rows == 0:
            continue
        picks = np.unique(np.linspace(0, table.num_rows - 1, min(per_group, table.num_rows)).astype(int))
        samples.extend(sample_from_row(row) for row in table.take(pa.array(picks)).to_pylist())
    return samples[:count]


def lookup_parquet(files: list[Path], keys: set[str], columns: list[str] = SAMPLE_COLUMNS) -> dict[str, dict]:
    """Rows of `files` whose key is in `keys`, reading `columns` only of row groups that hold one."""
    found: dict[str, dict] = {}
    if not keys:
        return found
    wanted = pa.array(sorted(keys), pa.string())
    for group in row_groups(files):
        group_keys = read_group(group, ["key"]).column("key")
        mask = pc.is_in(group_keys, value_set=wanted)
        if not pc.any(mask).as_py():
            continue
        for row in read_group(group, columns).filter(mask).to_pylist():
            found.setdefault(row["key"], row)
        if len(found) == len(keys):
            break
    return found


def find_kept(output: Output, keys: set[str]) -> dict[str, Sample]:
    """The samples of `keys` present in the output's shards."""
    if output.shard_files("parquet"):
        return {key: sample_from_row(row) for key, row in lookup_parquet(output.shard_files("parquet"), keys).items()}
    found = {}
    for row in iter_tar_samples(output.shard_files("webdataset"), with_images=True):
        if row["key"] in keys:
            found[row["key"]] = sample_from_row(row)
            if len(found) == len(keys):
                break
    return found


def drop_examples(output: Output, per_reason: int = 6) -> list[DropExamples]:
    """The first `per_reason` drop-log rows of every (stage, reason), in funnel order, most frequent first."""
    counts = [(stage["name"], reason, count) for stage in output.manifest.get("stages", [])
              for reason, count in sorted(stage.get("dropped", {}).items(), key=lambda item: -item[1])]
    examples = {(stage, reason): DropExamples(stage, reason, count, []) for stage, reason, count in counts}
    drops = output.layout.drops
    if not drops.is_file():
        return list(examples.values())
    pending = set(examples)
    for table in iter_drops(drops, [*DROP_COLUMNS, IMAGE]):
        table = sample_drops(table)  # dropped samples; images removed from kept documents are not examples here
        for stage, reason in _pairs(table):
            if (stage, reason) not in examples:  # in the drop log but not in the manifest's funnel
                examples[(stage, reason)] = DropExamples(stage, reason, 0, [])
                pending.add((stage, reason))
        for stage, reason in list(pending):
            entry = examples[(stage, reason)]
            mask = pc.and_(pc.equal(table.column("stage"), stage), pc.equal(table.column("reason"), reason))
            for row in table.filter(mask).slice(0, per_reason - len(entry.samples)).to_pylist():
                entry.samples.append(Sample(key=row["key"], url=row["url"], stage=stage, reason=reason,
                                            detail=row["detail"]))
            if len(entry.samples) >= per_reason:
                pending.discard((stage, reason))
        if not pending:
            break
    return list(examples.values())


def _pairs(table: pa.Table) -> set[tuple[str, str]]:
    grouped = table.group_by(["stage", "reason"]).aggregate([])
    return set(zip(grouped.column("stage").to_pylist(), grouped.column("reason").to_pylist()))


def find_dropped(output: Output, keys: set[str]) -> dict[str, Sample]:
    """The drop-log rows of `keys` that dropped the whole sample, as samples (stage, reason, detail, URL)."""
    drops = output.layout.drops
    if not keys or not drops.is_file():
        return {}
    wanted = pa.array(sorted(keys), pa.string())
    found: dict[str, Sample] = {}
    for table in iter_drops(drops, [*DROP_COLUMNS, IMAGE]):
        table = sample_drops(table)
        for row in table.filter(pc.is_in(table.column("key"), value_set=wanted)).to_pylist():
            found.setdefault(row["key"], Sample(key=row["key"], url=row["url"], stage=row["stage"],
                                                reason=row["reason"], detail=row["detail"]))
        if len(found) == len(keys):
            break
    return found


def fill_dropped(output: Output, samples: list[Sample], max_source_rows: int = DEFAULT_MAX_SOURCE_ROWS) -> str:
    """Fill caption, scores and image of dropped `samples` from local copies; return where they came from."""
    targets = [s for s in samples if s.reason is not None and s.stage != "source"]
    if not targets:
        return "no dropped samples to show"
    if (output.layout.pool / "input").is_dir():
        _fill_from_pool(output, targets)
        return "captions, scores and images of dropped samples from the pool (_pool/)"
    if output.layout.work.is_dir():
        _fill_from_work_area(output, targets)
        return "captions, scores and images of dropped samples from the kept work area (_work/)"
    try:
        captions = _captions_from_source(output, {s.key for s in targets}, max_source_rows)
    except (RecipeError, OSError, ValueError, KeyError, pa.ArrowException) as error:
        return f"dropped samples: no image bytes are kept, and the source could not be read back ({error})"
    for sample in targets:
        sample.caption = captions.get(sample.key, sample.caption)
    found = "captions read back from the source" if captions else "the source has no captions for them"
    return (f"dropped samples: no image bytes are kept (the pool was deleted or not kept: engine.keep_pool); "
            f"{found}")


def _fill_from_pool(output: Output, samples: list[Sample]) -> None:
    """Look each sample up in the pool: its input row with every stage's annotations, image bytes included."""
    from curate.engine.pool import STATUS_FIELDS, Provider, ShardView

    layout = output.layout
    by_key = {sample.key: sample for sample in samples}
    stages = [stage["name"] for stage in output.manifest.get("stages", [])]
    for input_file in sorted((layout.pool / "input").glob("[0-9]*[0-9].parquet")):
        keys = set(pq.read_table(input_file, columns=["key"]).column("key").to_pylist())
        if not keys & by_key.keys():
            continue
        providers = []
        for name in stages:
            table = layout.shard_file(layout.annotation_phase(name), int(input_file.name.split(".")[0]))
            if table.is_file():
                status = {f.name for f in STATUS_FIELDS} | {"key"}
                provides = tuple(n for n in pq.read_schema(table).names if n not in status)
                providers.append(Provider(name, provides, str(table)))
        for batch, _, _ in ShardView(str(input_file), providers, with_images=True).batches(256):
            for row in batch.to_pylist():
                if row["key"] in by_key:
                    sample_from_row(row, by_key[row["key"]])


def _fill_from_work_area(output: Output, samples: list[Sample]) -> None:
    """Look each sample up in the work shards of the phase before the one that dropped it."""
    phases = output.stage_phases()
    phase_of = {stage["name"]: stage["phase"] for stage in output.manifest.get("stages", [])}
    by_input_phase: dict[str, list[Sample]] = {}
    for sample in samples:
        phase = phase_of.get(sample.stage)
        if phase in phases and phases.index(phase) > 0:
            by_input_phase.setdefault(phases[phases.index(phase) - 1], []).append(sample)
    for phase, members in by_input_phase.items():
        folder = output.layout.phase_dir(phase)
        files = sorted(f for f in folder.glob("[0-9]*.parquet") if not f.name.endswith(".drops.parquet"))
        rows = lookup_parquet(files, {s.key for s in members})
        for sample in members:
            if sample.key in rows:
                sample_from_row(rows[sample.key], sample)


def _captions_from_source(output: Output, keys: set[str], max_rows: int) -> dict[str, str]:
    """Stream the recipe's source (at most `max_rows` rows) and return the captions of `keys`."""
    spec = dict(output.manifest["recipe"]["resolved"]["source"])
    source_type = spec.pop("type", None)
    if source_type not in registry.SOURCES:
        raise ValueError(f"source type {source_type!r} is not registered")
    target = registry.SOURCES[source_type]
    source_cls = registry.import_target(target)
    recipe_dir = Path(output.manifest["recipe"].get("file") or ".").parent
    source = source_cls(source_cls.Params(**spec), recipe_dir=str(recipe_dir))
    source.preflight()
    wanted = pa.array(sorted(keys), pa.string())
    found: dict[str, str] = {}
    seen = 0
    batches = source.iter_batches(8192)
    try:
        for batch in batches:
            mask = pc.is_in(batch.column("key"), value_set=wanted)
            for row in batch.filter(mask).select(["key", "captions"]).to_pylist():
                text = schema.caption_text(row["captions"])
                if text is not None:
                    found[row["key"]] = text
            seen += batch.num_rows
            if len(found) == len(keys) or seen >= max_rows:
                break
    finally:
        getattr(batches, "close", lambda: None)()  # release the source's file now, not at garbage collection
    return found
