"""What changed between two outputs: recipe keys, rows per stage and per drop reason, images removed from
documents per stage and reason, score distributions.

`diff_outputs(a, b)` returns plain JSON data (`curate diff --json`); `render_diff` prints it as
rich tables. Score distributions are read from each output's shards (see
`curate.report.columns`) and compared by count, mean, quantiles and the two-sample
Kolmogorov-Smirnov statistic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console
from rich.table import Table

from curate.drop_log import images_removed
from curate.recipe import EXECUTION_ONLY
from curate.report.columns import DEFAULT_MAX_ROWS, SCORES, read_distributions, summarize
from curate.report.reader import Output, open_output

_ABSENT = object()
TOTALS = ("input_rows", "output_rows", "dropped_rows")


def flatten_changes(a: Any, b: Any, prefix: str = "") -> Iterator[dict[str, Any]]:
    """Dotted keys whose values differ between two nested mappings.

    Mappings are compared key by key; anything else (lists included) as a whole. A key present
    on one side only is `added` or `removed` with its whole value.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            yield from flatten_changes(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}{key}.")
        return
    if a is _ABSENT:
        yield {"key": prefix[:-1], "change": "added", "a": None, "b": b}
    elif b is _ABSENT:
        yield {"key": prefix[:-1], "change": "removed", "a": a, "b": None}
    elif a != b or type(a) is not type(b):
        yield {"key": prefix[:-1], "change": "changed", "a": a, "b": b}


def _execution_only(key: str) -> bool:
    section, _, rest = key.partition(".")
    return rest in EXECUTION_ONLY.get(section, ())


def recipe_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Changed dotted keys of the two manifests' resolved recipes, execution-only settings marked."""
    changes = list(flatten_changes(a["recipe"].get("resolved", {}), b["recipe"].get("resolved", {})))
    for change in changes:
        change["execution_only"] = _execution_only(change["key"])
    return changes


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def stage_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in, out and dropped per stage in A and B (None where a stage is absent) and their deltas."""
    by_name_a = {stage["name"]: stage for stage in a.get("stages", [])}
    by_name_b = {stage["name"]: stage for stage in b.get("stages", [])}
    names = [*by_name_a, *(name for name in by_name_b if name not in by_name_a)]
    rows = []
    for name in names:
        row: dict[str, Any] = {"stage": name}
        for field in ("rows_in", "rows_out"):
            value_a = by_name_a[name][field] if name in by_name_a else None
            value_b = by_name_b[name][field] if name in by_name_b else None
            row[field] = {"a": value_a, "b": value_b, "delta": _delta(value_a, value_b)}
        dropped_a = sum(by_name_a[name]["dropped"].values()) if name in by_name_a else None
        dropped_b = sum(by_name_b[name]["dropped"].values()) if name in by_name_b else None
        row["dropped"] = {"a": dropped_a, "b": dropped_b, "delta": _delta(dropped_a, dropped_b)}
        rows.append(row)
    return rows


def reason_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows dropped per (stage, reason) in A and B (0 where absent) and the delta."""
    def counts(manifest: dict[str, Any]) -> dict[tuple[str, str], int]:
        return {(stage["name"], reason): count for stage in manifest.get("stages", [])
                for reason, count in stage.get("dropped", {}).items()}

    counts_a, counts_b = counts(a), counts(b)
    keys = [*counts_a, *(key for key in counts_b if key not in counts_a)]
    return [{"stage": stage, "reason": reason, "a": counts_a.get((stage, reason), 0),
             "b": counts_b.get((stage, reason), 0),
             "delta": counts_b.get((stage, reason), 0) - counts_a.get((stage, reason), 0)} for stage, reason in keys]


