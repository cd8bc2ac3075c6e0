"""What a stage measures and where it draws the line: `Metric` and `Threshold` (Stage.metrics / thresholds).

A metric is a number a stage's `annotate` writes for each sample, named with where the stage's
annotation table holds it. `path` starts with a column of the sample schema:

- a struct column and its fields, e.g. ``scores.clip_score``;
- ``meta`` (a JSON object kept as text) and keys inside it, e.g. ``meta.language.confidence``;
  there ``*`` stands for every item of a list and a last ``#`` counts the items found, e.g.
  ``meta.faces.*.#`` (faces per image). When a path finds several numbers in one sample (one per
  image, per turn), the sample's value is their `reduce` (``min`` or ``max``).

A metric computed from other numbers has `inputs` (their paths) and `combine`, a function of their
float arrays (NaN where missing) returning the metric's array, e.g. a ratio of two measurements. One
that needs more than numbers has `read`: a function of the row, given as {column: value} for its
`columns` (``meta`` parsed into a dict), returning a number or None; it is read row by row, slower.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import json as pa_json

JSON_COLUMNS = frozenset({"meta"})
JSON_BLOCK = 16 << 20  # bytes Arrow's JSON reader takes at a time; a longer line is read row by row


@dataclass(frozen=True)
class Metric:
    """A numeric annotation of a stage and where its annotation table holds it (see the module docstring)."""

    name: str
    path: str = ""
    description: str = ""
    reduce: Literal["min", "max"] = "max"
    inputs: tuple[str, ...] = ()  # with `combine`: the paths of the numbers it is computed from
    combine: Callable[..., np.ndarray] | None = None
    columns: tuple[str, ...] = ()  # with `read`: the columns it reads
    read: Callable[[dict[str, Any]], float | None] | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The annotation table columns the metric is read from."""
        if self.read is not None:
            return self.columns
        return tuple(dict.fromkeys(path.split(".")[0] for path in (self.inputs or (self.path,))))


@dataclass(frozen=True)
class Threshold:
    """A limit a stage's selection params put on one of its metrics: samples below a `min` or above a
    `max` are dropped. `param` names the setting (e.g. ``min_score``)."""

    metric: str
    value: float
    bound: Literal["min", "max"]
    param: str = ""

    def outside(self, values: np.ndarray) -> np.ndarray:
        """True where a value breaks the limit (NaN never does); compared at the values' precision, as the
        stages compare their float32 scores."""
        limit = np.asarray(self.value).astype(values.dtype) if values.dtype.kind == "f" else self.value
        with np.errstate(invalid="ignore"):
            return values < limit if self.bound == "min" else values > limit


