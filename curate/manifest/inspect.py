"""Render a manifest in the terminal: funnel, drops by reason, shards, quantiles."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table


def _funnel(manifest: dict[str, Any]) -> Table:
    table = Table(title="Funnel", title_justify="left")
    for column in ("stage", "phase", "in", "out", "dropped", "seconds"):
        table.add_column(column, justify="left" if column in ("stage", "phase") else "right")
    for stage in manifest["stages"]:
        table.add_row(stage["name"], stage["phase"], f"{stage['rows_in']:,}", f"{stage['rows_out']:,}",
                      f"{stage['rows_in'] - stage['rows_out']:,}", f"{stage['seconds']:.1f}")
    return table


def _drops(manifest: dict[str, Any]) -> Table:
    table = Table(title="Drops by reason", title_justify="left")
    table.add_column("stage")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for stage in manifest["stages"]:
        for reason, count in sorted(stage["dropped"].items(), key=lambda item: -item[1]):
            table.add_row(stage["name"], reason, f"{count:,}")
    return table


def _shards(manifest: dict[str, Any], limit: int = 12) -> Table:
    shards = manifest["outputs"]["shards"]
    table = Table(title=f"Shards ({len(shards)})", title_justify="left")
    for column in ("path", "rows", "MB", "sha256"):
        table.add_column(column, justify="right" if column in ("rows", "MB") else "left")
    for entry in shards[:limit]:
        table.add_row(entry["path"], f"{entry['rows']:,}", f"{entry['bytes'] / 1e6:.2f}", entry["sha256"][:16])
    if len(shards) > limit:
        table.add_row(f"… {len(shards) - limit} more", "", "", "")
    return table


def _quantiles(manifest: dict[str, Any]) -> Table:
    table = Table(title="Quantiles", title_justify="left")
    table.add_column("field")
    table.add_column("count", justify="right")
    for name in ("p5", "p50", "p95"):
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    for name, summary in manifest["statistics"].items():
        quantiles = summary.get("quantiles", {})
        table.add_row(name, f"{summary['count']:,}", *(f"{quantiles.get(q, float('nan')):.3g}" for q in
                                                      ("p5", "p50", "p95")), f"{summary.get('mean', 0):.3g}")
    return table


def render(manifest: dict[str, Any], console: Console) -> None:
    """Print the summary of `manifest` to `console`."""
    totals = manifest["reconciliation"]
    verdict = "[green]reconciles[/]" if totals["ok"] else "[red]DOES NOT RECONCILE[/]"
    header = (f"[bold]{manifest['recipe']['name']}[/]  recipe sha256 {manifest['recipe']['sha256'][:12]}  "
              f"device {manifest['device']['accelerator']}  {manifest['seconds']:.1f} s\n"
              f"{totals['input_rows']:,} in = {totals['output_rows']:,} out + {totals['dropped_rows']:,} dropped  "
              f"{verdict}  kinds {manifest['kinds']}")
    if manifest.get("trial"):
        trial = manifest["trial"]
        part = ", ".join(f"{name} {trial[name]}" for name in ("limit", "sample", "seed") if trial.get(name) is not None)
        header += f"\n[bold yellow]TRIAL[/] ({part}): {trial['rows_skipped']:,} input rows left out"
    console.print(Panel(header, title="curate manifest", expand=False))
    console.print(Group(_funnel(manifest), _drops(manifest), _shards(manifest), _quantiles(manifest)))