def image_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Images removed from documents per (stage, reason) in A and B (stage counters `images_removed.<reason>`;
    0 where absent) and the delta. Apart from `reason_rows`: these are images, not dropped samples."""
    def counts(manifest: dict[str, Any]) -> dict[tuple[str, str], int]:
        return {(stage["name"], reason): count for stage in manifest.get("stages", [])
                for reason, count in images_removed(stage).items()}

    counts_a, counts_b = counts(a), counts(b)
    keys = [*counts_a, *(key for key in counts_b if key not in counts_a)]
    return [{"stage": stage, "reason": reason, "a": counts_a.get((stage, reason), 0),
             "b": counts_b.get((stage, reason), 0),
             "delta": counts_b.get((stage, reason), 0) - counts_a.get((stage, reason), 0)} for stage, reason in keys]


def _count_rows(a: dict[str, int], b: dict[str, int], label: str) -> list[dict[str, Any]]:
    keys = [*a, *(key for key in b if key not in a)]
    return [{label: key, "a": a.get(key, 0), "b": b.get(key, 0), "delta": b.get(key, 0) - a.get(key, 0)}
            for key in keys]


def ks_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if x.size == 0 or y.size == 0:
        return float("nan")
    x, y = np.sort(x), np.sort(y)
    points = np.concatenate([x, y])
    gap = np.searchsorted(x, points, side="right") / x.size - np.searchsorted(y, points, side="right") / y.size
    return float(np.max(np.abs(gap)))


def ks_pvalue(statistic: float, n: int, m: int) -> float:
    """Asymptotic p-value of a two-sample KS statistic (Kolmogorov distribution with Stephens' correction)."""
    if n == 0 or m == 0 or not np.isfinite(statistic):
        return float("nan")
    effective = np.sqrt(n * m / (n + m))
    lam = (effective + 0.12 + 0.11 / effective) * statistic
    if lam < 0.2:
        return 1.0
    k = np.arange(1, 101)
    value = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam**2))
    return float(min(1.0, max(0.0, value)))


def score_shifts(a: Output, b: Output, max_rows: int = DEFAULT_MAX_ROWS) -> dict[str, dict[str, Any]]:
    """Per score present in either output: summaries in A and B, the KS statistic and its p-value."""
    values_a = read_distributions(a, max_rows).values
    values_b = read_distributions(b, max_rows).values
    shifts = {}
    for score in SCORES:
        x = values_a.get(score, np.zeros(0))
        y = values_b.get(score, np.zeros(0))
        if x.size == 0 and y.size == 0:
            continue
        statistic = ks_statistic(x, y)
        pvalue = ks_pvalue(statistic, x.size, y.size)
        shifts[score] = {"a": summarize(x), "b": summarize(y),  # None where a side has no scores (JSON has no NaN)
                         "ks": statistic if np.isfinite(statistic) else None,
                         "ks_pvalue": pvalue if np.isfinite(pvalue) else None}
    return shifts


def diff_outputs(a: str | Path, b: str | Path, max_rows: int = DEFAULT_MAX_ROWS) -> dict[str, Any]:
    """What changed from output A to output B, as JSON data; `identical` when nothing that shapes the output did.

    Raises `curate.report.reader.OutputUnreadable` when either folder has no readable manifest.
    """
    output_a, output_b = open_output(a), open_output(b)
    ma, mb = output_a.manifest, output_b.manifest
    changes = recipe_changes(ma, mb)
    totals_a, totals_b = ma.get("reconciliation", {}), mb.get("reconciliation", {})
    result = {
        "a": str(output_a.root),
        "b": str(output_b.root),
        "recipe": {"a": {"name": ma["recipe"].get("name"), "sha256": ma["recipe"].get("sha256")},
                   "b": {"name": mb["recipe"].get("name"), "sha256": mb["recipe"].get("sha256")},
                   "changes": changes},
        "totals": [{"total": name, "a": totals_a.get(name), "b": totals_b.get(name),
                    "delta": _delta(totals_a.get(name), totals_b.get(name))} for name in TOTALS],
        "stages": stage_rows(ma, mb),
        "drop_reasons": reason_rows(ma, mb),
        "images_removed": image_rows(ma, mb),
        "kinds": _count_rows(ma.get("kinds") or {}, mb.get("kinds") or {}, "kind"),
        "scores": score_shifts(output_a, output_b, max_rows),
    }
    result["identical"] = _identical(result)
    return result


def _identical(result: dict[str, Any]) -> bool:
    if any(not change["execution_only"] for change in result["recipe"]["changes"]):
        return False
    deltas = [row["delta"] for row in (*result["totals"], *result["drop_reasons"], *result.get("images_removed", []),
                                       *result["kinds"])]
    deltas += [row[field]["delta"] for row in result["stages"] for field in ("rows_in", "rows_out", "dropped")]
    if any(delta != 0 for delta in deltas):
        return False
    return all(shift["ks"] == 0 and shift["a"] == shift["b"] for shift in result["scores"].values())


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _signed(delta: int | None) -> str:
    if delta is None:
        return "—"
    if delta == 0:
        return "0"
    return f"[green]+{delta:,}[/]" if delta > 0 else f"[red]{delta:,}[/]"


