"""Distributions of the kept samples: scores, image sizes, caption lengths, roles.

Read from the output's Parquet shards (only the needed leaf columns; evenly spread row groups
when the output has more than `max_rows` rows), else from its WebDataset tars (the first
`max_rows` samples' JSON records).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema
from curate.report.reader import Output, iter_tar_samples, read_group, row_groups, spread

DEFAULT_MAX_ROWS = 200_000
SCORES = ("clip_score", "aesthetic")
NUMERIC = (*SCORES, "width", "height", "caption_chars", "caption_words")
_COLUMNS = ["scores.clip_score", "scores.aesthetic", "image_meta.list.element.width",
            "image_meta.list.element.height", "captions.list.element.name", "captions.list.element.text",
            "roles.list.element"]


@dataclass
class Distributions:
    """Values per field (`NUMERIC`; nulls and NaN left out), role counts, and how many rows they come from."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    roles: Counter = field(default_factory=Counter)
    rows_without_role: int = 0
    rows_read: int = 0
    rows_total: int = 0
    read_from: str | None = None  # "parquet", "webdataset", or None when the output has no readable shards

    @property
    def sampled(self) -> bool:
        return self.rows_read < self.rows_total


def read_distributions(output: Output, max_rows: int = DEFAULT_MAX_ROWS) -> Distributions:
    """The distributions of `output`'s kept samples, from at least `max_rows` rows (or all of them)."""
    parquet = output.shard_files("parquet")
    if parquet:
        return _from_parquet(output, max_rows)
    tars = output.shard_files("webdataset")
    if tars:
        return _from_tars(output, max_rows)
    return Distributions(rows_total=int(output.manifest.get("outputs", {}).get("rows", 0)))


def _from_parquet(output: Output, max_rows: int) -> Distributions:
    groups = row_groups(output.shard_files("parquet"))
    chosen = spread(groups, max_rows)
    collected: dict[str, list[float]] = {name: [] for name in NUMERIC}
    result = Distributions(rows_total=sum(g.rows for g in groups), read_from="parquet")
    for group in chosen:
        table = read_group(group, _COLUMNS)
        result.rows_read += table.num_rows
        _collect_table(table, collected)
        if len(chosen) == len(groups):
            _count_roles(table, result)
    if len(chosen) < len(groups):  # roles are cheap to read: count them exactly over every row group
        for group in groups:
            _count_roles(read_group(group, ["roles.list.element"]), result)
    result.values = {name: np.asarray(values, dtype=np.float64) for name, values in collected.items()}
    return result


def _collect_table(table: pa.Table, collected: dict[str, list[float]]) -> None:
    names = table.column_names
    if "scores" in names:
        scores = table.column("scores")
        for score in SCORES:
            if scores.type.get_field_index(score) >= 0:
                collected[score].extend(_finite(pc.struct_field(scores, score).to_pylist()))
    if "image_meta" in names:
        flat = pc.list_flatten(table.column("image_meta"))
        for size in ("width", "height"):
            if flat.type.get_field_index(size) >= 0:
                collected[size].extend(_finite(pc.struct_field(flat, size).to_pylist()))
    if "captions" in names:
        for captions in table.column("captions").to_pylist():
            _collect_caption(schema.caption_text(captions), collected)


def _collect_caption(text: str | None, collected: dict[str, list[float]]) -> None:
    if text is not None:
        collected["caption_chars"].append(len(text))
        collected["caption_words"].append(len(text.split()))


def _count_roles(table: pa.Table, result: Distributions) -> None:
    if "roles" not in table.column_names:
        return
    for roles in table.column("roles").to_pylist():
        _add_roles(roles, result)


def _add_roles(roles: list[str] | None, result: Distributions) -> None:
    if roles:
        result.roles.update(roles)
    else:
        result.rows_without_role += 1


def _from_tars(output: Output, max_rows: int) -> Distributions:
    collected: dict[str, list[float]] = {name: [] for name in NUMERIC}
    result = Distributions(rows_total=int(output.manifest.get("outputs", {}).get("rows", 0)), read_from="webdataset")
    for row in iter_tar_samples(output.shard_files("webdataset")):
        if result.rows_read >= max_rows:
            break
        result.rows_read += 1
        scores = row["scores"] or {}
        for score in SCORES:
            collected[score].extend(_finite([scores.get(score)]))
        for meta in row["image_meta"]:
            for size in ("width", "height"):
                collected[size].extend(_finite([meta.get(size)]))
        _collect_caption(schema.caption_text(row["captions"]), collected)
        _add_roles(row["roles"], result)
    result.values = {name: np.asarray(values, dtype=np.float64) for name, values in collected.items()}
    return result


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def summarize(values: np.ndarray, quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, Any]:
    """Count, mean and quantiles (`p5`, `p25`, ...) of `values`; only the count when there are none."""
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "mean": float(values.mean()),
            "quantiles": {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in quantiles}}
