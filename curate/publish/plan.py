"""What a publish puts in the repository: the output's files at their repo paths, the generated files, and the
commits that carry them."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from curate.files import read_json, sha256_file
from curate.manifest.validate import ManifestInvalid, validate_manifest

MAX_FILES_PER_FOLDER = 9_999  # the Hub refuses folders with 10,000 entries or more
FILES_PER_COMMIT = 50  # the Hub's advice: commits of 50-100 files
BYTES_PER_COMMIT = 5 * 1024**3  # uploaded before a commit makes them part of the repository
MANIFEST = "manifest.json"
CARD = "README.md"


class PublishError(Exception):
    """A publish cannot go on; the message says why and what to do. `code` is the CLI exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PlannedFile:
    """One file of the repository: taken from the output (`source`) or generated (`content`)."""

    path: str  # in the repository, POSIX
    size: int
    sha256: str
    source: Path | None = None
    content: bytes | None = None

    def read_bytes(self) -> bytes:
        return self.content if self.content is not None else self.source.read_bytes()

    def git_sha1(self) -> str:
        """The git blob id of the content, what the Hub reports for a file not stored in LFS."""
        digest = hashlib.sha1(b"blob %d\0" % self.size)
        if self.content is not None:
            digest.update(self.content)
        else:
            with open(self.source, "rb") as handle:
                while block := handle.read(4 * 1024 * 1024):
                    digest.update(block)
        return digest.hexdigest()


def public_manifest(data: Any) -> Any:
    """`data` (a manifest) with every absolute local path replaced by its file name: the Hub gets no local paths."""
    if isinstance(data, dict):
        return {key: public_manifest(value) for key, value in data.items()}
    if isinstance(data, list):
        return [public_manifest(value) for value in data]
    if isinstance(data, str) and data.startswith(("/", "~/")) and "\n" not in data:
        return PurePosixPath(data).name
    return data


def generated_file(path: str, content: bytes) -> PlannedFile:
    """A file made by the publish itself (card, charts)."""
    return PlannedFile(path, len(content), hashlib.sha256(content).hexdigest(), content=content)


def read_output(root: Path) -> dict[str, Any]:
    """The manifest of a complete output folder, validated; PublishError when it cannot be published."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PublishError(f"no manifest at {manifest_path}: publish a finished curate output folder", code=2)
    try:
        manifest = read_json(manifest_path)
        validate_manifest(manifest)
    except (ValueError, ManifestInvalid) as error:
        raise PublishError(f"{manifest_path}: {error}", code=2) from error
    if manifest.get("status") != "complete" or not manifest["reconciliation"]["ok"]:
        raise PublishError(f"{manifest_path}: the output is not complete or its rows do not reconcile", code=2)
    return manifest


def output_file(root: Path, relative: str, sha256: str | None = None, size: int | None = None,
                repo_path: str | None = None) -> PlannedFile:
    """A file of the output with its sha256, checked against the manifest's size and sha256 when given."""
    path = root / relative
    if not path.is_file():
        raise PublishError(f"{relative} is listed in the manifest but missing from {root}")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise PublishError(f"{relative}: {actual_size} bytes, the manifest says {size}; run `curate verify {root}`")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise PublishError(f"{relative}: sha256 differs from the manifest; run `curate verify {root}`")
    return PlannedFile(repo_path or relative, actual_size, digest, source=path)


def repo_paths(paths: Iterable[str], max_files_per_folder: int = MAX_FILES_PER_FOLDER) -> dict[str, str]:
    """Map output paths to repository paths; a folder with more files than the limit is split into numbered
    subfolders (`parquet/0000/part-00000.parquet`, `parquet/0001/...`) in sorted order, so the same output
    always gets the same layout."""
    if max_files_per_folder < 1:
        raise ValueError("max_files_per_folder must be at least 1")
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(str(PurePosixPath(path).parent), []).append(path)
    mapping: dict[str, str] = {}
    for folder, members in by_folder.items():
        members.sort()
        if len(members) <= max_files_per_folder:
            mapping.update({path: path for path in members})
            continue
        if (len(members) - 1) // max_files_per_folder + 1 > max_files_per_folder:
            raise PublishError(f"{folder}: {len(members):,} files do not fit in two folder levels of "
                               f"{max_files_per_folder:,}")
        for position, path in enumerate(members):
            chunk = f"{position // max_files_per_folder:04d}"
            name = PurePosixPath(path).name
            mapping[path] = f"{chunk}/{name}" if folder == "." else f"{folder}/{chunk}/{name}"
    return mapping


def plan_commits(files: list[PlannedFile], max_files: int = FILES_PER_COMMIT,
                 max_bytes: int = BYTES_PER_COMMIT) -> list[list[PlannedFile]]:
    """Cut `files`, in order, into commits of at most `max_files` files and about `max_bytes` bytes (a single
    file larger than `max_bytes` is a commit of its own)."""
    commits: list[list[PlannedFile]] = []
    current: list[PlannedFile] = []
    current_bytes = 0
    for file in files:
        if current and (len(current) >= max_files or current_bytes + file.size > max_bytes):
            commits.append(current)
            current, current_bytes = [], 0
        current.append(file)
        current_bytes += file.size
    if current:
        commits.append(current)
    return commits


def write_tree(files: list[PlannedFile], directory: Path) -> None:
    """Write the files at their repository paths under `directory` (a dry run); `directory` must be new or empty."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PublishError(f"--dry-run folder {directory} is not empty; give a new or empty folder", code=2)
    for file in files:
        target = directory / PurePosixPath(file.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.content is not None:
            target.write_bytes(file.content)
        else:
            shutil.copyfile(file.source, target)