def render_diff(result: dict[str, Any], console: Console) -> None:
    """Print `result` of `diff_outputs` as tables: recipe, totals, stages, drop reasons, kinds, scores."""
    console.print(f"[bold]A[/] {result['a']}  (recipe {result['recipe']['a']['name']}, "
                  f"sha256 {str(result['recipe']['a']['sha256'])[:12]})", highlight=False)
    console.print(f"[bold]B[/] {result['b']}  (recipe {result['recipe']['b']['name']}, "
                  f"sha256 {str(result['recipe']['b']['sha256'])[:12]})", highlight=False)
    if result["identical"]:
        console.print("[green]no differences[/]: same recipe (up to execution-only settings), same counts, "
                      "same score distributions")
    changes = result["recipe"]["changes"]
    if changes:
        table = Table(title="Recipe changes", title_justify="left")
        table.add_column("key", no_wrap=True)
        for column in ("A", "B", ""):
            table.add_column(column, overflow="fold")
        for change in changes:
            note = "execution only" if change["execution_only"] else change["change"]
            table.add_row(change["key"], _value(change["a"]), _value(change["b"]), note)
        console.print(table)
    counts = Table(title="Rows", title_justify="left")
    for column in ("", "A", "B", "Δ"):
        counts.add_column(column, justify="left" if not column else "right")
    for row in result["totals"]:
        counts.add_row(row["total"], _value(row["a"]), _value(row["b"]), _signed(row["delta"]))
    console.print(counts)
    stages = Table(title="Stages", title_justify="left")
    for column in ("stage", "out A", "out B", "Δ out", "dropped A", "dropped B", "Δ dropped"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for row in result["stages"]:
        out, dropped = row["rows_out"], row["dropped"]
        stages.add_row(row["stage"], _value(out["a"]), _value(out["b"]), _signed(out["delta"]),
                       _value(dropped["a"]), _value(dropped["b"]), _signed(dropped["delta"]))
    console.print(stages)
    if result["drop_reasons"]:
        reasons = Table(title="Drops by reason", title_justify="left")
        for column in ("stage", "reason", "A", "B", "Δ"):
            reasons.add_column(column, justify="left" if column in ("stage", "reason") else "right")
        for row in result["drop_reasons"]:
            reasons.add_row(row["stage"], row["reason"], f"{row['a']:,}", f"{row['b']:,}", _signed(row["delta"]))
        console.print(reasons)
    if result.get("images_removed"):
        removed = Table(title="Images removed from documents", title_justify="left")
        for column in ("stage", "reason", "A", "B", "Δ"):
            removed.add_column(column, justify="left" if column in ("stage", "reason") else "right")
        for row in result["images_removed"]:
            removed.add_row(row["stage"], row["reason"], f"{row['a']:,}", f"{row['b']:,}", _signed(row["delta"]))
        console.print(removed)
    if result["kinds"]:
        kinds = Table(title="Kinds", title_justify="left")
        for column in ("kind", "A", "B", "Δ"):
            kinds.add_column(column, justify="left" if column == "kind" else "right")
        for row in result["kinds"]:
            kinds.add_row(row["kind"], f"{row['a']:,}", f"{row['b']:,}", _signed(row["delta"]))
        console.print(kinds)
    if result["scores"]:
        scores = Table(title="Score distributions (kept samples)", title_justify="left")
        for column in ("score", "", "count", "mean", "p5", "p50", "p95", "KS", "p-value"):
            scores.add_column(column, justify="left" if column in ("score", "") else "right")
        for name, shift in result["scores"].items():
            for side in ("a", "b"):
                summary = shift[side]
                quantiles = summary.get("quantiles", {})
                last = side == "b"
                scores.add_row(name if side == "a" else "", side.upper(), f"{summary['count']:,}",
                               _value(summary.get("mean")),
                               *(_value(quantiles.get(q)) for q in ("p5", "p50", "p95")),
                               _value(shift["ks"]) if last else "", _value(shift["ks_pvalue"]) if last else "")
        console.print(scores)
