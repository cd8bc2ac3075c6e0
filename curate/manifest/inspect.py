"""Render a manifest in the terminal: funnel, drops by reason, shards, quantiles; and the annotations' kept and
dropped distributions (`render_annotations`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from curate.report.distributions import AnnotationDistributions, MetricDistribution, quantiles


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


BLOCKS = " ▁▂▃▄▅▆▇█"


def _bars(counts: np.ndarray, top: int) -> str:
    """One character per bin, its height scaled to `top`; any non-zero count shows."""
    levels = np.ceil(counts * (len(BLOCKS) - 1) / max(top, 1)).astype(int)
    return "".join(BLOCKS[level] for level in levels)


def _left(label: str) -> str:
    """The label column of a histogram line; a threshold's mark goes under its bin, this far right."""
    return f"  {label:<8}│"


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _metric_block(distribution: MetricDistribution) -> Group:
    """Counts, quantiles, a kept/dropped text histogram and the thresholds of one metric."""
    metric, kept, dropped = distribution.metric, distribution.kept, distribution.dropped
    title = Text(f"\n{metric.name}", style="bold")
    title.append(f"  stage {distribution.stage}" + (f" · {metric.description}" if metric.description else ""),
                 style="dim")
    by = ", ".join(f"{stage} {count:,}" for stage, count in distribution.dropped_counts().items())
    counts = Text(f"  {distribution.annotated:,} annotated: {kept.size:,} kept, {dropped.size:,} dropped"
                  + (f" ({by})" if by else "") + (f", {distribution.missing:,} without a value"
                                                   if distribution.missing else ""))
    lines: list[Any] = [title, counts]
    if not kept.size and not dropped.size:
        return Group(*lines)
    table = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False)
    table.add_column("  ", no_wrap=True)
    for name in ("rows", "p5", "p50", "p95"):
        table.add_column(name, justify="right")
    for label, values, style in (("kept", kept, "blue"), ("dropped", dropped, "red")):
        found = quantiles(values)
        table.add_row(Text(f"  {label}", style=style), f"{values.size:,}",
                      *(_value(found.get(q)) for q in ("p5", "p50", "p95")))
    lines.append(table)
    histogram = distribution.histogram()
    dropped_counts = histogram.own + histogram.other
    top = int(max(histogram.kept.max(initial=0), dropped_counts.max(initial=0)))
    low, high = histogram.edges[0], histogram.edges[-1]
    infinite = int((~np.isfinite(kept)).sum() + (~np.isfinite(dropped)).sum())
    span = f"{_value(low)} … {_value(high)}" + (f" ({infinite:,} infinite, not drawn)" if infinite else "")
    lines.append(Text(f"{_left('kept')}{_bars(histogram.kept, top)}│ {span}", style="blue"))
    lines.append(Text(f"{_left('dropped')}{_bars(dropped_counts, top)}│", style="red"))
    measured = kept.size + dropped.size
    for threshold, outside in distribution.cuts():
        side = "below" if threshold.bound == "min" else "above"
        label = (f"{threshold.param} {threshold.value:g}: {outside:,} of {measured:,} annotated values {side} "
                 f"({100 * outside / measured:.1f}%)")
        at = histogram.position(threshold.value)
        mark = " " * (len(_left("")) + at) + "▲ " if at is not None else "  (off the chart) "
        lines.append(Text(mark + label, style="yellow"))
    return Group(*lines)


def render_annotations(distributions: AnnotationDistributions, console: Console) -> None:
    """Print every annotation's distribution over the annotated rows, kept and dropped apart, with the
    recipe's thresholds (curate/report/distributions.py)."""
    console.print(Text("\nAnnotations: kept and dropped", style="bold"))
    console.print(Text("  each stage's values over every row it annotated; dropped: rows dropped as a whole, by the "
                       "stage named; ▲ a threshold of the recipe", style="dim"))
    for note in distributions.notes:
        console.print(Text(f"  {note}", style="yellow"))
    if not distributions.pool:
        return
    if not distributions.metrics and not distributions.notes:
        console.print(Text("  no stage of this recipe records a numeric annotation"))
    for distribution in distributions.metrics:
        console.print(_metric_block(distribution))
