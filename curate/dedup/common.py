"""What every dedup method shares: reading the columns, ordering rows, and writing the decision.

A method gives `decide_duplicates` the rows it can judge (a boolean mask: rows without
the method's hash or embedding are left alone), a function that finds edges between
ranks and its `keep` list; this module orders the rows by that list (policy.Preference),
applies the grouping policy and builds the decision table (drops, with which copy was kept
and why, and group annotations) and the summary (with `keep` and `kept_because`, the
removals counted per deciding criterion).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.dedup.policy import LEGACY_KEEP, Preference, Removal
from curate.dedup.policy import keep as apply_policy

EXAMPLE_GROUPS = 5
# (ranks i, ranks j, measure strings) for rows already in preference order
EdgeFinder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]]


def first_image_field(table: pa.Table, name: str) -> pa.Array:
    """Field `name` of image_meta[0] per row (null where the row has no image)."""
    column = table.column("image_meta").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0)
    present = pc.if_else(pc.greater(lengths, 0), column, pa.scalar(None, column.type))
    return pc.struct_field(pc.list_element(present, 0), name)


def clip_scores(table: pa.Table) -> np.ndarray:
    """clip_score per row as float64, NaN where missing."""
    if "scores" not in table.column_names or table.num_rows == 0:
        return np.full(table.num_rows, np.nan)
    values = pc.struct_field(table.column("scores").combine_chunks(), "clip_score")
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def pixels(table: pa.Table) -> np.ndarray:
    """width * height of image 0 per row (0 where unknown)."""
    if table.num_rows == 0:
        return np.zeros(0)
    width = first_image_field(table, "width").to_numpy(zero_copy_only=False)
    height = first_image_field(table, "height").to_numpy(zero_copy_only=False)
    return np.nan_to_num(np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64))


def decide_duplicates(
    method: str, table: pa.Table, judged: np.ndarray, policy: str, find_edges: EdgeFinder, summary: dict[str, Any],
    keep: Sequence[str] = LEGACY_KEEP,
) -> tuple[pa.Table, dict[str, Any]]:
    """Order the `judged` rows by `keep`, find their edges, keep by `policy`; return (decision table, summary).

    `find_edges(rows)` gets the table row indices in preference order and returns edges
    as rank pairs with their measures, plus extra summary fields (index type, ...).
    `keep` is a validated keep list (policy.keep_criteria); dedup_text uses the default.
    """
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise ValueError(f"dedup_{method}: sample keys are not unique")
    preference = Preference(table, keep)
    rows = preference.order(np.flatnonzero(judged))
    i, j, measures, extra = find_edges(rows)
    removals = apply_policy(policy, len(rows), list(zip(i.tolist(), j.tolist(), measures)))
    metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * len(keys)
    decision, groups, because = _decision(method, keys, metas, rows, removals, preference)
    examples = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))[:EXAMPLE_GROUPS]
    summary = {
        "method": method,
        **summary,
        "policy": policy,
        "keep": list(preference.keep),
        **extra,
        "judged": len(rows),
        "pairs": len(measures),
        "groups": len(groups),
        "removed": len(removals),
        "kept_because": because,
        "examples": [members for _, members in examples],
    }
    return decision, summary


def _decision(
    method: str, keys: list[str], metas: list[str | None], rows: np.ndarray, removals: list[Removal],
    preference: Preference,
) -> tuple[pa.Table, dict[int, list[str]], dict[str, int]]:
    """The decision rows (one per member of a group of two or more), the groups (kept rank -> keys),
    and the removals per deciding criterion.

    `rows` are the table rows in rank order; a removal's detail names the kept key, the
    closeness and the criterion that preferred the kept sample, with both values.
    """
    members: dict[int, list[int]] = {}
    for removal in removals:
        members.setdefault(removal.kept, [removal.kept]).append(removal.rank)
    removed = {removal.rank: removal for removal in removals}
    because = dict.fromkeys(preference.keep, 0)
    out = {"key": [], "reason": [], "detail": [], "annotation": []}
    for kept, ranks in sorted(members.items()):
        group = keys[rows[kept]]
        for rank in ranks:
            removal = removed.get(rank)
            out["key"].append(keys[rows[rank]])
            out["annotation"].append(annotation(metas[rows[rank]], method, group))
            if removal is None:
                out["reason"].append(None)
                out["detail"].append(None)
                continue
            criterion, why = preference.explain(int(rows[kept]), int(rows[rank]))
            if criterion is not None:
                because[criterion] += 1
            out["reason"].append(f"duplicate_{method}")
            out["detail"].append(_detail(group, removal, None if removal.via == kept else keys[rows[removal.via]], why))
    groups = {kept: [keys[rows[rank]] for rank in ranks] for kept, ranks in members.items()}
    types = pa.schema([(name, pa.string()) for name in out])
    return pa.table(out, schema=types), groups, because


def _detail(group: str, removal: Removal, via: str | None, why: str | None) -> str:
    """"duplicate of <kept key> (<measure>[ to <linking key>])[; kept for <criterion>: <kept> vs <removed>]"."""
    linked = f" to {via}" if via else ""
    kept_for = f"; kept for {why}" if why else ""
    return f"duplicate of {group} ({removal.measure}{linked}){kept_for}"


def annotation(meta: str | None, method: str, group: str) -> str:
    """The JSON merged into a sample's meta: {"dedup": {<method>: {"group": <kept key>}}}.

    The engine merges annotations one level deep, so the dedup entries of earlier
    methods, read from the sample's current meta, are carried over.
    """
    dedup: dict[str, Any] = {}
    if meta:
        try:
            current = json.loads(meta)
        except json.JSONDecodeError:
            current = None
        if isinstance(current, dict) and isinstance(current.get("dedup"), dict):
            dedup = dict(current["dedup"])
    dedup[method] = {"group": group}
    return json.dumps({"dedup": dedup}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
