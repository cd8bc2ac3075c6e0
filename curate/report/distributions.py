"""Every annotation's distribution over all the rows a stage annotated, kept and dropped apart.

Read from the pool (OUT/_pool/annotations/<stage>/NNNNN.parquet, curate/engine/pool.py): for each stage
of the resolved recipe and each of its `metrics()`, the values of the rows the stage annotated
(`_annotated`), split by the drop log (OUT/drops.parquet) into kept rows and rows dropped as a whole,
by whichever stage dropped them; with the recipe's `thresholds()` and a corpus-wide decision's
threshold on the same score. Tables are read one record batch at a time and only their numbers are
kept (a float32 value and an int16 stage code per row and metric).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import registry, storage
from curate.engine.pool import ANNOTATED
from curate.files import RunLayout, read_json
from curate.metrics import Metric, Threshold, read_values
from curate.report.drop_index import KEPT, DropIndex
from curate.stage import Stage

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 40
BATCH_ROWS = 65_536
_TABLE = re.compile(r"^(\d+)\.parquet$")
_MARKER = re.compile(r"^(\d+)\.done\.json$")


@dataclass(frozen=True)
class Histogram:
    """Counts over shared bins (`edges`): kept rows, rows dropped by the metric's own stage, by other stages."""

    edges: np.ndarray
    kept: np.ndarray
    own: np.ndarray
    other: np.ndarray

    def position(self, value: float) -> int | None:
        """The bin `value` falls in, None when it is outside the bins."""
        if not self.edges[0] <= value <= self.edges[-1]:
            return None
        return int(min(np.searchsorted(self.edges, value, side="right") - 1, len(self.edges) - 2))


@dataclass
class MetricDistribution:
    """One metric of one stage over the rows the stage annotated.

    `kept` and `dropped` hold the values (rows without one left out); `dropped_by[i]` is the index in
    `stages` of the stage that dropped the row of `dropped[i]`.
    """

    stage: str
    metric: Metric
    thresholds: list[Threshold]
    annotated: int
    kept: np.ndarray
    dropped: np.ndarray
    dropped_by: np.ndarray
    stages: list[str]

    @property
    def missing(self) -> int:
        """Annotated rows without a value (not judged, not applicable, hard-dropped before measuring)."""
        return self.annotated - self.kept.size - self.dropped.size

    def dropped_counts(self) -> dict[str, int]:
        """Rows with a value dropped, per dropping stage, most first."""
        counts = np.bincount(self.dropped_by, minlength=len(self.stages)) if self.dropped_by.size else []
        pairs = [(self.stages[code], int(count)) for code, count in enumerate(counts) if count]
        return dict(sorted(pairs, key=lambda pair: -pair[1]))

    def dropped_values(self, stage: str) -> np.ndarray:
        """The values of the rows `stage` dropped."""
        if stage not in self.stages:
            return self.dropped[:0]
        return self.dropped[self.dropped_by == self.stages.index(stage)]

    def cuts(self) -> list[tuple[Threshold, int]]:
        """Each threshold with the number of values (kept or dropped) outside it."""
        return [(t, int(t.outside(self.kept).sum() + t.outside(self.dropped).sum())) for t in self.thresholds]

    def histogram(self, bins: int = BINS) -> Histogram:
        """Kept, own-dropped and other-dropped counts over bins shared by all three."""
        own = self.dropped_by == (self.stages.index(self.stage) if self.stage in self.stages else -2)
        edges = bin_edges([self.kept, self.dropped], [t.value for t in self.thresholds], bins)
        span = (float(edges[0]), float(edges[-1]))  # the edges are evenly spaced: numpy's fast path
        counts = [np.histogram(values[np.isfinite(values)], len(edges) - 1, span)[0]
                  for values in (self.kept, self.dropped[own], self.dropped[~own])]
        return Histogram(edges, *counts)


@dataclass
class AnnotationDistributions:
    """The distributions of an output's annotations; `pool` False when there was no pool to read."""

    pool: bool
    metrics: list[MetricDistribution] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def quantiles(values: np.ndarray) -> dict[str, float]:
    """p5, p25, p50, p75, p95 of the finite `values` (empty without any)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {}
    found = np.quantile(finite.astype(np.float64), QUANTILES)
    return {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, found)}


def bin_edges(parts: list[np.ndarray], limits: list[float], bins: int = BINS) -> np.ndarray:
    """Evenly spaced bin edges over the finite values of `parts` and the `limits` not far from them (within
    the larger of their range and their magnitude); one bin per integer when all are whole numbers over fewer
    than `bins`."""
    finite = [values[np.isfinite(values)] for values in parts]
    finite = [values for values in finite if values.size]
    if finite:
        low, high = min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)
        span = max(high - low, abs(low), abs(high), 1e-9)
        near = [v for v in limits if np.isfinite(v) and low - span <= v <= high + span]
    else:
        near = [v for v in limits if np.isfinite(v)]
        low, high = (min(near), max(near)) if near else (0.0, 1.0)
    low, high = min([low, *near]), max([high, *near])
    whole = bool(finite) and all(np.array_equal(v, np.round(v)) for v in finite) and \
        all(float(v).is_integer() for v in near)
    if whole and high - low < bins:
        return np.arange(low - 0.5, high + 1.5)
    if high == low:
        return np.array([low - 0.5, high + 0.5])
    return np.linspace(low, high, bins + 1)


def read_annotation_distributions(root: Any, manifest: dict[str, Any] | None = None) -> AnnotationDistributions:
    """The distributions of every metric of every stage of the output in `root` (a folder, local or in a
    store), from its pool; `manifest` when already read."""
    layout = RunLayout(root)
    manifest = manifest if manifest is not None else read_json(layout.manifest)
    if not layout.pool.is_dir():
        kept = (manifest.get("pool") or {}).get("kept")
        why = "the recipe set engine.keep_pool: false" if kept is False else "it was deleted"
        return AnnotationDistributions(False, notes=[f"no pool in this output ({why}): only the kept samples' "
                                                     "distributions can be shown"])
    result = AnnotationDistributions(True)
    index = DropIndex(np.zeros(0, np.uint64), np.zeros(0, np.int16), [])
    if not layout.drops.is_file():
        result.notes.append("drops.parquet is missing: every annotated row counts as kept")
    else:
        try:
            index = DropIndex.read(layout.drops)
        except (OSError, pa.ArrowException) as error:
            result.notes.append(f"drops.parquet cannot be read ({error}): kept and dropped rows cannot be told apart")
            return result
    for name, params in (manifest.get("recipe", {}).get("resolved", {}).get("stages") or {}).items():
        stage = _stage(name, params, result.notes)
        if stage is None:
            continue
        metrics = stage.metrics()
        if metrics:
            thresholds = [*stage.thresholds(), *_decided(manifest, metrics)]
            result.metrics += _read_stage(layout, name, metrics, thresholds, index, result.notes,
                                          _files_elsewhere(layout, manifest, name))
    return result


def _stage(name: str, params: Any, notes: list[str]) -> Stage | None:
    """The recipe's stage `name` with its resolved params; None for a stage without metrics or unknown here."""
    target = registry.STAGES.get(name)
    if target is None:
        return None
    cls = registry.import_target(target)
    if cls.metrics is Stage.metrics:
        return None
    try:
        return cls(cls.Params.model_validate(params or {}))
    except Exception as error:  # noqa: BLE001 - a recipe of another version: say so and show the others
        notes.append(f"{name}: its recipe params do not load here ({type(error).__name__}); not shown")
        return None


def _decided(manifest: dict[str, Any], metrics: list[Metric]) -> list[Threshold]:
    """Thresholds a corpus-wide decision set on one of `metrics` (top_fraction: rows below are dropped)."""
    names = {m.name for m in metrics}
    return [Threshold(summary["score"], float(summary["threshold"]), "min", f"{stage} threshold")
            for stage, summary in (manifest.get("decisions") or {}).items()
            if summary.get("score") in names and isinstance(summary.get("threshold"), (int, float))]


def _tables(folder: Any) -> tuple[list[Any], int]:
    """A stage's annotation tables in work-shard order, and how many work shards it completed."""
    if not folder.is_dir():
        return [], 0
    tables, markers = {}, 0
    for path in folder.glob("*"):
        found = _TABLE.match(path.name)
        if found:
            tables[int(found.group(1))] = path
        markers += bool(_MARKER.match(path.name))
    return [tables[shard] for shard in sorted(tables)], max(markers, len(tables))


def _files_elsewhere(layout: RunLayout, manifest: dict[str, Any], name: str) -> tuple[list[Any], int] | None:
    """For an output made with --pool: each work shard's table of stage `name`, from this output's pool or the
    one it reads, as the run chose them (None: the output reads its own pool only)."""
    pool = manifest.get("pool") or {}
    if not pool.get("reads"):
        return None
    from curate.engine.reuse import PoolPlaces
    from curate.engine.split import INPUT_PHASE

    entry = (pool.get("annotations") or {}).get(name)
    fingerprint = entry.get("fingerprint") if isinstance(entry, dict) else entry
    places = PoolPlaces(layout, RunLayout(pool["reads"]))
    summary = places.split.phase_dir(INPUT_PHASE) / "_SUCCESS.json"
    shards = read_json(summary)["shards"] if summary.exists() else 0
    files = [storage.location(places.table_file(name, shard, fingerprint)) for shard in range(shards)]
    return [file for file in files if file.exists()], shards


def _read_stage(layout: RunLayout, name: str, metrics: list[Metric], thresholds: list[Threshold],
                index: DropIndex, notes: list[str],
                elsewhere: tuple[list[Any], int] | None = None) -> list[MetricDistribution]:
    files, shards = elsewhere or _tables(layout.pool / layout.annotation_phase(name))
    if not files:
        notes.append(f"{name}: no annotation tables in the pool")
        return []
    if len(files) < shards:
        notes.append(f"{name}: {shards - len(files)} of {shards} work shards' annotation tables were released; "
                     "their rows are not counted")
    kept: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    dropped: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    codes: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    annotated = 0
    wanted = {"key", ANNOTATED, *(c for m in metrics for c in m.needs)}
    for file in files:
        try:
            parquet = storage.parquet_file(file)
            columns = [c for c in parquet.schema_arrow.names if c in wanted]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                table = pa.Table.from_batches([batch])
                if ANNOTATED in table.column_names:
                    table = table.filter(pc.fill_null(table.column(ANNOTATED), False))
                annotated += table.num_rows
                code = index.lookup(table.column("key"))
                for metric_name, values in read_values(table, metrics).items():
                    has = ~np.isnan(values)
                    kept[metric_name].append(values[has & (code == KEPT)])
                    dropped[metric_name].append(values[has & (code != KEPT)])
                    codes[metric_name].append(code[has & (code != KEPT)])
        except (OSError, pa.ArrowException) as error:
            notes.append(f"{name}: cannot read {file.name} ({error}); its rows are not counted")
    return [MetricDistribution(name, m, [t for t in thresholds if t.metric == m.name], annotated,
                               _joined(kept[m.name], np.float32), _joined(dropped[m.name], np.float32),
                               _joined(codes[m.name], np.int16), index.stages) for m in metrics]


def _joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
