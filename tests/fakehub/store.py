"""In-memory repositories of the loopback Hub: commits, file entries, regular blobs and LFS objects."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

# What a new dataset or model repository on the Hub starts with: which files go to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in ("7z", "arrow", "bin", "bz2", "gz", "h5", "jpg", "jpeg", "npy", "npz", "onnx", "parquet", "pickle",
                "pkl", "png", "pt", "pth", "safetensors", "tar", "tgz", "webp", "xz", "zip", "zst")
)
LFS_EXTENSIONS = frozenset(line.split()[0][2:] for line in DEFAULT_GITATTRIBUTES.splitlines())
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files above this go to LFS whatever their extension


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The upload mode the Hub picks: LFS for tracked extensions, large files and binary content."""
    extension = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return extension in LFS_EXTENSIONS or size > LFS_SIZE_THRESHOLD or b"\0" in sample


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree."""

    path: str
    size: int
    blob_id: str  # git sha1 of the content, or of the LFS pointer for an LFS file
    lfs_sha256: str | None = None

    def as_json(self) -> dict:
        data = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            data["lfs"] = {"oid": self.lfs_sha256, "size": self.size,
                           "pointerSize": len(lfs_pointer(self.lfs_sha256, self.size))}
        return data

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, Entry]
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_type: str  # "model", "dataset", "space"
    repo_id: str  # "owner/name"
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.repo_type, self.repo_id

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit oid points to."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def directories(self, commit: Commit) -> set[str]:
        folders: set[str] = set()
        for path in commit.files:
            parts = path.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return folders


class HubStore:
    """Every repository, regular blob and LFS object of one loopback Hub, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git sha1 -> content of regular files
        self.lfs_objects: dict[tuple[tuple[str, str], str], bytes] = {}  # (repo key, sha256) -> content
        self._counter = 0

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        """Create a repository with the initial `.gitattributes` commit; returns (repo, created)."""
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                return existing, False
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            self.repos[repo.key] = repo
            content = DEFAULT_GITATTRIBUTES.encode()
            self.blobs[git_blob_sha1(content)] = content
            entry = Entry(".gitattributes", len(content), git_blob_sha1(content))
            self._add_commit(repo, "main", None, "initial commit", {entry.path: entry}, [entry.path], [])
            return repo, True

    def create_branch(self, repo: Repo, branch: str, start: Commit) -> bool:
        with self.lock:
            if branch in repo.branches:
                return False
            repo.branches[branch] = start.oid
            return True

    def commit(self, repo: Repo, branch: str, title: str, regular: dict[str, bytes], lfs: dict[str, tuple[str, int]],
               deleted: list[str]) -> Commit:
        """Apply additions (regular contents, LFS (sha256, size) references) and deletions on top of `branch`."""
        with self.lock:
            parent = repo.resolve(branch)
            files = dict(parent.files) if parent else {}
            for path in deleted:
                if path in files:
                    del files[path]
                else:  # a folder
                    for name in [name for name in files if name.startswith(path.rstrip("/") + "/")]:
                        del files[name]
            for path, content in regular.items():
                self.blobs[git_blob_sha1(content)] = content
                files[path] = Entry(path, len(content), git_blob_sha1(content))
            for path, (sha256, size) in lfs.items():
                files[path] = Entry(path, size, git_blob_sha1(lfs_pointer(sha256, size)), sha256)
            added = sorted([*regular, *lfs])
            return self._add_commit(repo, branch, parent.oid if parent else None, title, files, added, deleted)

    def content(self, repo: Repo, entry: Entry) -> bytes:
        with self.lock:
            if entry.lfs_sha256 is not None:
                return self.lfs_objects[(repo.key, entry.lfs_sha256)]
            return self.blobs[entry.blob_id]

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, title: str, files: dict[str, Entry],
                    added: list[str], deleted: list[str]) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].blob_id}\n".encode())
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the Hub's format
        commit = Commit(digest.hexdigest(), parent, title, date, files, added, list(deleted))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit
