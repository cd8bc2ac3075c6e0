"""One self-contained HTML page about an output: it opens offline, with inline CSS and data: URI images.

Every text that comes from the data (captions, URLs, details, keys, recipe values) is escaped:
captions are web text and may hold markup. URLs are shown as text, never as links.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path
from typing import Any, Iterable

from curate.drop_log import count_rows, images_removed
from curate.files import atomic_path
from curate.report.columns import DEFAULT_MAX_ROWS, Distributions, read_distributions
from curate.report.distributions import (
    AnnotationDistributions,
    MetricDistribution,
    quantiles,
    read_annotation_distributions,
)
from curate.report.plots import annotation_pngs, render_plots
from curate.report.reader import Output, open_output
from curate.report.samples import (
    DropExamples,
    Sample,
    drop_examples,
    fill_dropped,
    find_dropped,
    find_kept,
    kept_samples,
)
from curate.report.thumbnails import data_uri, thumbnail_uri

SECTIONS = {"summary": "Summary", "funnel": "Funnel", "drops": "Drops by reason", "distributions": "Distributions",
            "annotations": "Annotations: kept and dropped", "counts": "Kinds and roles", "dedup": "Dedup",
            "kept": "Kept samples", "dropped": "Dropped samples"}
CAPTION_CHARS = 240
URL_CHARS = 120

CSS = """
:root { --ink: #1d232b; --muted: #5f6b7a; --line: #dde2e8; --kept: #3b7dd8; --drop: #c9473a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f9; }
header { background: #1d232b; color: #fff; padding: 18px 32px 12px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #c5ccd6; }
nav { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 6px 16px; }
nav a { color: #9cc3ff; text-decoration: none; font-size: 13px; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 20px 18px;
          margin: 16px 0; }
h2 { font-size: 17px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 16px 0 8px; }
h3 .count { color: var(--muted); font-weight: 400; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #2c8a4b; font-weight: 600; } .bad { color: var(--drop); font-weight: 600; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 12px; }
.chart { max-width: 100%; height: auto; }
.side { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.side > .chart { flex: 1 1 520px; min-width: 0; max-width: 640px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.card { margin: 0; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; background: #fff;
        font-size: 12px; }
.card.dropped { border-color: #efc4bf; }
.thumb { display: block; width: 100%; height: 150px; object-fit: contain; background: #eef1f4; }
.noimg { height: 150px; display: flex; align-items: center; justify-content: center; text-align: center;
         padding: 8px; background: repeating-linear-gradient(45deg, #f7eceb, #f7eceb 8px, #fbf4f3 8px, #fbf4f3 16px);
         color: var(--drop); font-weight: 600; }
.dropped .noimg { height: 64px; }
.card figcaption { padding: 6px 8px 8px; }
.cap { margin-bottom: 4px; overflow-wrap: anywhere; }
.cap.none { color: var(--muted); font-style: italic; }
.scores { color: var(--muted); font-variant-numeric: tabular-nums; }
.why { color: var(--drop); margin-top: 2px; overflow-wrap: anywhere; }
.url, .key { color: var(--muted); font-size: 11px; overflow-wrap: anywhere; font-family: ui-monospace, monospace; }
.groups { display: flex; flex-wrap: wrap; gap: 12px; }
.group { display: flex; gap: 8px; padding: 8px; border: 1px dashed #b9c2cc; border-radius: 6px; }
.group .card { width: 172px; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 2px 0 10px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px 14px; min-width: 120px; }
.tile b { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
.tile small { color: var(--muted); font-size: 12px; }
.status { font-weight: 600; } .status.kept { color: #2c8a4b; } .status.dropped { color: var(--drop); }
"""


def esc(value: Any) -> str:
    """`value` as escaped HTML text (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def _table(headers: list[str], rows: Iterable[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="n">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td class="n">{_number(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _chart(charts: dict[str, bytes], name: str, alt: str) -> str:
    if name not in charts:
        return ""
    return f'<img class="chart" src="{data_uri(charts[name], "image/png")}" alt="{esc(alt)}" data-chart="{esc(name)}">'


def _section(anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(SECTIONS[anchor])}</h2>{body}</section>'


def card(sample: Sample, status: str | None = None) -> str:
    """One sample as a card: thumbnail (or why there is none), caption, scores, and for a drop its reason."""
    dropped = sample.reason is not None
    uri = thumbnail_uri(sample.image)
    if uri is not None:
        picture = f'<img class="thumb" src="{uri}" alt="{esc(_shorten(sample.caption or sample.key, 80))}">'
    else:
        if sample.image:
            label = "image not decodable"
        else:
            label = f"{sample.reason}: no image stored" if dropped else "no image stored"
        picture = f'<div class="noimg">{esc(label)}</div>'
    if sample.caption is not None:
        caption = f'<div class="cap" title="{esc(_shorten(sample.caption, 1000))}">' \
                  f'{esc(_shorten(sample.caption, CAPTION_CHARS))}</div>'
    else:  # for a drop the section's note says why captions are missing
        caption = "" if dropped else '<div class="cap none">no caption</div>'
    facts = [f"{name} {value:.3f}" if name == "clip_score" else f"{name} {value:.2f}"
             for name, value in sorted(sample.scores.items())]
    if sample.width and sample.height:
        facts.append(f"{sample.width}×{sample.height}")
    parts = [picture, "<figcaption>"]
    if status is not None:
        parts.append(f'<div class="status {"dropped" if dropped else "kept"}">{esc(status)}</div>')
    parts.append(caption)
    if facts:
        parts.append(f'<div class="scores">{esc(" · ".join(facts))}</div>')
    if dropped:
        parts.append(f'<div class="why">{esc(sample.stage)} / {esc(sample.reason)}'
                     f'{": " + esc(sample.detail) if sample.detail else ""}</div>')
    if sample.url:
        parts.append(f'<div class="url">{esc(_shorten(sample.url, URL_CHARS))}</div>')
    parts.append(f'<div class="key">{esc(sample.key)}</div></figcaption>')
    return f'<figure class="card{" dropped" if dropped else ""}" data-key="{esc(sample.key)}">{"".join(parts)}</figure>'


def _summary(output: Output) -> str:
    manifest = output.manifest
    totals = manifest.get("reconciliation", {})
    verdict = ('<span class="ok">reconciles</span>' if totals.get("ok")
               else '<span class="bad">does not reconcile</span>')
    drop_log = manifest.get("drop_log", {})
    rows = [
        ["recipe", f"{manifest['recipe'].get('name')} (sha256 {str(manifest['recipe'].get('sha256', ''))[:16]})"],
        ["created", f"{manifest.get('created')} ({manifest.get('seconds', 0):.1f} s)"],
        ["device", f"{manifest.get('device', {}).get('accelerator')}, {manifest.get('device', {}).get('cpus')} CPUs, "
                   f"{manifest.get('device', {}).get('gpus')} GPUs"],
        ["formats", ", ".join(output.formats)],
        ["shards", f"{len(manifest.get('outputs', {}).get('shards', []))} files"],
    ]
    notes = []
    if output.layout.drops.is_file():
        logged, image_rows = count_rows(output.layout.drops)  # dropped samples, and images removed from documents
        if logged != drop_log.get("rows"):
            notes.append(f"drops.parquet has {logged:,} dropped-sample rows, the manifest says {drop_log.get('rows')}")
        if image_rows != drop_log.get("image_rows", 0):
            notes.append(f"drops.parquet has {image_rows:,} removed-image rows, the manifest says "
                         f"{drop_log.get('image_rows', 0)}")
    else:
        notes.append("drops.parquet is missing")
    tiles = [(f"{totals.get('input_rows', 0):,}", "rows in"), (f"{totals.get('output_rows', 0):,}", "kept"),
             (f"{totals.get('dropped_rows', 0):,}", "dropped")]
    body = ('<div class="side"><div class="tiles">' +
            "".join(f'<div class="tile"><b>{value}</b><small>{label}</small></div>' for value, label in tiles) +
            f'<div class="tile"><b>{verdict}</b><small>in = kept + dropped</small></div></div>' +
            _table(["", ""], rows) + "</div>")
    body += "".join(f'<p class="note bad">{esc(n)}</p>' for n in notes)
    return _section("summary", body)


def _funnel(manifest: dict[str, Any], charts: dict[str, bytes]) -> str:
    stages = manifest.get("stages", [])
    removing = any(images_removed(s) for s in stages)  # images removed from documents that stay in the funnel
    rows = [[s["name"], s["phase"], s["rows_in"], s["rows_out"], s["rows_in"] - s["rows_out"],
             *([sum(images_removed(s).values())] if removing else []), s.get("seconds", 0.0)] for s in stages]
    headers = ["stage", "phase", "in", "out", "dropped", *(["images removed"] if removing else []), "seconds"]
    body = ('<div class="side">' + _chart(charts, "funnel", "funnel: rows in and out per stage") +
            _table(headers, rows, set(range(2, len(headers)))) + "</div>")
    others = {name: summary for name, summary in (manifest.get("decisions") or {}).items() if "method" not in summary}
    for name, summary in others.items():
        body += f"<h3>{esc(name)} decision</h3>" + _table(["field", "value"], [[k, v] for k, v in summary.items()])
    return _section("funnel", body)


def _drops(manifest: dict[str, Any], charts: dict[str, bytes]) -> str:
    total = manifest.get("reconciliation", {}).get("input_rows") or 0
    rows = [[stage["name"], reason, count, f"{100 * count / total:.1f}%" if total else ""]
            for stage in manifest.get("stages", []) for reason, count in
            sorted(stage.get("dropped", {}).items(), key=lambda item: -item[1])]
    images = [[stage["name"], reason, count] for stage in manifest.get("stages", []) for reason, count in
              sorted(images_removed(stage).items(), key=lambda item: -item[1])]
    if not rows and not images:
        return _section("drops", '<p class="note">No sample was dropped.</p>')
    body = ('<div class="side">' + _chart(charts, "drops_by_reason", "drops by reason") +
            _table(["stage", "reason", "rows", "of input"], rows, {2, 3}) + "</div>") if rows else \
        '<p class="note">No sample was dropped.</p>'
    if images:  # not dropped samples: images taken out of documents that may still be in the output
        body += ('<h3>Images removed from documents</h3><p class="note">Counted per image; those of documents that '
                 'were kept are in drops.parquet with their index in the document (column <code>image</code>).</p>'
                 + _table(["stage", "reason", "images"], images, {2}))
    return _section("drops", body)


def _distributions(manifest: dict[str, Any], charts: dict[str, bytes], distributions: Distributions) -> str:
    names = [("clip_score", "clip_score histogram"), ("aesthetic", "aesthetic histogram"),
             ("image_sizes", "image sizes histogram"), ("caption_length", "caption length histogram")]
    images = "".join(_chart(charts, name, alt) for name, alt in names)
    if distributions.read_from is None:
        note = "The output has no Parquet or WebDataset shards to read distributions from."
    elif distributions.sampled:
        note = (f"Histograms from {distributions.rows_read:,} of {distributions.rows_total:,} kept samples "
                f"(evenly spread row groups of the {distributions.read_from} shards); quantiles below are exact.")
    else:
        note = f"Histograms of all {distributions.rows_read:,} kept samples ({distributions.read_from} shards)."
    quantile_names = ("p5", "p25", "p50", "p75", "p95")
    rows = [[name, summary.get("count", 0), summary.get("mean"), *(summary.get("quantiles", {}).get(q)
                                                                    for q in quantile_names)]
            for name, summary in (manifest.get("statistics") or {}).items()]
    body = f'<p class="note">{esc(note)}</p><div class="charts">{images}</div>'
    body += "<h3>Quantiles (manifest)</h3>" + _table(["field", "count", "mean", *quantile_names], rows,
                                                     set(range(1, 8)))
    return _section("distributions", body)


def _annotation(distribution: MetricDistribution, charts: dict[str, bytes]) -> str:
    """One metric: its chart, then counts and quantiles of kept and dropped rows, and the thresholds."""
    metric, name = distribution.metric, f"{distribution.stage}:{distribution.metric.name}"
    kept, dropped = distribution.kept, distribution.dropped
    title = (f'<h3 data-metric="{esc(name)}">{esc(metric.name)} <span class="count">(stage {esc(distribution.stage)}'
             f'{", " + esc(metric.description) if metric.description else ""})</span></h3>')
    names = ("p5", "p25", "p50", "p75", "p95")
    rows = [["kept", kept.size, *(quantiles(kept).get(q) for q in names)],
            ["dropped", dropped.size, *(quantiles(dropped).get(q) for q in names)]]
    for stage, count in distribution.dropped_counts().items():
        found = quantiles(distribution.dropped_values(stage))
        rows.append([f"dropped by {stage}", count, *(found.get(q) for q in names)])
    table = _table(["rows", "count", *names], rows, set(range(1, 7)))
    note = f"{distribution.annotated:,} annotated rows"
    if distribution.missing:
        note += f", {distribution.missing:,} of them without a value"
    cuts = [[t.param, t.bound, t.value, outside, f"{100 * outside / max(kept.size + dropped.size, 1):.1f}%"]
            for t, outside in distribution.cuts()]
    thresholds = (_table(["threshold", "bound", "value", "values outside", "of annotated"], cuts, {2, 3, 4})
                  if cuts else '<p class="note">No threshold on this metric in the recipe.</p>')
    return (title + '<div class="side">' + _chart(charts, name, f"{metric.name} kept and dropped histogram") +
            f'<div><p class="note">{esc(note)}</p>{table}{thresholds}</div></div>')


def _annotations(annotations: AnnotationDistributions, charts: dict[str, bytes]) -> str:
    intro = ("Each stage's numeric annotations over every row it annotated, kept and dropped apart (a row dropped "
             "as a whole by any stage, named in the drop log), on shared bins, with the recipe's thresholds: what "
             "a threshold would change can be read before choosing it.")
    body = f'<p class="note">{esc(intro)}</p>'
    body += "".join(f'<p class="note bad">{esc(note)}</p>' for note in annotations.notes)
    if not annotations.pool:
        body += '<p class="note">The distributions section above shows the kept samples only.</p>'
    elif not annotations.metrics and not annotations.notes:
        body += '<p class="note">No stage of this recipe records a numeric annotation.</p>'
    body += "".join(_annotation(distribution, charts) for distribution in annotations.metrics)
    return _section("annotations", body)


def _counts(manifest: dict[str, Any], distributions: Distributions) -> str:
    kinds = manifest.get("kinds") or {}
    body = '<div class="side"><div><h3>Per kind</h3>'
    body += _table(["kind", "samples"], [[k, v] for k, v in kinds.items()], {1}) if kinds else \
        '<p class="note">No kept samples.</p>'
    body += "</div><div><h3>Per role</h3>"
    role_rows = [[role, count] for role, count in distributions.roles.most_common()]
    if distributions.rows_without_role:
        role_rows.append(["(no role)", distributions.rows_without_role])
    body += _table(["role", "samples"], role_rows, {1}) if role_rows else \
        '<p class="note">No samples read.</p>'
    if not distributions.roles and distributions.rows_without_role:
        body += '<p class="note">No sample has a role yet: the `roles` column is empty in this output.</p>'
    body += "</div></div>"
    return _section("counts", body)


def _dedup(output: Output, max_source_rows: int) -> str:
    decisions = {name: s for name, s in (output.manifest.get("decisions") or {}).items() if "method" in s}
    if not decisions:
        return _section("dedup", '<p class="note">This recipe has no dedup stage.</p>')
    fields = ("method", "threshold", "policy", "index", "judged", "pairs", "groups", "removed", "seconds")
    rows = [[name, *(summary.get(f) for f in fields), kept_because(summary)] for name, summary in decisions.items()]
    body = _table(["stage", *fields, "kept because"], rows, {5, 6, 7, 8, 9})
    keys = {key for summary in decisions.values() for group in summary.get("examples", []) for key in group}
    kept = find_kept(output, keys)
    dropped = find_dropped(output, keys - set(kept))
    note = fill_dropped(output, list(dropped.values()), max_source_rows) if dropped else ""
    for name, summary in decisions.items():
        groups = summary.get("examples", [])
        if not groups:
            continue
        body += f'<h3>{esc(name)}: example groups <span class="count">(first listed is the one preferred)</span></h3>'
        body += '<div class="groups">'
        for group in groups:
            cards = []
            for key in group:
                sample = kept.get(key) or dropped.get(key) or Sample(key=key)
                status = "kept" if key in kept else (f"dropped: {sample.reason}" if key in dropped else "not found")
                cards.append(card(sample, status))
            body += f'<div class="group">{"".join(cards)}</div>'
        body += "</div>"
    if note:
        body += f'<p class="note">{esc(note)}</p>'
    return _section("dedup", body)


def kept_because(summary: dict[str, Any]) -> str:
    """A dedup summary's removals per deciding keep criterion, e.g. "original_pixels 3, source_order 1"."""
    counts = summary.get("kept_because") or {}
    return ", ".join(f"{name} {count}" for name, count in counts.items() if count)


def _kept(samples: list[Sample], total: int) -> str:
    if not samples:
        return _section("kept", '<p class="note">No kept samples to show.</p>')
    body = f'<p class="note">{len(samples)} of {total:,} kept samples, spread over the output.</p>'
    return _section("kept", body + '<div class="grid">' + "".join(card(s) for s in samples) + "</div>")


def _dropped(examples: list[DropExamples], note: str) -> str:
    if not examples:
        return _section("dropped", '<p class="note">No sample was dropped.</p>')
    body = f'<p class="note">{esc(note)}</p>'
    for entry in examples:
        body += (f'<h3 data-reason="{esc(entry.reason)}">{esc(entry.stage)} / {esc(entry.reason)} '
                 f'<span class="count">({entry.count:,} rows; {len(entry.samples)} shown)</span></h3>')
        body += '<div class="grid">' + "".join(card(s) for s in entry.samples) + "</div>"
    return _section("dropped", body)


def build_report(output: Output, kept: int = 24, per_reason: int = 6, max_rows: int = DEFAULT_MAX_ROWS,
                 max_source_rows: int = 500_000, annotations: AnnotationDistributions | None = None) -> str:
    """The HTML page of `output`: summary, funnel, drops, distributions, annotations kept and dropped (read from
    the pool unless given as `annotations`), kinds and roles, dedup, samples."""
    manifest = output.manifest
    distributions = read_distributions(output, max_rows)
    if annotations is None:
        annotations = read_annotation_distributions(output.root, manifest)
    charts = {**render_plots(manifest, distributions), **annotation_pngs(annotations)}
    examples = drop_examples(output, per_reason)
    drop_note = fill_dropped(output, [s for e in examples for s in e.samples], max_source_rows)
    title = f"curate report: {manifest['recipe'].get('name', '')}"
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in SECTIONS.items())
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1><p>{esc(output.root)} · report made {esc(generated)}</p>"
        f"<nav>{nav}</nav></header><main>",
        _summary(output),
        _funnel(manifest, charts),
        _drops(manifest, charts),
        _distributions(manifest, charts, distributions),
        _annotations(annotations, charts),
        _counts(manifest, distributions),
        _dedup(output, max_source_rows),
        _kept(kept_samples(output, kept), int(manifest.get("outputs", {}).get("rows", 0))),
        _dropped(examples, drop_note),
        "</main></body></html>",
    ]
    return "\n".join(parts)


def write_report(output_dir: str | Path, report_path: str | Path, **options: Any) -> Path:
    """Write the HTML report of the output in `output_dir` to `report_path` (atomically); return the path.

    `options` go to `build_report` (kept, per_reason, max_rows, max_source_rows, annotations). Raises
    `curate.report.reader.OutputUnreadable` when `output_dir` holds no readable manifest.
    """
    output = open_output(output_dir)
    page = build_report(output, **options)
    report_path = Path(report_path)
    with atomic_path(report_path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return report_path
