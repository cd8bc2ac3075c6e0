"""What is on the remote: file entries as the Hub reports them, same-content checks, the check after an upload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable

from curate.publish.plan import PlannedFile


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository: size, git blob id, and sha256 when it is stored in LFS."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None


def remote_file(entry: Any) -> RemoteFile | None:
    """A huggingface_hub RepoFile as a RemoteFile; None for a folder."""
    if not hasattr(entry, "blob_id"):
        return None
    lfs = getattr(entry, "lfs", None)
    return RemoteFile(entry.path, int(entry.size), entry.blob_id, lfs.sha256 if lfs is not None else None)


def same_content(local: PlannedFile, remote: RemoteFile | None) -> bool:
    """Whether the remote file holds exactly `local`: sha256 for LFS files, git blob sha1 for regular ones."""
    if remote is None or remote.size != local.size:
        return False
    if remote.lfs_sha256 is not None:
        return remote.lfs_sha256 == local.sha256
    return remote.blob_id == local.git_sha1()


def stale_files(remote: Iterable[str], planned: Iterable[str], managed_folders: Iterable[str]) -> list[str]:
    """Remote files inside the folders a publish owns (e.g. `parquet/`) that the plan does not have."""
    planned = set(planned)
    folders = tuple(f"{folder.rstrip('/')}/" for folder in managed_folders)
    return sorted(path for path in remote if path.startswith(folders) and path not in planned)


def check_remote(remote: dict[str, RemoteFile], files: list[PlannedFile], manifest: dict[str, Any],
                 shard_paths: dict[str, str], managed_folders: Iterable[str]) -> list[str]:
    """Problems found comparing the remote listing with the plan and the manifest; empty when they agree."""
    problems = []
    for file in files:
        entry = remote.get(file.path)
        if entry is None:
            problems.append(f"{file.path}: missing on the remote")
        elif entry.size != file.size:
            problems.append(f"{file.path}: {entry.size} bytes on the remote, {file.size} planned")
        elif not same_content(file, entry):
            problems.append(f"{file.path}: the remote content differs from the local file")
    for shard in manifest["outputs"]["shards"]:
        entry = remote.get(shard_paths.get(shard["path"], shard["path"]))
        if entry is None:
            problems.append(f"{shard['path']}: a shard of the manifest is not on the remote")
        elif entry.size != shard["bytes"] or (entry.lfs_sha256 not in (None, shard["sha256"])):
            problems.append(f"{shard['path']}: the remote copy does not match the manifest's size and sha256")
    for path in stale_files(remote, [f.path for f in files], managed_folders):
        problems.append(f"{path}: on the remote but not in this output")
    return problems


def top_folders(paths: Iterable[str]) -> list[str]:
    """The top-level folders of repository paths (files at the root have none)."""
    return sorted({PurePosixPath(path).parts[0] for path in paths if "/" in path})
