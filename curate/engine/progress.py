"""A progress bar per phase with rows per second."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class RowsPerSecond(ProgressColumn):
    """Completed rows divided by elapsed seconds."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} rows/s", style="cyan")


def phase_progress(console: Console, enabled: bool = True) -> Progress:
    """A rich Progress showing phase name, bar, rows done / total, rows/s and elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
