"""Check an output folder against its manifest: every shard present, same bytes, same rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from curate import registry, storage
from curate.drop_log import count_rows
from curate.files import read_json, sha256_file
from curate.manifest.validate import ManifestInvalid, validate_manifest


@dataclass
class VerifyReport:
    """What `verify_output` found; `ok` when `problems` is empty."""

    checked_files: int = 0
    checked_rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def resolve_manifest(path: str | Path | storage.StoragePath) -> storage.Location:
    """Accept an output folder or a manifest.json path (local, or a store URL); return the manifest path."""
    path = storage.location(path)
    return path / "manifest.json" if path.is_dir() else path


def verify_output(path: str | Path | storage.StoragePath) -> VerifyReport:
    """Recompute sha256 and row counts of every output shard and the drop log against the manifest.

    A shard in a store is read once, into a local scratch copy that is hashed and counted.
    """
    report = VerifyReport()
    try:
        return _verify(resolve_manifest(path), report)
    except OSError as error:  # a store that cannot be reached, or a file that cannot be read
        report.problems.append(f"cannot read {path}: {error}")
        return report
    except ValueError as error:  # a manifest edited into something that is not JSON
        report.problems.append(f"the manifest is not valid JSON: {error}")
        return report


def _verify(manifest_path: storage.Location, report: VerifyReport) -> VerifyReport:
    if not manifest_path.is_file():
        report.problems.append(f"no manifest at {manifest_path}")
        return report
    manifest = read_json(manifest_path)
    try:
        validate_manifest(manifest)
    except ManifestInvalid as error:
        report.problems.append(str(error))
        return report
    root = manifest_path.parent
    sinks = {}
    for entry in manifest["outputs"]["shards"]:
        report.checked_files += 1
        if _outside(entry["path"]):
            report.problems.append(f"shard path {entry['path']!r} points outside the output folder")
            continue
        file = root / entry["path"]
        if not file.is_file():
            report.problems.append(f"missing shard {entry['path']}")
            continue
        if file.stat().st_size != entry["bytes"]:
            report.problems.append(f"{entry['path']}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        if entry["format"] not in sinks:
            cls = registry.load(registry.SINKS, entry["format"])
            sinks[entry["format"]] = cls(cls.Params())
        with storage.local_copy(file) as local:
            digest = sha256_file(local)
            if digest != entry["sha256"]:
                report.problems.append(
                    f"{entry['path']}: sha256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…")
            rows = sinks[entry["format"]].count_rows(str(local))
        report.checked_rows += rows
        if rows != entry["rows"]:
            report.problems.append(f"{entry['path']}: {rows} rows, manifest says {entry['rows']}")
    _verify_drop_log(root, manifest, report)
    _verify_totals(manifest, report)
    return report


def _verify_drop_log(root: storage.Location, manifest: dict, report: VerifyReport) -> None:
    drop_log = manifest["drop_log"]
    report.checked_files += 1
    if _outside(drop_log["path"]):
        report.problems.append(f"drop log path {drop_log['path']!r} points outside the output folder")
        return
    file = root / drop_log["path"]
    if not file.is_file():
        report.problems.append(f"missing drop log {drop_log['path']}")
        return
    if sha256_file(file) != drop_log["sha256"]:
        report.problems.append(f"{drop_log['path']}: sha256 differs from the manifest")
    # Sample rows (image null) and image rows (images removed from kept documents) are counted apart; a drop
    # log of before image rows is all sample rows, and its manifest has no image_rows (0).
    rows, image_rows = count_rows(file)
    if rows != drop_log["rows"]:
        report.problems.append(f"{drop_log['path']}: {rows} dropped-sample rows, manifest says {drop_log['rows']}")
    if image_rows != drop_log.get("image_rows", 0):
        report.problems.append(f"{drop_log['path']}: {image_rows} removed-image rows, manifest says "
                               f"{drop_log.get('image_rows', 0)}")


def _outside(relative: str) -> bool:
    """True for a manifest path that would leave the output folder (absolute, or with a `..` part)."""
    return relative.startswith(("/", "\\")) or ".." in relative.replace("\\", "/").split("/")


def _verify_totals(manifest: dict, report: VerifyReport) -> None:
    totals = manifest["reconciliation"]
    if totals["input_rows"] != totals["output_rows"] + totals["dropped_rows"]:
        report.problems.append(
            f"rows do not reconcile: {totals['input_rows']} in != {totals['output_rows']} out + "
            f"{totals['dropped_rows']} dropped")
    for fmt in manifest["outputs"]["formats"]:
        rows = sum(s["rows"] for s in manifest["outputs"]["shards"] if s["format"] == fmt)
        if rows != manifest["outputs"]["rows"]:
            report.problems.append(f"{fmt} shards hold {rows} rows, manifest says {manifest['outputs']['rows']}")
