"""Run one export: check the destination, stream the role's samples through a format's exporter, write export.json.

The export is written into a hidden sibling folder (`.DEST.partial`) and renamed to DEST when it
is complete, so a failed export leaves no half-written DEST behind.
"""

from __future__ import annotations

import importlib
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

from curate.engine.lock import LOCK_FILE, OutputLock
from curate.export.base import ExportContext, Exporter, ExportOptions
from curate.export.common import (
    DUPLICATE_KEY,
    KIND_NOT_SUPPORTED,
    NO_CAPTION,
    PAIR_NOT_DOCUMENT,
    ExportError,
    ExportPolicy,
    Skip,
    SourceOutput,
    iter_samples,
    open_source,
    ordered_map,
    resolve_policy,
)
from curate.export.manifest import MANIFEST_FILE, Tally, build_manifest
from curate.files import write_json

FORMATS = {
    "llava": "curate.export.llava:LlavaExporter",
    "obelics": "curate.export.obelics:ObelicsExporter",
    "bagel": "curate.export.bagel:BagelExporter",
    "wds": "curate.export.wds:WdsExporter",
    "hf": "curate.export.hf:HfExporter",
}


def exporter_class(fmt: str) -> type[Exporter]:
    """The exporter of format `fmt`; ExportError for an unknown format."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    module, _, name = FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module), name)


def export_output(output: str | Path, dest: str | Path, fmt: str, role: str | None = None, overwrite: bool = False,
                  options: ExportOptions | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export the finished output OUTPUT to DEST in format `fmt`, for `role` (None: every sample).

    Returns the export manifest (also written as DEST/export.json). Raises ExportError for an
    unknown format or role, an unreadable output, or a DEST that may not be written.
    """
    options = options or ExportOptions()
    cls = exporter_class(fmt)
    with ExitStack() as locks:
        _lock_folders(locks, Path(output).expanduser().resolve(), Path(dest).expanduser().resolve(), say)
        return _export(output, dest, cls, fmt, role, overwrite, options, say)


def _lock_folders(locks: ExitStack, output: Path, dest: Path, say: Callable[[str], None] | None) -> None:
    """Lock OUTPUT (no run or retry changes it while it is read) and DEST (by a file beside it: DEST is replaced
    whole); ExportError while another process holds either."""
    folder = output.parent if output.name == "manifest.json" else output
    if folder.is_dir():  # else open_source says what is wrong with the path
        locks.enter_context(OutputLock(folder, say=say, refuse=ExportError, advice=f"delete {folder / LOCK_FILE}"))
    beside = dest.parent / f".{dest.name}{LOCK_FILE}"
    locks.enter_context(OutputLock(dest, file=beside, say=say, refuse=ExportError, advice=f"delete {beside}"))


def _export(output: str | Path, dest: str | Path, cls: type[Exporter], fmt: str, role: str | None, overwrite: bool,
            options: ExportOptions, say: Callable[[str], None] | None) -> dict[str, Any]:
    """export_output(), with OUTPUT and DEST locked."""
    source = open_source(output)
    policy = resolve_policy(source.manifest, role)
    final = Path(dest).expanduser().resolve()
    check_destination(final, source.root, overwrite)
    staging = final.parent / f".{final.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        exporter = cls(ExportContext(staging, final, policy, options))
        tally = Tally()

        def attempt(row: dict[str, Any]) -> tuple[str, Any]:
            try:
                return row["key"], exporter.prepare(row)
            except Skip as skip:
                return row["key"], skip

        for key, outcome in ordered_map(attempt, role_samples(source, policy, tally), options.workers):
            if isinstance(outcome, Skip):
                tally.skip(key, outcome.reason, outcome.detail)
            else:
                exporter.write(outcome)
                tally.exported += 1
        if tally.exported == 0:
            raise ExportError(nothing_exported(tally, fmt, policy.role))
        files = exporter.finish()
        manifest = build_manifest(fmt, policy, options, source, exporter, tally, files)
        write_json(staging / MANIFEST_FILE, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if say is not None:
        say(summary(manifest, final))
    return manifest


def role_samples(source: SourceOutput, policy: ExportPolicy, tally: Tally) -> Iterator[dict[str, Any]]:
    """The samples of the exported role; rows outside it and repeated keys are counted, not yielded."""
    seen: set[str] = set()
    for row in iter_samples(source):
        tally.read += 1
        if not policy.wants(row):
            tally.not_in_role += 1
            continue
        if row["key"] in seen:
            tally.skip(row["key"], DUPLICATE_KEY, "the key was exported already")
            continue
        seen.add(row["key"])
        yield row


def check_destination(dest: Path, output: Path, overwrite: bool) -> None:
    """Refuse a DEST that overlaps the output, is a file, or holds files (unless --overwrite of an earlier export)."""
    if dest == output or output in dest.parents or dest in output.parents:
        raise ExportError(f"{dest}: the export folder must be outside the output folder {output} (and not contain it)")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ExportError(f"{dest} is not empty; pass --overwrite to replace an earlier export there")
        if not (dest / MANIFEST_FILE).is_file():
            raise ExportError(f"{dest} is not empty and holds no {MANIFEST_FILE}: it is not an earlier export, "
                              "so --overwrite will not delete it; choose an empty or new folder")


def summary(manifest: dict[str, Any], dest: Path) -> str:
    """One paragraph on what was exported."""
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped["by_reason"].items())
    role = f" (role {manifest['role']})" if manifest["role"] else ""
    lines = [f"exported {manifest['rows']:,} samples, {manifest['images']:,} images as {manifest['format']}{role} "
             f"to {dest}: {len(manifest['files'])} files"]
    if manifest["reconciliation"]["not_in_role"]:
        lines.append(f"not in the role: {manifest['reconciliation']['not_in_role']:,}")
    if skipped["rows"]:
        lines.append(f"skipped {skipped['rows']:,}: {reasons}")
    return "\n".join(lines)


HINTS = {
    PAIR_NOT_DOCUMENT: "--pairs-as-documents exports pairs as two-element documents",
    KIND_NOT_SUPPORTED: "the format has no place for these kinds of sample; `--to hf` takes every kind",
    NO_CAPTION: "none has a caption variant the role's `captions` allow (roles.<role>.captions in the recipe)",
}


def nothing_exported(tally: Tally, fmt: str, role: str | None) -> str:
    """Why an export would write no sample, and what would include some (nothing is written)."""
    if tally.read == 0:
        return "the output holds no sample: nothing to export"
    if tally.not_in_role == tally.read:
        return (f"none of the {tally.read:,} samples has the role {role!r} (its `when` in the recipe's roles: "
                "section kept none); choose another --role, or none for every sample")
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in tally.skipped.most_common())
    hints = "; ".join(HINTS[reason] for reason, _ in tally.skipped.most_common() if reason in HINTS)
    return (f"--to {fmt} would export 0 of {tally.read - tally.not_in_role:,} samples (skipped: {reasons})"
            + (f"; {hints}" if hints else ""))
