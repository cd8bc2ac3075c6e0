"""Charts of an output as PNG bytes: funnel, drops by reason, score, size and caption-length histograms, and
each annotation's kept and dropped histogram with the recipe's thresholds (`annotation_pngs`).

Drawn with matplotlib's Agg canvas on standalone figures (no pyplot, no global backend), with the
PNG metadata left out so that the same output gives the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from curate.report.columns import Distributions, read_distributions
from curate.report.distributions import AnnotationDistributions, MetricDistribution
from curate.report.reader import open_output

KEPT = "#3b7dd8"
DROPPED = "#e8a0a0"
SECOND = "#f0a030"
OWN_DROP = "#c9473a"  # dropped by the stage whose annotation is drawn; DROPPED: by any other stage
THRESHOLD_COLOURS = ["#222222", "#9467bd", "#f0a030"]
PALETTE = ["#3b7dd8", "#e0664a", "#43a66b", "#9467bd", "#f0a030", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22"]
WIDTH = 6.4  # inches at 100 dpi


def plot_pngs(output_dir: Path) -> dict[str, bytes]:
    """PNG charts of the output in `output_dir`, by name.

    Names: `funnel` (rows in and out per stage), `drops_by_reason`, `clip_score`, `aesthetic`
    (histograms with the recipe's thresholds), `image_sizes` (stored width and height),
    `caption_length` (characters and words). A chart without data (no drops, no scores) is left out.
    """
    output = open_output(output_dir)
    return render_plots(output.manifest, read_distributions(output))


def render_plots(manifest: dict[str, Any], distributions: Distributions) -> dict[str, bytes]:
    """The charts of `plot_pngs` from an already read manifest and distributions."""
    charts: dict[str, bytes] = {}
    if manifest.get("stages"):
        charts["funnel"] = funnel_png(manifest)
    if any(stage.get("dropped") for stage in manifest.get("stages", [])):
        charts["drops_by_reason"] = drops_png(manifest)
    values = distributions.values
    for score, label in (("clip_score", "clip_score (cosine of image and caption embeddings)"),
                         ("aesthetic", "aesthetic score")):
        if values.get(score) is not None and values[score].size:
            charts[score] = histogram_png(values[score], label, thresholds(manifest, score))
    if values.get("width") is not None and values["width"].size:
        charts["image_sizes"] = sizes_png(values["width"], values.get("height", np.zeros(0)))
    if values.get("caption_chars") is not None and values["caption_chars"].size:
        charts["caption_length"] = caption_png(values["caption_chars"], values.get("caption_words", np.zeros(0)))
    return charts


def thresholds(manifest: dict[str, Any], score: str) -> list[tuple[str, float]]:
    """The recipe's limits on `score`: the scoring stage's min/max and a corpus-wide top-fraction threshold."""
    stages = manifest.get("recipe", {}).get("resolved", {}).get("stages", {})
    limits = []
    params = stages.get(score) or {}
    for bound in ("min_score", "max_score"):
        if isinstance(params.get(bound), (int, float)):
            limits.append((bound, float(params[bound])))
    for name, summary in (manifest.get("decisions") or {}).items():
        if summary.get("score") == score and isinstance(summary.get("threshold"), (int, float)):
            limits.append((f"{name} threshold", float(summary["threshold"])))
    return limits


def _figure(height: float) -> tuple[Figure, Any]:
    figure = Figure(figsize=(WIDTH, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _style(axes: Any) -> None:
    axes.spines[["top", "right"]].set_visible(False)
    axes.tick_params(labelsize=8)


def funnel_png(manifest: dict[str, Any]) -> bytes:
    """Horizontal bars per stage: rows kept, and rows dropped on top, labelled with the counts."""
    stages = manifest["stages"]
    figure, axes = _figure(0.3 * len(stages) + 0.9)
    names = [stage["name"] for stage in stages]
    kept = np.array([stage["rows_out"] for stage in stages])
    dropped = np.array([stage["rows_in"] - stage["rows_out"] for stage in stages])
    positions = np.arange(len(stages))[::-1]
    axes.barh(positions, kept, color=KEPT, label="rows out")
    axes.barh(positions, dropped, left=kept, color=DROPPED, label="dropped")
    top = max(int((kept + dropped).max(initial=0)), 1)
    for y, out, lost in zip(positions, kept, dropped):
        text = f"{out:,}" + (f"  (−{lost:,})" if lost else "")
        axes.text(out + lost + top * 0.01, y, text, va="center", fontsize=8)
    axes.set_yticks(positions, names)
    axes.set_xlim(0, top * 1.2)
    axes.set_xlabel("rows", fontsize=8)
    axes.set_title("Funnel: rows out of each stage", fontsize=10, loc="left")
    axes.legend(fontsize=8, loc="lower right", frameon=False)
    _style(axes)
    return _png(figure)


def drops_png(manifest: dict[str, Any]) -> bytes:
    """Horizontal bars per drop reason, most frequent on top, coloured by the stage that dropped."""
    entries = sorted(((count, stage["name"], reason) for stage in manifest["stages"]
                      for reason, count in stage.get("dropped", {}).items()), key=lambda e: (-e[0], e[1], e[2]))
    stage_names = list(dict.fromkeys(stage for _, stage, _ in entries))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(stage_names)}
    figure, axes = _figure(0.26 * len(entries) + 0.9)
    positions = np.arange(len(entries))[::-1]
    counts = [count for count, _, _ in entries]
    axes.barh(positions, counts, color=[colours[stage] for _, stage, _ in entries])
    for y, count in zip(positions, counts):
        axes.text(count + max(counts) * 0.01, y, f"{count:,}", va="center", fontsize=8)
    axes.set_yticks(positions, [reason for _, _, reason in entries])
    axes.set_xlim(0, max(counts) * 1.15)
    axes.set_xlabel("rows dropped", fontsize=8)
    axes.set_title("Drops by reason (colour: stage)", fontsize=10, loc="left")
    handles = [Patch(color=colours[name], label=name) for name in stage_names]
    axes.legend(handles=handles, fontsize=7, loc="lower right", frameon=False)
    _style(axes)
    return _png(figure)


def histogram_png(values: np.ndarray, label: str, limits: list[tuple[str, float]]) -> bytes:
    """A histogram of `values` with dashed lines at `limits` and the median."""
    figure, axes = _figure(2.5)
    axes.hist(values, bins=min(50, max(10, int(np.sqrt(values.size)))), color=KEPT)
    for index, (name, value) in enumerate(limits):
        axes.axvline(value, color=PALETTE[1 + index % 3], linestyle="--", linewidth=1.2, label=f"{name} {value:g}")
    median = float(np.median(values))
    axes.axvline(median, color="#333333", linestyle=":", linewidth=1, label=f"median {median:.3g}")
    axes.set_xlabel(label, fontsize=8)
    axes.set_ylabel("kept samples", fontsize=8)
    axes.set_title(f"{label.split(' ')[0]} of {values.size:,} kept samples", fontsize=10, loc="left")
    axes.legend(fontsize=7, frameon=False)
    _style(axes)
    return _png(figure)


def sizes_png(width: np.ndarray, height: np.ndarray) -> bytes:
    """Overlaid histograms of the stored images' widths and heights."""
    figure, axes = _figure(2.5)
    both = np.concatenate([width, height])
    bins = np.linspace(both.min(), both.max() + 1, 40)
    axes.hist(width, bins=bins, color=KEPT, alpha=0.65, label=f"width (median {np.median(width):.0f})")
    if height.size:
        axes.hist(height, bins=bins, color=SECOND, alpha=0.65, label=f"height (median {np.median(height):.0f})")
    axes.set_xlabel("pixels (stored image)", fontsize=8)
    axes.set_ylabel("images", fontsize=8)
    axes.set_title(f"Image sizes of {width.size:,} images", fontsize=10, loc="left")
    axes.legend(fontsize=7, frameon=False)
    _style(axes)
    return _png(figure)


def caption_png(chars: np.ndarray, words: np.ndarray) -> bytes:
    """Histograms of caption length in characters and in words, side by side."""
    figure = Figure(figsize=(WIDTH, 2.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for axes, values, unit, colour in ((left, chars, "characters", KEPT), (right, words, "words", SECOND)):
        if values.size:
            low, high = int(values.min()), int(values.max())
            bins = np.arange(low, high + 2) - 0.5 if high - low < 40 else 40  # one bar per length when few
            axes.hist(values, bins=bins, color=colour, rwidth=0.9)
            pad = max(0.0, (6 - (high - low)) / 2)  # a few lengths around a narrow range, so ticks are integers
            axes.set_xlim(low - 0.5 - pad, high + 0.5 + pad)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_title(f"median {np.median(values):.0f} {unit}", fontsize=8, loc="left")
        axes.set_xlabel(f"caption {unit}", fontsize=8)
        _style(axes)
    left.set_ylabel("captions", fontsize=8)
    figure.suptitle(f"Caption length of {chars.size:,} captions", fontsize=10, x=0.02, ha="left")
    return _png(figure)


def annotation_pngs(distributions: AnnotationDistributions) -> dict[str, bytes]:
    """One chart per metric of `distributions` (`annotation_png`), named `<stage>:<metric>`."""
    return {f"{d.stage}:{d.metric.name}": annotation_png(d) for d in distributions.metrics
            if d.kept.size or d.dropped.size}


def annotation_png(distribution: MetricDistribution) -> bytes:
    """Stacked histogram of one metric over the annotated rows: kept, dropped by its own stage, dropped by
    other stages; the thresholds as dashed lines labelled with their value and what they cut."""
    histogram = distribution.histogram()
    figure, axes = _figure(2.7)
    left, widths = histogram.edges[:-1], np.diff(histogram.edges)
    bottom = np.zeros(len(left))
    layers = ((histogram.kept, KEPT, "kept"), (histogram.own, OWN_DROP, f"dropped by {distribution.stage}"),
              (histogram.other, DROPPED, "dropped by other stages"))
    for counts, colour, label in layers:
        if counts.sum():
            axes.bar(left, counts, width=widths, bottom=bottom, align="edge", color=colour, linewidth=0,
                     label=f"{label} ({int(counts.sum()):,})")
            bottom = bottom + counts
    for index, (threshold, outside) in enumerate(distribution.cuts()):
        side = "below" if threshold.bound == "min" else "above"
        text = f"{threshold.param} {threshold.value:g}: {outside:,} values {side}"
        if histogram.position(threshold.value) is None:
            axes.plot([], [], " ", label=f"{text} (off the chart)")
            continue
        axes.axvline(threshold.value, color=THRESHOLD_COLOURS[index % len(THRESHOLD_COLOURS)], linestyle="--",
                     linewidth=1.4, label=text)
    infinite = int((~np.isfinite(distribution.kept)).sum() + (~np.isfinite(distribution.dropped)).sum())
    if infinite:
        axes.plot([], [], " ", label=f"{infinite:,} infinite values not drawn")
    axes.set_xlabel(distribution.metric.description or distribution.metric.name, fontsize=8)
    axes.set_ylabel("annotated rows", fontsize=8)
    axes.set_title(f"{distribution.metric.name} ({distribution.stage}): {distribution.annotated:,} annotated rows",
                   fontsize=10, loc="left")
    axes.legend(fontsize=7, frameon=False)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    _style(axes)
    return _png(figure)