def limits(params: Any, bounds: dict[str, tuple[str, Literal["min", "max"]]]) -> list[Threshold]:
    """The thresholds set in `params`: `bounds` maps a param to (metric, bound); unset (None) params are left out."""
    found = []
    for param, (metric, bound) in bounds.items():
        value = getattr(params, param, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(Threshold(metric, float(value), bound, param))
    return found


def read_values(table: pa.Table, metrics: list[Metric]) -> dict[str, np.ndarray]:
    """Each metric's value per row of `table` (an annotation table with the metrics' columns), float32,
    NaN where the row has none.

    Struct fields are read as columns; plain key paths into `meta` by Arrow's JSON reader, asked for those
    keys only; list paths, `read` functions and JSON Arrow cannot read (not one object per line, a value
    of another type) row by row in Python; `combine` metrics from the arrays of their inputs.
    """
    combined = [m for m in metrics if m.combine is not None]
    inputs = {path: Metric(path, path) for m in combined for path in m.inputs}
    values: dict[str, np.ndarray] = {}
    plain: list[Metric] = []
    by_row: list[Metric] = []
    for metric in [*(m for m in metrics if m.combine is None), *inputs.values()]:
        parts = metric.path.split(".")
        if metric.read is None and parts[0] not in JSON_COLUMNS:
            values[metric.name] = _struct_values(table, parts)
        elif metric.read is None and not {"*", "#"} & set(parts):
            plain.append(metric)
        else:
            by_row.append(metric)
    for column in sorted({m.needs[0] for m in plain}):
        of_column = [m for m in plain if m.needs[0] == column]
        parsed = _parse_json(table, column, [m.path.split(".")[1:] for m in of_column])
        if parsed is None:
            by_row += of_column
            continue
        for metric in of_column:
            values[metric.name] = _struct_values(parsed, metric.path.split(".")[1:])
    if by_row:
        values.update(_row_values(table, by_row))
    for metric in combined:
        with np.errstate(divide="ignore", invalid="ignore"):
            values[metric.name] = np.asarray(metric.combine(*(values[p] for p in metric.inputs)), np.float32)
    return {m.name: values[m.name] for m in metrics}


def _row_values(table: pa.Table, metrics: list[Metric]) -> dict[str, np.ndarray]:
    """`metrics` read row by row in Python (`meta` parsed once per row)."""
    columns = sorted({c for m in metrics for c in m.needs})
    rows = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in columns}
    for column in JSON_COLUMNS & set(columns):
        rows[column] = [_json_object(text) for text in rows[column]]
    values = {}
    for metric in metrics:
        if metric.read is not None:
            found = [metric.read(dict(zip(metric.needs, row))) for row in zip(*(rows[c] for c in metric.needs))]
        else:
            keys = metric.path.split(".")[1:]
            found = [_path_value(keys, metric.reduce, value) for value in rows[metric.needs[0]]]
        values[metric.name] = np.array([np.nan if v is None else v for v in found], dtype=np.float32)
    return values


def _parse_json(table: pa.Table, column: str, paths: list[list[str]]) -> pa.Table | None:
    """The JSON objects of `column`, one row each, with only the keys of `paths` (numbers as float64);
    None when Arrow's reader cannot read them (the caller reads them row by row)."""
    schema = _json_schema(paths)
    if schema is None or column not in table.column_names:
        return None
    if not table.num_rows:
        return schema.empty_table()
    texts = table.column(column).combine_chunks()
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(texts), ""), True)
    texts = pc.if_else(blank, "{}", texts)
    if pc.any(pc.match_substring(texts, "\n")).as_py():  # the reader takes one object per line
        return None
    data = ("\n".join(texts.to_pylist()) + "\n").encode()
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        parsed = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=JSON_BLOCK),
                                   parse_options=options)
    except pa.ArrowException:
        return None
    return parsed if parsed.num_rows == table.num_rows else None


def _json_schema(paths: list[list[str]]) -> pa.Schema | None:
    """Nested structs holding a float64 at the end of each path; None when one path runs through another."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                return None
        if isinstance(node.get(path[-1]), dict):
            return None
        node[path[-1]] = None

    def fields(node: dict[str, Any]) -> list[pa.Field]:
        return [pa.field(key, pa.float64() if child is None else pa.struct(fields(child)))
                for key, child in node.items()]

    return pa.schema(fields(tree))


def _struct_values(table: pa.Table, path: list[str]) -> np.ndarray:
    """The struct field at `path` (column first) as float32, NaN for nulls; all NaN when a table written
    before the field existed does not have it."""
    if path[0] not in table.column_names:
        return np.full(table.num_rows, np.nan, dtype=np.float32)
    column = table.column(path[0])
    for name in path[1:]:
        if not pa.types.is_struct(column.type) or column.type.get_field_index(name) < 0:
            return np.full(table.num_rows, np.nan, dtype=np.float32)
        column = pc.struct_field(column, name)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32)


def _json_object(text: str | None) -> dict:
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _path_value(keys: list[str], reduce: str, value: Any) -> float | None:
    """The number at `keys` in a parsed JSON value (`*`: every list item, `#`: the items' count), reduced."""
    items = [value]
    for key in keys:
        if key == "*":
            items = [item for value in items if isinstance(value, list) for item in value]
        elif key == "#":
            items = [len(value) for value in items if isinstance(value, list)]
        else:
            items = [value.get(key) for value in items if isinstance(value, dict)]
    numbers = [float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers = [v for v in numbers if not math.isnan(v)]
    if not numbers:
        return None
    return min(numbers) if reduce == "min" else max(numbers)
