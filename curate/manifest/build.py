"""Assemble manifest.json: what ran, on what, with which result, and whether rows reconcile."""

from __future__ import annotations

import datetime as dt
import platform
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema, storage
from curate.files import RunLayout, sha256_file
from curate.manifest.summary import ValueSummary, drop_log_counts
from curate.manifest.validate import validate_manifest
from curate.redact import redact_data

if TYPE_CHECKING:
    from curate.engine.run import Plan

MANIFEST_VERSION = 1
LIBRARIES = ("curate", "ray", "pyarrow", "pillow", "datasets", "webdataset", "numpy", "pydantic", "urllib3",
             "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu", "huggingface_hub")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the packages `names` (those not installed are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def library_versions() -> dict[str, str]:
    """Installed versions of Python, curate and the libraries that shape its output."""
    return {"python": platform.python_version(), **package_versions(LIBRARIES)}


def field_statistics(files: list[Path]) -> dict[str, Any]:
    """Quantiles of the main numeric fields over the kept samples in `files` (bounded memory: ValueSummary)."""
    columns = {name: ValueSummary() for name in (
        "width", "height", "original_width", "original_height", "num_bytes", "caption_chars", "caption_words",
        "clip_score", "aesthetic", "clip_direction", "nsfw", "watermark")}
    for file in files:
        for batch in storage.parquet_file(file).iter_batches(columns=["image_meta", "captions", "scores"]):
            if batch.num_rows == 0:
                continue
            flat = pc.list_flatten(batch.column("image_meta"))
            for name in ("width", "height", "original_width", "original_height", "num_bytes"):
                columns[name].add(pc.struct_field(flat, name))
            chars, words = [], []
            for captions in batch.column("captions").to_pylist():
                text = schema.caption_text(captions)
                if text is not None:
                    chars.append(len(text))
                    words.append(len(text.split()))
            columns["caption_chars"].add(chars)
            columns["caption_words"].add(words)
            for score in ("clip_score", "aesthetic", "clip_direction", "nsfw", "watermark"):
                columns[score].add(pc.struct_field(batch.column("scores"), score))
    return {name: summary.to_json() for name, summary in columns.items() if summary.count}


def _kinds(files: list[Path]) -> dict[str, int]:
    counts: Counter = Counter()
    for file in files:
        counts.update(storage.read_table(file, columns=["kind"]).column("kind").to_pylist())
    return dict(sorted(counts.items()))


def role_counts(files: list[Path], names: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """Per role: output samples carrying it, their images and image bytes (`image_meta[].num_bytes`).

    A sample counts once under each of its roles. The recipe's roles (`names`) come first, in recipe
    order and with zero counts, then any other role found in the `roles` column, by name.
    """
    counts = {name: {"samples": 0, "images": 0, "bytes": 0} for name in names}
    found: dict[str, dict[str, int]] = {}
    for file in files:
        table = storage.read_table(file, columns=["roles", "image_meta"]).combine_chunks()
        roles = table.column("roles").chunk(0) if table.num_rows else None
        if roles is None or len(pc.list_flatten(roles)) == 0:
            continue
        metas = table.column("image_meta").chunk(0)
        images = pc.fill_null(pc.list_value_length(metas), 0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(metas)
        sizes = pc.fill_null(pc.struct_field(flat, "num_bytes"), 0).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(metas).to_numpy(zero_copy_only=False)
        image_bytes = np.bincount(parents, weights=sizes, minlength=table.num_rows)
        role_names = np.asarray(pc.list_flatten(roles).to_pylist(), dtype=object)
        role_rows = pc.list_parent_indices(roles).to_numpy(zero_copy_only=False)
        for name in dict.fromkeys(role_names.tolist()):
            rows = np.unique(role_rows[role_names == name])
            entry = counts.get(name) or found.setdefault(name, {"samples": 0, "images": 0, "bytes": 0})
            entry["samples"] += int(rows.size)
            entry["images"] += int(images[rows].sum())
            entry["bytes"] += int(round(float(image_bytes[rows].sum())))
    return {**counts, **dict(sorted(found.items()))}


def caption_variant_counts(files: list[Path]) -> dict[str, int]:
    """Per caption variant name: output samples that have it with text (e.g. how many matched a caption join)."""
    counts: Counter = Counter()
    for file in files:
        captions = storage.read_table(file, columns=["captions"]).column("captions").combine_chunks()
        flat = pc.list_flatten(captions)
        if len(flat) == 0:
            continue
        pairs = pa.table({"name": pc.struct_field(flat, "name"), "row": pc.list_parent_indices(captions)})
        pairs = pairs.filter(pc.is_valid(pc.struct_field(flat, "text")))
        grouped = pairs.group_by("name").aggregate([("row", "count_distinct")])
        counts.update(dict(zip(grouped.column("name").to_pylist(), grouped.column("row_count_distinct").to_pylist())))
    return dict(sorted(counts.items()))


def _image_path_leaf(parquet: pq.ParquetFile) -> str:
    """The Parquet column of `images[].path`: reading it gives the list lengths without any image bytes."""
    paths = [parquet.schema.column(i).path for i in range(len(parquet.schema))]
    return next(path for path in paths if path.startswith("images.") and path.endswith(".path"))


def image_counts(files: list[Path]) -> tuple[dict[str, Any], ValueSummary]:
    """Images in the output (total and per kind, counted apart from samples) and the summary of images per sample."""
    by_kind: Counter = Counter()
    per_sample = ValueSummary()
    for file in files:
        parquet = storage.parquet_file(file)
        for batch in parquet.iter_batches(columns=["kind", _image_path_leaf(parquet)]):
            counts = pc.fill_null(pc.list_value_length(batch.column(1)), 0)
            per_sample.add(counts)
            for kind, count in zip(batch.column(0).to_pylist(), counts.to_pylist()):
                by_kind[kind] += count
    return {"total": sum(by_kind.values()), "by_kind": dict(sorted(by_kind.items()))}, per_sample


def drop_log_entry(drops: Any, dropped_rows: int) -> dict[str, Any]:
    """The manifest's `drop_log`: `rows` and `by_reason` count the dropped samples (the rows that reconcile with
    the input, `image` null); `image_rows` and `images_by_reason` the images removed from kept documents, whose
    rows the file holds too (file rows = rows + image_rows; curate/drop_log.py)."""
    counts = drop_log_counts(drops)
    return {"path": drops.name, "rows": dropped_rows, "image_rows": counts["image_rows"],
            "sha256": sha256_file(drops), "by_reason": counts["by_reason"],
            "images_by_reason": counts["images_by_reason"]}


def _input_file(state: dict[str, int] | None) -> dict[str, Any]:
    return {"input_file": state} if state is not None else {}


def build_manifest(*, plan: "Plan", layout: RunLayout, device: dict[str, Any], resources: dict[str, float],
                   stage_stats: list[dict[str, Any]], phase_seconds: dict[str, float],
                   outputs: list[dict[str, Any]], final_files: list[Path], dropped_rows: int,
                   started_at: float, seconds: float, decisions: dict[str, dict[str, Any]] | None = None,
                   models: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build and validate the manifest of a finished run."""
    source_stats = stage_stats[0]
    shards = [file for marker in outputs for file in marker["files"]]
    formats = [sink.name for sink in plan.sinks]
    rows_by_format = {name: sum(f["rows"] for f in shards if f["format"] == name) for name in formats}
    output_rows = rows_by_format[formats[0]] if formats else 0
    input_rows = source_stats["rows_in"]
    images, images_per_sample = image_counts(final_files)
    reconciliation = {
        "input_rows": input_rows,
        "output_rows": output_rows,
        "dropped_rows": dropped_rows,
        "rows_by_format": rows_by_format,
        "ok": input_rows == output_rows + dropped_rows and len(set(rows_by_format.values())) <= 1,
    }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "status": "complete",
        "created": dt.datetime.fromtimestamp(started_at, dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "recipe": {
            "name": plan.loaded.recipe.name,
            "file": str(plan.loaded.file),
            "sha256": plan.loaded.sha256(),
            "resolved": redact_data(plan.loaded.resolved()),  # no token, password or URL credential
        },
        "versions": library_versions(),
        "device": {**device, "resources": {k: v for k, v in sorted(resources.items()) if k in ("CPU", "GPU",
                                                                                                "memory")}},
        "sources": [redact_data({**plan.source.describe(), "rows": input_rows,
                                 **_input_file(plan.source.input_file_state())})],
        "stages": stage_stats,
        "phases": [{"name": name, "seconds": round(value, 3)} for name, value in phase_seconds.items()],
        "models": models or [],
        "decisions": decisions or {},
        "kinds": _kinds(final_files),
        "roles": role_counts(final_files, plan.loaded.roles),
        "captions": caption_variant_counts(final_files),
        "images": images,
        "outputs": {"formats": formats, "rows": output_rows, "shards": shards},
        "drop_log": drop_log_entry(layout.drops, dropped_rows),
        "schema": schema.describe(),
        "statistics": {**field_statistics(final_files), "images_per_sample": images_per_sample.to_json()},
        "reconciliation": reconciliation,
    }
    trial = plan.loaded.recipe.trial
    if trial.active:  # a trial covers part of the input: marked, with the rows it read and left out
        read = getattr(plan.source, "rows_read", input_rows)
        manifest["trial"] = {**trial.model_dump(), "rows_read": read, "rows_skipped": max(0, read - input_rows)}
    validate_manifest(manifest)
    return manifest
